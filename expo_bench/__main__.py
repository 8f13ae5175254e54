from expo_bench.cli import main

raise SystemExit(main())
