"""Scheduled runs: `quillan serve --cron` and the prefect.yaml deployment, each executing for real."""

import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
import yaml

from tests.conftest import run

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(api: str, path: str, body: dict) -> list | dict:
    req = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _flow_runs(api: str) -> list[dict]:
    return _post(api, "/flow_runs/filter", {"limit": 50, "offset": 0, "sort": "EXPECTED_START_TIME_ASC"})


def _wait_for(predicate, timeout_s: float, what: str, proc=None, log=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:  # server not up yet
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-4000:] if log else ''}")


def test_serve_runs_on_its_schedule_and_prefect_yaml_deploys(project, tmp_path):
    root, env = project
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--cron", "* * * * *", "--preset", "smoke",
                                  "--until", "gate_data", "--port", str(port)], cwd=root, env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        # The cron fires at the next minute; the served process runs the flow run itself.
        done = _wait_for(lambda: [r for r in _flow_runs(api) if r["auto_scheduled"] and r["state_type"] == "COMPLETED"],
                         240, "a scheduled run to complete", serve, log)
        assert done[0]["parameters"] == {"preset": "smoke", "until": "gate_data", "overrides": {}}
        # The server started for the user listens on loopback only.
        listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}, listening
        deployment = _post(api, "/deployments/filter", {"limit": 5, "offset": 0})
        assert [d["name"] for d in deployment] == ["quillan-smoke"]
        assert [s["schedule"]["cron"] for s in deployment[0]["schedules"]] == ["* * * * *"]
        # One scheduled run is the proof; pause so the next minute's does not run beside what follows.
        _post(api, f"/deployments/{deployment[0]['id']}/pause_deployment", {})
        # On a slow machine the next minute's run can start before the pause took effect: drop the
        # runs still scheduled and let any in flight end before the checkout is used again (two
        # pipelines in one checkout contend for DVC's lock).
        for r in _flow_runs(api):
            if r["state_type"] == "SCHEDULED":
                try:
                    urllib.request.urlopen(urllib.request.Request(f"{api}/flow_runs/{r['id']}", method="DELETE"), timeout=10)
                except urllib.error.HTTPError as e:  # the server's pause may have deleted it first
                    if e.code != 404:
                        raise
        _wait_for(lambda: not [r for r in _flow_runs(api) if r["state_type"] in ("SCHEDULED", "PENDING", "RUNNING")],
                  240, "the scheduled runs in flight to end", serve, log)
        stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        assert set(stages) == {"generate", "gate_data"}  # --until gate_data: nothing after it ran
        assert yaml.safe_load((root / "params.yaml").read_text())["preset"] == "smoke"
        artifacts = {a["key"] for a in _post(api, "/artifacts/filter", {"limit": 20, "offset": 0})}
        assert {"generate", "gate-data", "quillan-summary"} <= artifacts

        # prefect.yaml declares the nightly deployment for a work pool; a process worker runs it.
        cli = [sys.executable, "-m", "prefect", "--no-prompt"]
        penv = {**env, "PREFECT_API_URL": api}
        run(cli + ["work-pool", "create", "quillan", "--type", "process"], root, penv)
        run(cli + ["deploy", "--all"], root, penv)
        nightly = [d for d in _post(api, "/deployments/filter", {"limit": 5, "offset": 0}) if d["name"] == "quillan-nightly"]
        assert nightly[0]["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        assert nightly[0]["parameters"]["preset"] == "cpu" and nightly[0]["work_pool_name"] == "quillan"
        run(cli + ["deployment", "run", "quillan-pipeline/quillan-nightly", "-p", "preset=smoke", "-p", "until=generate"],
            root, penv)
        worker = run(cli + ["worker", "start", "--pool", "quillan", "--run-once"], root, penv)
        manual = [r for r in _flow_runs(api) if r["deployment_id"] == nightly[0]["id"] and not r["auto_scheduled"]]
        assert [r["state_type"] for r in manual] == ["COMPLETED"], worker.stdout[-3000:] + worker.stderr[-3000:]
        # Every completed run (the scheduled one or two, the manual one) logged in this checkout's store.
        completed = [r for r in _flow_runs(api) if r["state_type"] == "COMPLETED"]
        assert len(completed) >= 2, [(r["name"], r["state_type"]) for r in _flow_runs(api)]
        with sqlite3.connect(root / "mlflow.db") as db:
            assert db.execute("select count(*) from runs where name = 'pipeline-smoke'").fetchone() == (len(completed),)
    finally:
        serve.terminate()
        serve.wait(timeout=60)
    # Serving owned the local server: it is gone with it.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{api}/health", timeout=2)
