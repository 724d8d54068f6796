"""A second pipeline run started while one runs gets DVC's lock error as a readable message, and
neither run damages the other's artifacts."""

import re
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import copy_project, run

pytestmark = pytest.mark.slow


def _locked_outs(root):
    """Output hashes in dvc.lock, except metrics/ (they hold wall-clock timings)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for st in lock.values() for o in st.get("outs", [])
            if not o["path"].startswith("metrics/")}


def test_second_run_gets_the_lock_error_and_nothing_is_damaged(generated_project, tmp_path):
    root, env = copy_project(generated_project[0], tmp_path / "quillan")
    before = _locked_outs(root)
    # The smoke train stage takes seconds: the first run waits 45 s inside its stage command (with
    # DVC's locks held) so the second run and the flow are sure to meet it, however fast training is.
    dvc_yaml = root / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("cmd: quillan stage train", "cmd: sleep 45 && quillan stage train", 1))
    log = root / ".first-run.log"
    with log.open("w") as out:
        # The first run: re-runs train (same bytes, deterministic) and holds the repo lock meanwhile.
        first = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train"],
                                 cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while "Running stage 'train'" not in log.read_text():
            assert first.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)

        # While a stage command runs, DVC holds a read/write lock on its files (the repo lock only
        # around it): a second `dvc repro` stops at one or the other, naming the other process.
        second = run([sys.executable, "-m", "dvc", "repro"], root, env, check=False)
        assert second.returncode != 0
        assert "Unable to acquire lock" in second.stderr or (
            "is busy, it is being blocked by" in second.stderr and f"(PID {first.pid})" in second.stderr), second.stderr

        flow_env = {**env, "QUILLAN_LOCK_RETRY_DELAY_S": "0.5"}  # 2 retries, then give up
        flow = run([sys.executable, "-m", "flows.cli", "run"], root, flow_env, check=False)
        assert first.poll() is None, "the first run ended before the second gave up: the test proved nothing"
        assert flow.returncode == 1
        message = flow.stderr.strip().splitlines()
        assert any(re.search(r"stage '\w+': another `dvc repro` or `quillan run` is running", line)
                   and "Run it again when the other one has finished" in line for line in message), flow.stderr[-3000:]
        assert first.wait(timeout=600) == 0, log.read_text()[-3000:]
    log.unlink()
    assert _locked_outs(root) == before  # the first run's artifacts are what an undisturbed run writes
    status = run([sys.executable, "-m", "dvc", "status"], root, env)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
