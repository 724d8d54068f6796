"""Data-validation gates: Great Expectations suites kept in `gates/<suite>.json`.

A gate loads the file(s), derives the columns a suite needs (prefixed `_`, e.g. whether each
answer re-verifies), validates with GX, writes GX Data Docs under `reports/gates/<suite>/`
and a JSON summary, and reports each failed expectation with example rows (file:line).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from quillan.data.filters import normalize_text
from quillan.data.tokenizer import training_text
from quillan.data.verify import verify_record
from tasks.common import REPORTS_DIR, ROOT, read_jsonl, write_json
from tasks.params import Params

GATES_DIR = ROOT / "gates"
MAX_EXAMPLES = 3


@dataclass
class GateResult:
    suite: str
    success: bool
    rows: int
    failures: list[dict[str, Any]] = field(default_factory=list)
    docs: str = ""

    def report(self) -> str:
        head = f"gate '{self.suite}': {'PASSED' if self.success else 'FAILED'} on {self.rows} rows"
        lines = [head]
        for f in self.failures:
            lines.append(f"  ✗ {f['why']} — {f['expectation']}({f['column'] or ''}): "
                         f"{f['unexpected_count']} row(s)")
            for ex in f["examples"]:
                lines.append(f"      {ex}")
        if self.docs:
            lines.append(f"  Data Docs: {self.docs}")
        return "\n".join(lines)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def default_tokenizer(paths: list[Path]) -> Path | None:
    """`data/tokenizer.json` for files in `data/generated/`: the tokenizer one level up, if any."""
    cand = Path(paths[0]).resolve().parent.parent / "tokenizer.json"
    return cand if cand.exists() else None


def required_columns() -> list[str]:
    """The columns every split row must have: the data suite's column set (gates/data.json)."""
    spec = json.loads((GATES_DIR / "data.json").read_text())
    return next(e["kwargs"]["column_set"] for e in spec["expectations"]
                if e["type"] == "expect_table_columns_to_match_set")


def data_frame(paths: list[Path], params: Params, tokenizer: Path | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Rows of the given split files plus derived columns, and the suite parameters.

    Leakage is checked against every split file in the same directories (train/val/test),
    so validating train.jsonl alone still sees val and test. Token lengths are recounted with
    `tokenizer` when given (else the rows' recorded `n_tokens` are trusted).
    """
    rows: list[dict[str, Any]] = []
    for path in paths:
        for lineno, row in enumerate(read_jsonl(path), 1):
            rows.append({**row, "_file": Path(path).name, "_line": lineno})
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame({"_file": pd.Series(dtype=str), "_line": pd.Series(dtype=int)})
    missing = [col for col in required_columns() if col not in df.columns]
    for col in missing:  # filled for the derived columns below, dropped again before validation
        df[col] = None
    df["_prompt_is_str"] = df["prompt"].map(_is_str)
    df["_answer_is_str"] = df["answer"].map(_is_str)
    df["_n_chars"] = [len(p if _is_str(p) else "") + len(t if _is_str(t) else "")
                      for p, t in zip(df["prompt"], df["target"])]
    df["_n_tokens"] = _token_counts(df, tokenizer)
    # Recorded counts come from the tokenizer generate trained; a different tokenizer disagrees.
    recorded = df["n_tokens"] if "n_tokens" in df.columns else pd.Series([None] * len(df), index=df.index)
    df["_tokens_match"] = [tokenizer is None or (isinstance(r, (int, float)) and r == n)
                           for r, n in zip(recorded, df["_n_tokens"])]
    df["_prompt_key"] = df["prompt"].map(lambda p: normalize_text(p) if _is_str(p) else "")
    df["_in_other_split"] = _leaked(df, paths)
    df["_verified"] = [verify_record(r) for r in df[["prompt", "answer", "target", "verifier"]].to_dict("records")]
    domains = params.data.domains
    share = df["domain"].map(df["domain"].value_counts(normalize=True)).fillna(0.0)
    df["_domain_share_deviation"] = (share - 1.0 / len(domains)).abs()
    df["_where"] = [f"{f}:{n}" for f, n in zip(df["_file"], df["_line"])]
    df["_show"] = [f"id={i} prompt={(p if _is_str(p) else repr(p))[:60]!r} answer={a!r}"
                   for i, p, a in zip(df["id"], df["prompt"], df["answer"])]
    df = df.drop(columns=missing)  # so that "missing column" fails, not a column of Nones
    cfg = params.data
    suite_params = {"min_chars": cfg.min_chars, "max_chars": cfg.max_chars, "min_tokens": cfg.min_tokens,
                    "max_tokens": cfg.max_tokens, "max_domain_share_deviation": cfg.max_domain_share_deviation}
    return df, suite_params


def _token_counts(df: pd.DataFrame, tok_path: Path | None) -> list[int]:
    texts = [training_text({"prompt": p if _is_str(p) else "", "target": t if _is_str(t) else ""})
             for p, t in zip(df["prompt"], df["target"])]
    if tok_path is None:
        return [int(n) if isinstance(n, (int, float)) and n == n else 0 for n in df.get("n_tokens", [0] * len(df))]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    return [len(e.ids) for e in tok.encode_batch(texts)]


def _leaked(df: pd.DataFrame, paths: list[Path]) -> list[bool]:
    files = {Path(p).resolve() for p in paths}
    siblings = {q.resolve() for p in paths for q in Path(p).parent.glob("*.jsonl")}
    keys_by_file: dict[str, set[str]] = {}
    for f in sorted(files | siblings):
        if f in files:
            keys = set(df.loc[df["_file"] == f.name, "_prompt_key"])
        else:
            keys = {normalize_text(r["prompt"]) for r in read_jsonl(f) if _is_str(r.get("prompt"))}
        keys_by_file[f.name] = keys
    out = []
    for fname, key in zip(df["_file"], df["_prompt_key"]):
        out.append(any(key in keys for other, keys in keys_by_file.items() if other != fname))
    return out




def load_suite(name: str):
    """The GX ExpectationSuite stored in gates/<name>.json."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    path = GATES_DIR / f"{name}.json"
    spec = json.loads(path.read_text())
    suite = gx.ExpectationSuite(name=spec["name"], meta=spec.get("meta", {}))
    for e in spec["expectations"]:
        conf = ExpectationConfiguration(type=e["type"], kwargs=e["kwargs"], meta=e.get("meta", {}))
        suite.add_expectation_configuration(conf)
    return suite


def calibration_frame(paths: list[Path], params: Params, tokenizer: Path | None = None):
    """One row per module the model has (calibration.json's `modules`): is it in the plan, with
    a known precision and finite statistics?"""
    path = Path(paths[0])
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    plan, layers = report.get("plan", {}), report.get("layers", {})
    rows = []
    for name in report.get("modules", []):
        stats = layers.get(name, {})
        numbers = [v for v in stats.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        rows.append({"module": name, "precision": plan.get(name), "_in_plan": name in plan,
                     "_has_stats": bool(stats), "_finite": all(math.isfinite(v) for v in numbers),
                     "_where": f"{path.name}: {name}", "_show": json.dumps(stats)[:100]})
    return pd.DataFrame(rows or [{"module": None, "precision": None, "_in_plan": False, "_has_stats": False,
                                  "_finite": False, "_where": path.name, "_show": "no modules listed"}]), {}


def model_frame(paths: list[Path], params: Params, tokenizer: Path | None = None):
    """One row per weight tensor of each model directory given (and of its `reference/`, if
    any): the directory loads, and every value is finite."""
    from quillan.checkpoint import CheckpointError, load_model_dir

    rows = []
    dirs = [Path(p) for p in paths]
    dirs += [d / "reference" for d in dirs if (d / "reference" / "config.json").exists()]
    for directory in dirs:
        try:
            model, tok = load_model_dir(directory)
        except CheckpointError as e:
            rows.append({"tensor": None, "_loads": False, "_finite": False, "_where": str(directory), "_show": str(e)[:200]})
            continue
        for name, t in sorted(model.state_dict().items()):
            rows.append({"tensor": name, "_loads": True, "_finite": bool(torch.isfinite(t).all()),
                         "_where": f"{directory}: {name}", "_show": f"shape={tuple(t.shape)}"})
    return pd.DataFrame(rows), {}


def export_frame(paths: list[Path], params: Params, tokenizer: Path | None = None):
    """One row per export directory (the subdirectories of the given `models/export`): it loads
    from disk alone, generates, its logits are finite, and ternary layers cost 1.6 bits per
    weight (5 per byte; up to one byte of tail padding per layer)."""
    from safetensors import safe_open

    from quillan.checkpoint import CheckpointError
    from quillan.export import load

    rows = []
    dirs = sorted(d for p in paths for d in ([Path(p)] if (Path(p) / "metadata.json").exists() else Path(p).iterdir())
                  if d.is_dir())
    for d in dirs:
        row = {"variant": d.name, "_loads": False, "_generates": False, "_finite": False, "_bits_ok": False,
               "_where": str(d), "_show": ""}
        try:
            model, tok = load(d)
            row["_loads"] = True
            ids = torch.ones(2, 6, dtype=torch.long)
            with torch.no_grad():
                row["_finite"] = bool(torch.isfinite(model(ids).logits).all())
                row["_generates"] = model.generate(ids, 4, temperature=0.0).shape == (2, 10)
            row["_bits_ok"] = all(m.packed.numel() * 4 >= m.in_features * m.out_features  # 2 bits in memory
                                  for m in model.modules() if type(m).__name__ == "TernaryLinear")
            meta = json.loads((d / "metadata.json").read_text())
            for name, shape in meta["shapes"].items():
                if meta["modules"][name] == "ternary":
                    with safe_open(str(d / "model.safetensors"), "pt") as f:
                        nbytes = f.get_slice(f"{name}.packed").get_shape()[0]
                    row["_bits_ok"] &= nbytes == math.ceil(shape[0] * shape[1] / 5)
        except (CheckpointError, RuntimeError, ValueError) as e:
            row["_show"] = str(e)[:200]
        rows.append(row)
    return pd.DataFrame(rows), {}


DERIVERS: dict[str, Callable[..., tuple[pd.DataFrame, dict[str, Any]]]] = {
    "data": data_frame, "calibration": calibration_frame, "model": model_frame, "export": export_frame}


def _observed(result: dict[str, Any]) -> list[str]:
    """What a table-level expectation saw: the missing columns, else its observed value."""
    missing = result.get("details", {}).get("mismatched", {}).get("missing")
    if missing:
        return [f"missing: {', '.join(missing)}"]
    return [json.dumps(result.get("observed_value"), default=str)]


def _examples(df: pd.DataFrame, indices: list[int]) -> list[str]:
    return [f"{df.iloc[i]['_where']} {df.iloc[i]['_show']}" for i in indices[:MAX_EXAMPLES]]


def validate(suite: str, paths: list[Path], params: Params, report: Path | None = None,
             mlflow_run: str | None = None) -> GateResult:
    """`run_gate`, and with `mlflow_run` (a dvc.yaml gate stage name) its MLflow run like any
    stage's: the tracking server is checked before any work (TrackingUnreachable), then the
    gate's success, row count and failures are logged with its report."""
    if mlflow_run is None:
        return run_gate(suite, paths, params, report)
    from tasks.tracking import check_tracking, stage_run

    check_tracking()
    result = run_gate(suite, paths, params, report)
    with stage_run(mlflow_run, {"suite": suite, "files": [str(p) for p in paths]}) as tracker:
        tracker.log_metrics({"gate": {"success": int(result.success), "rows": result.rows,
                                      "failed_expectations": len(result.failures)}})
        if report:
            tracker.log_artifact(report)
    return result


def run_gate(suite_name: str, paths: list[Path], params: Params, report_path: Path | None = None,
             tokenizer: Path | None = None, docs_dir: Path | None = None) -> GateResult:
    """Validate files against a suite; never raises for failing data (see `GateResult.success`).

    `tokenizer` defaults to `default_tokenizer(paths)`; GX Data Docs go to `docs_dir` (default
    reports/gates/<suite>/).
    """
    if suite_name not in DERIVERS:
        raise ValueError(f"unknown suite {suite_name!r} (one of: {', '.join(sorted(DERIVERS))})")
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p}: file not found")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx

    tok = tokenizer or (default_tokenizer(paths) if suite_name == "data" else None)
    df, suite_params = DERIVERS[suite_name](paths, params, tok)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    docs_dir = Path(docs_dir) if docs_dir is not None else REPORTS_DIR / "gates" / suite_name
    ctx.add_data_docs_site(site_name="quillan", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    asset = ctx.data_sources.add_pandas("quillan").add_dataframe_asset(suite_name)
    batch_def = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(load_suite(suite_name))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=suite_name, data=batch_def, suite=suite))
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name=f"gate-{suite_name}", validation_definitions=[vd],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="docs")],
        result_format={"result_format": "COMPLETE"}))
    res = checkpoint.run(batch_parameters={"dataframe": df}, expectation_parameters=suite_params)
    failures = []
    for vr in res.run_results.values():
        for r in vr.results:
            if r.success:
                continue
            conf = r.expectation_config
            idx = list(r.result.get("unexpected_index_list") or [])
            failures.append({
                "expectation": conf.type, "column": conf.kwargs.get("column"),
                "why": (conf.meta or {}).get("why", conf.type.replace("_", " ")),
                "unexpected_count": int(r.result.get("unexpected_count") or len(idx)),
                "examples": _examples(df, idx) if idx else _observed(r.result),
            })
    result = GateResult(suite=suite_name, success=bool(res.success), rows=len(df), failures=failures,
                        docs=str(docs_dir / "index.html"))
    if report_path is not None:
        write_json(report_path, {"suite": suite_name, "success": result.success, "rows": result.rows,
                                 "files": [str(Path(p)) for p in paths], "failures": failures})
    return result
