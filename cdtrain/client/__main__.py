from cdtrain.client.cli import main

raise SystemExit(main())
