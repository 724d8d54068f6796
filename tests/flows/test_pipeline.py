"""The flow's pieces that need no pipeline run: stage order, retry policy, artifacts."""

from prefect.states import Completed, Failed

from flows.pipeline import PipelineFailed, _is_transient, stage_order, summary_markdown


def test_stage_order_is_dvc_yaml_order_with_gates_between_stages():
    assert stage_order() == ["generate", "gate_data", "calibrate", "gate_calibration", "train", "gate_train", "grpo",
                             "gate_grpo", "export", "gate_export", "benchmark"]


def _failed(exc: Exception):
    return Failed(data=exc)


def test_only_lock_contention_is_retried():
    lock = PipelineFailed("stage 'train' failed (exit 1):\nERROR: Unable to acquire lock. Most likely another DVC process is running")
    sqlite = PipelineFailed("stage 'grpo' failed (exit 1):\nsqlite3.OperationalError: database is locked")
    gate = PipelineFailed("stage 'gate_data' failed (exit 1):\ngate 'data': FAILED on 945 rows")
    assert _is_transient(None, None, _failed(lock)) and _is_transient(None, None, _failed(sqlite))
    assert not _is_transient(None, None, _failed(gate))
    assert not _is_transient(None, None, _failed(ValueError("Unable to acquire lock")))  # not a stage failure
    assert not _is_transient(None, None, Completed())


def test_summary_lists_every_stage_that_ran():
    md = summary_markdown("smoke", {"generate": "ran", "gate_data": "skipped"}, "abc123")
    assert "| generate | ran |" in md and "| gate_data | skipped |" in md and "`abc123`" in md


def test_importing_flows_gives_the_local_prefect_server_time_to_start_on_a_busy_machine():
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    code = ("import flows; from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as t; "
            "print(t.value())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "180"  # Prefect's own default, 20 s, failed CI at stop 34
