"""`quillan serve`: the pipeline as a scheduled Prefect deployment, served from this process.

Prefect's `flow.serve` creates the deployment and runs its scheduled flow runs in
subprocesses of this process: no work pool, no worker, no other infrastructure. Schedules need
a Prefect server (Prefect's temporary in-process server does not schedule), so unless
`PREFECT_API_URL` names one, a local server is started on 127.0.0.1 for as long as serving
lasts; its UI shows the deployment, the runs and their artifacts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

from tasks.common import ROOT
from tasks.params import display_path


class ServeError(RuntimeError):
    """The Prefect server could not be reached or started."""


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def prefect_server(host: str = "127.0.0.1", port: int = 4200, startup_s: float = 90.0) -> Iterator[str]:
    """Yield the API URL of a Prefect server: `PREFECT_API_URL` if set, one already listening on
    host:port, or a `prefect server start` child process that is stopped on exit."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    api_url = f"http://{host}:{port}/api"
    if _healthy(api_url):
        yield api_url
        return
    log_path = ROOT / "reports" / "prefect-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host,
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + startup_s
        while not _healthy(api_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-2000:]
                raise ServeError(f"the Prefect server on {host}:{port} did not start "
                                 f"(log: {log_path}):\n{tail}")
            time.sleep(0.5)
        print(f"Prefect server: http://{host}:{port} (log: {display_path(log_path)})", flush=True)
        yield api_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _die_with_parent() -> None:
    """In the server child: get SIGTERM when the serving process dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _stop_descendants(timeout_s: float = 20.0) -> None:
    """Terminate what serving started and left running (an in-flight flow run and its stage)."""
    import psutil  # a DVC dependency

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def deployment_name(preset: str | None) -> str:
    return f"quillan-{preset or 'params'}"


def serve(cron: str, *, preset: str | None = None, until: str | None = None,
          overrides: dict[str, Any] | None = None, name: str | None = None,
          host: str = "127.0.0.1", port: int = 4200) -> None:
    """Serve the pipeline flow on a cron schedule (blocks until interrupted).

    Deployment parameters: preset, until, overrides; a run triggered by hand from the UI or
    `prefect deployment run` may change them.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import pipeline

    try:
        with prefect_server(host, port) as api_url, temporary_settings(updates={PREFECT_API_URL: api_url}):
            pipeline.serve(name=name or deployment_name(preset), cron=cron,
                           parameters={"preset": preset, "until": until, "overrides": overrides or {}},
                           description=f"Quillan pipeline, preset {preset or 'from params.yaml'}, cron {cron!r}",
                           tags=["quillan"])
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (Prefect's runner turns it into sys.exit)
        pass
    finally:
        _stop_descendants()
