from plano_extproc.cli import main

raise SystemExit(main())
