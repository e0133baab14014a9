"""owl pipelines: everything that touches Ray and MLflow (steps, runner, lineage, the `owl` CLI)."""
