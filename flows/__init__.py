"""Orchestration: the Prefect flow over the DVC stages, and the `quillan` CLI."""

import os

# Nothing here may reach the network: no telemetry from Prefect, MLflow, GX or DVC.
for _var, _value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"),
                     ("GX_ANALYTICS_ENABLED", "false"), ("MLFLOW_ENABLE_TELEMETRY", "false")):
    os.environ.setdefault(_var, _value)

# Prefect gives its temporary local server 20 s to answer; on a busy 2-core machine (the test
# suite runs a DVC pipeline beside it) start-up took longer and `quillan run` failed (CI, stop 34).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
