"""Orchestration: the Prefect flow over the DVC stages, and the `quillan` CLI."""

import os

# Nothing here may reach the network: no telemetry from Prefect, MLflow, GX or DVC.
for _var, _value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"),
                     ("GX_ANALYTICS_ENABLED", "false"), ("MLFLOW_ENABLE_TELEMETRY", "false")):
    os.environ.setdefault(_var, _value)
