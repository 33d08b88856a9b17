from selftune.cli import main

raise SystemExit(main())
