from medtl.cli import main

raise SystemExit(main())
