"""``python -m ingress``: run the ingress with settings from the environment (docs/api.md)."""

import sys

from ingress.main import main

sys.exit(main())
