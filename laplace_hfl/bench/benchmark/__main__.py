from laplace_hfl.bench.benchmark.run import main

raise SystemExit(main())
