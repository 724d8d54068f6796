import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

# One PyTorch thread in every test process and in every pipeline a test starts. The smoke preset's
# tensors are too small for a second thread to pay (one smoke `dvc repro` alone: 171 s on 2
# threads, 158 s on 1), and `make test` runs two pytest-xdist workers, each holding a core:
# OpenMP threads spinning at barriers while the other process holds their core cost far more
# (README "Tests"). Set before anything imports torch.
os.environ["OMP_NUM_THREADS"] = "1"
SMOKE_GROUP = "smoke-pipeline"
SRC = Path(__file__).resolve().parent.parent


def pytest_itemcollected(item):
    """Under pytest-xdist (`--dist loadgroup`), every test that reads the session's smoke runs
    runs on one worker, so the two smoke pipelines are built once, not once per worker. Marked
    as each item is collected: xdist turns the group into a node-id suffix right after collection."""
    if "smoke_runs" in getattr(item, "fixturenames", ()):  # the closure: generated_project's users too
        item.add_marker(pytest.mark.xdist_group(SMOKE_GROUP))


def pytest_collection_modifyitems(items):
    """The smoke group first: it is the longest chain of work, so a worker starts on it at once."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)


def _project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=SRC,
                         capture_output=True, text=True, check=True)
    return [f for f in out.stdout.splitlines() if (SRC / f).is_file()]


@pytest.fixture(scope="session", autouse=True)
def repo_untouched():
    """Tests work in copies: fail the session if anything wrote this checkout's params or lock."""
    watched = [SRC / "params.yaml", SRC / "dvc.lock"]
    before = [p.read_bytes() if p.exists() else None for p in watched]
    yield
    after = [p.read_bytes() if p.exists() else None for p in watched]
    changed = [str(p.relative_to(SRC)) for p, b, a in zip(watched, before, after) if b != a]
    assert not changed, f"a test modified the repository itself: {changed}"


@pytest.fixture
def project(tmp_path):
    """A fresh git clone-like copy of this project (its code, not its outputs), preset smoke.

    Returns (root, env): run commands with cwd=root and env=env so the copy's code is used.
    """
    return make_project(tmp_path / "quillan")


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """The whole smoke pipeline, run once per session in two fresh copies side by side: clone A
    through `quillan run --preset smoke` (Prefect), clone B through `dvc repro`.

    Returns {"a": (root, env, (stdout, stderr)), "b": ..., "pristine": B copied before any test
    touched it}. Tests that change A or B live in tests/test_pipeline_e2e.py; others copy
    `pristine` (see `copy_project`).
    """
    (a, env_a), (b, env_b) = (make_project(tmp_path_factory.mktemp(n) / "quillan") for n in ("a", "b"))
    commands = (([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke"], a, env_a),
                ([sys.executable, "-m", "dvc", "repro"], b, env_b))
    procs = [subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, root, env in commands]
    outs = [p.communicate() for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{p.args} exited {p.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    pristine = tmp_path_factory.mktemp("pristine") / "quillan"
    shutil.copytree(b, pristine, symlinks=True)
    return {"a": (a, env_a, outs[0]), "b": (b, env_b, outs[1]), "pristine": pristine}


@pytest.fixture(scope="module")
def generated_project(smoke_runs, tmp_path_factory):
    """A private copy of a finished smoke run (data, models, exports, dvc.lock, MLflow store)."""
    return copy_project(smoke_runs["pristine"], tmp_path_factory.mktemp("proj") / "quillan")


@pytest.fixture(scope="session")
def generated_data(tmp_path_factory):
    """A fresh smoke project after `dvc repro generate` alone: data, tokenizer and the stage in
    dvc.lock, no models (what data tests need, in seconds instead of a whole pipeline)."""
    root, env = make_project(tmp_path_factory.mktemp("gen") / "quillan")
    run([sys.executable, "-m", "dvc", "repro", "generate"], root, env)
    return root


@pytest.fixture
def generated_data_copy(generated_data, tmp_path):
    """A private copy of `generated_data`: (root, env)."""
    return copy_project(generated_data, tmp_path / "quillan")


def copy_project(src: Path, root: Path):
    """Copy a project directory, outputs and DVC cache included; returns (root, env) for it."""
    shutil.copytree(src, root, symlinks=True)
    return root, _env(root)


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)
    env["PWD"] = str(root)  # tools that read $PWD (Prefect's templating) must see the copy
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("QUILLAN_PARENT_RUN_ID", None)
    return env


def make_project(root: Path):
    for rel in _project_files():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SRC / rel, dest)
    for out in ("dvc.lock", "metrics", "reports", "plots", "models", "data/generated", "data/tokenizer.json"):
        p = root / out
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("preset: cpu", "preset: smoke"))
    env = _env(root)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "copy"], cwd=root, check=True)
    return root, env


def run(cmd, root, env, check=True):
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def interrupt_when(cmd, root, env, ready, sig, timeout_s=300.0):
    """Start `cmd`, wait until `ready()` is true (polling), send `sig`; returns (exit code, stderr).

    Fails the test if the command ends on its own or `ready()` never holds within `timeout_s`."""
    log = root / ".interrupted.stderr"  # a file, not a pipe: progress bars would fill a pipe and block
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + timeout_s
        while not ready():
            assert proc.poll() is None, f"{cmd} ended (exit {proc.returncode}) before it could be interrupted"
            assert time.time() < deadline, f"{cmd}: not ready to interrupt after {timeout_s} s"
            time.sleep(0.02)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    stderr = log.read_text()
    log.unlink()
    return proc.returncode, stderr
