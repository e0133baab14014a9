"""Links into the MLflow UI (3.x) that open its model-training view.

The UI picks its mode from the page URL's `workflowType` query parameter, else from the last mode
the browser used, GenAI by default (traces, judges, prompts; an "Evaluations" breadcrumb); only
`workflowType=machine_learning` shows runs, their metrics and models as training records them
(read from the bundled UI's WorkflowTypeProvider). A local store has no server: its links are for
`mlflow ui --backend-store-uri URI --port 5000`.
"""

from __future__ import annotations

TRAINING_VIEW = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"


def ui_base(tracking_uri: str) -> str:
    """The UI's address for a tracking URI: the server itself, else `mlflow ui`'s default."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def model_version_url(base: str, name: str, version: str) -> str:
    return f"{base}/#/models/{name}/versions/{version}?{TRAINING_VIEW}"
