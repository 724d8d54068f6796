"""An unreachable MLflow server fails a run in seconds, before any compute, naming the URI."""

import errno
import os
import socket
import sys
import time

from tests.conftest import run


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_fast(project):
    root, env = project
    uri = f"http://127.0.0.1:{_closed_port()}"
    env = {**env, "MLFLOW_TRACKING_URI": uri}
    for cmd, prefix in (([sys.executable, "-m", "flows.cli", "stage", "train"], "stage train failed: "),
                        ([sys.executable, "-m", "flows.cli", "run"], "pipeline failed: ")):
        start = time.monotonic()
        proc = run(cmd, root, env, check=False)
        assert time.monotonic() - start < 60  # MLflow's own retries would take minutes
        assert proc.returncode == 1
        assert f"{prefix}MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable: " \
               f"[Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)}" in proc.stderr.splitlines()
    assert not (root / "models").exists() and not (root / "dvc.lock").exists()
