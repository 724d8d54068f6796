"""Nothing in the project deserialises a pickle or executes a string: a scan of the source."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PICKLE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _sources() -> list[Path]:
    return sorted(p for d in ("quillan", "tasks", "flows", "bench") if (ROOT / d).is_dir()
                  for p in (ROOT / d).rglob("*.py"))


def _unsafe(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, f"imports {n}") for n in names if n.split(".")[0] in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func, kwargs = node.func, {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and func.id in ("eval", "exec", "compile", "__import__"):
            found.append((node.lineno, f"calls {func.id}()"))
        if isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else ""
            safe_weights = isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True
            if owner == "torch" and func.attr == "load" and not safe_weights:
                found.append((node.lineno, "torch.load without weights_only=True"))
            if func.attr == "fit" and "ckpt_path" in kwargs and not safe_weights:
                found.append((node.lineno, "Lightning fit(ckpt_path=...) without weights_only=True"))
            if owner == "yaml" and func.attr in ("load", "unsafe_load", "full_load"):
                found.append((node.lineno, f"yaml.{func.attr} (use yaml.safe_load)"))
            if func.attr in ("read_pickle", "from_pickle"):
                found.append((node.lineno, f"{func.attr}()"))
            if isinstance(kwargs.get("allow_pickle"), ast.Constant) and kwargs["allow_pickle"].value is True:
                found.append((node.lineno, "allow_pickle=True"))
    return found


def test_no_source_file_loads_a_pickle_or_executes_a_string():
    sources = _sources()
    assert len(sources) > 30  # the scan sees the project
    problems = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in sources
                for line, what in _unsafe(ast.parse(p.read_text(), str(p)))]
    assert problems == []


def test_the_scan_catches_what_it_looks_for():
    bad = ast.parse("import pickle\nimport torch, yaml\ntorch.load('x')\ntorch.load('y', weights_only=False)\n"
                    "eval('1')\nyaml.load(s)\ntrainer.fit(m, ckpt_path='c')\nnp.load(f, allow_pickle=True)\n")
    assert [line for line, _ in _unsafe(bad)] == [1, 3, 4, 5, 6, 7, 8]
    good = ast.parse("import torch\ntorch.load('x', weights_only=True)\ntrainer.fit(m, ckpt_path='c', weights_only=True)\n")
    assert _unsafe(good) == []
