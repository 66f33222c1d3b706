from catnet.cli import main

raise SystemExit(main())
