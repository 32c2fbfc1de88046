from lmfleet.cli import main

raise SystemExit(main())
