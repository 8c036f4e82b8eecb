"""Benchmarks comparing cdc-sync with PostgreSQL's own logical replication.

Run them with ``./scripts/bench`` (or ``python -m benchmarks``); see ``benchmarks/README.md``.
Each scenario is one module (``update_one_site``, ``update_three_sites``, ``pgbench_latency``,
``initial_copy``, ``apply_memory``); ``harness`` holds the clusters, the two replication systems
and the measuring helpers, ``report`` the result model and its table, JSON and markdown forms.
These are not tests: pytest never collects them (its testpaths is ``tests/``).
"""
