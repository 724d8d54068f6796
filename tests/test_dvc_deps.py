"""dvc.yaml's deps cover the code each stage runs: a change to any project file a stage's command
imports re-runs that stage (`dvc status` sees it), and its MLflow run is tagged with those deps."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("quillan", "tasks", "flows")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def command_module(cmd: str) -> str:
    """The tasks module a dvc.yaml command runs: `quillan stage X` → tasks.X, `quillan validate` → tasks.gates."""
    words = cmd.split()
    assert words[0] == "quillan", cmd
    return f"tasks.{words[2]}" if words[1] == "stage" else "tasks.gates"


def lazy_imports(module: str) -> list[str]:
    """Project modules a module imports inside its functions (run only when the stage runs)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return [n for n in names if n.split(".")[0] in PACKAGES]


def loaded_files(modules: list[str]) -> set[str]:
    """Project files (relative paths) loaded by importing `modules` in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "print(json.dumps(sorted({getattr(m, '__file__', None) or '' for m in list(sys.modules.values())})))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    files = set()
    for f in json.loads(out.stdout.splitlines()[-1]):
        p = Path(f).resolve() if f else None
        if p and p.is_relative_to(ROOT) and p.relative_to(ROOT).parts[0] in PACKAGES:
            files.add(str(p.relative_to(ROOT)))
    return files


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_the_code_it_imports(stage):
    module = command_module(STAGES[stage]["cmd"])
    files = loaded_files(["flows.cli", "tasks", "tasks.tracking", module, *lazy_imports(module)])
    assert f"{module.replace('.', '/')}.py" in files and "quillan/config.py" in files  # the probe works
    deps = [str(d) for d in STAGES[stage]["deps"]]
    missing = sorted(f for f in files if not covered(f, deps))
    assert not missing, f"dvc.yaml: stage {stage} imports {missing} but does not depend on them"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_params_cover_the_preset(stage):
    """Stages that read params also depend on the preset file's same sections."""
    params = STAGES[stage].get("params", [])
    sections = [p for p in params if isinstance(p, str)]
    presets = [p for p in params if isinstance(p, dict)]
    if sections:
        assert presets and list(presets[0]) == ["presets/${preset}.yaml"]
        assert sorted(presets[0]["presets/${preset}.yaml"]) == sorted(sections)


def test_mlflow_tags_are_the_dvc_deps():
    from tasks.tracking import stage_deps

    assert stage_deps("train") == [str(d) for d in STAGES["train"]["deps"]]
    assert stage_deps("not-a-stage") == []
