"""One module per pipeline step. Each exposes `Config` (a dataclass, its job-file section) and
`run(ctx: StepContext, cfg: Config, inputs: dict[str, StepInput]) -> Manifest`."""
