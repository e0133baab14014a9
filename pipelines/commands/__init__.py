"""Sub-command groups of the `owl` CLI. Each module exposes `register(subparsers)`; every
sub-command it adds sets `func=<callable(args) -> int>` and accepts `--json`."""
