"""Benchmark scripts (results in BENCHMARKS.md), run as `PYTHONPATH=. python bench/<name>.py`.
A package so that tests and other scripts import their pieces as `bench.<name>` (pytest puts
the repository root on sys.path: pyproject's `pythonpath`)."""
