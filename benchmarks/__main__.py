"""``python -m benchmarks [--quick] [--only a,b] [--server 16]``: run the benchmarks."""

from benchmarks.runner import main

raise SystemExit(main())
