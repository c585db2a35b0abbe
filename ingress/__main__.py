"""``python -m ingress``: run the ingress with settings from the environment (docs/api.md)."""

from ingress.main import main

main()
