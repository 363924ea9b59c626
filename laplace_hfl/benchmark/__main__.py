from laplace_hfl.benchmark.run import main

raise SystemExit(main())
