"""`quillan`: the command line. Stages (what dvc.yaml calls), the whole flow, gates, config."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import yaml


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"quillan: --set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def _load(args) -> "object":
    from tasks.params import ConfigError, load_params

    try:
        return load_params(args.params, preset=getattr(args, "preset", None), overrides=_parse_sets(args.set))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_stage(args) -> int:
    from tasks import StageError, StageInterrupted, run_stage

    params = _load(args)
    try:
        run_stage(args.name, params)
    except StageError as e:
        print(f"stage {args.name} failed: {e}", file=sys.stderr)
        return 1
    except StageInterrupted as e:
        print(f"stage {args.name} interrupted by {e}: no output was written; running it again resumes "
              f"from the last checkpoint (train, grpo) or starts over", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


def cmd_run(args) -> int:
    _load(args)  # fail before Prefect or DVC start
    from flows.pipeline import PipelineFailed, pipeline

    try:
        pipeline(preset=args.preset, until=args.until, overrides=_parse_sets(args.set))
    except PipelineFailed as e:
        print(f"pipeline failed: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args) -> int:
    _load(args)  # a config error stops here, not at 3 a.m.
    from flows.pipeline import stage_order
    from flows.schedule import ServeError, serve

    if args.until is not None and args.until not in stage_order():
        print(f"serve: --until: unknown stage {args.until!r} (one of: {', '.join(stage_order())})", file=sys.stderr)
        return 2
    try:
        from prefect.schedules import Cron

        Cron(args.cron)
    except ValueError as e:
        print(f"serve: --cron {args.cron!r}: {e}", file=sys.stderr)
        return 2
    try:
        serve(args.cron, preset=args.preset, until=args.until, overrides=_parse_sets(args.set), name=args.name,
              host=args.host, port=args.port)
    except ServeError as e:
        print(f"serve: {e}", file=sys.stderr)
        return 1
    print("serve: stopped", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    # Prefect's event clients run in non-daemon threads that keep retrying the (now stopped)
    # server and would keep this process alive; everything of ours is closed at this point.
    os._exit(0)


def cmd_validate(args) -> int:
    from tasks.gates import validate
    from tasks.tracking import TrackingUnreachable

    params = _load(args)
    run_name = (args.run_name or f"gate_{args.suite}") if args.mlflow else None
    try:
        result = validate(args.suite, [Path(p) for p in args.paths], params,
                          Path(args.report) if args.report else None, run_name)
    except (ValueError, FileNotFoundError, TrackingUnreachable) as e:
        print(f"validate: {e}", file=sys.stderr)
        return 2
    print(result.report(), file=sys.stdout if result.success else sys.stderr)
    return 0 if result.success else 1


def cmd_config(args) -> int:
    params = _load(args)
    print(yaml.safe_dump(json.loads(params.model_dump_json()), sort_keys=False), end="")
    return 0


def cmd_model_info(args) -> int:
    from quillan.config import PRESETS, QuillanConfig
    from quillan.model import model_summary

    names = [args.preset] if args.preset else list(PRESETS)
    print("| preset | parameters | active per token | ternary (BitLinear) | FP32 size | packed size |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        s = model_summary(QuillanConfig.preset(name))
        print(f"| `{name}` | {s['parameters']:,} | {s['active_parameters']:,} | {s['ternary_parameters']:,} | "
              f"{s['fp32_bytes'] / 2**20:,.1f} MiB | {s['packed_bytes'] / 2**20:,.1f} MiB |")
    return 0


def cmd_sample(args) -> int:
    from quillan.checkpoint import CheckpointError
    from quillan.data.tokenizer import prompt_text
    from quillan.inference import complete
    from quillan.checkpoint import load_any

    path = Path(args.model_dir)
    try:
        model, tokenizer = load_any(path)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"sample: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(f"sample: {path / 'tokenizer.json'}: file not found", file=sys.stderr)
        return 2
    for prompt in args.prompts:
        print(complete(model, tokenizer, [prompt_text({"prompt": prompt})], args.max_new_tokens,
                       temperature=args.temperature, seed=args.seed)[0])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tasks import STAGES

    p = argparse.ArgumentParser(prog="quillan", description="Build ternary (BitNet b1.58) MoE language models end to end.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override one dotted key for this invocation, e.g. --set data.n_per_domain=300")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stage", parents=[common], help="run one pipeline stage (what dvc.yaml calls)")
    s.add_argument("name", choices=STAGES)
    s.set_defaults(func=cmd_stage)

    r = sub.add_parser("run", parents=[common], help="run the whole DAG through the Prefect flow (drives dvc repro)",
                       description="Run every DVC stage in order, gates between them, as one Prefect flow run "
                                   "with one parent MLflow run. --preset and --set are validated, then written into "
                                   "params.yaml (comments kept), so that dvc.lock records what was run.")
    r.add_argument("--preset", help="preset to run (smoke, cpu, gpu); default: the one in params.yaml")
    r.add_argument("--until", help="stop after this DVC stage")
    r.set_defaults(func=cmd_run)

    sv = sub.add_parser("serve", parents=[common], help="serve the pipeline as a scheduled Prefect deployment",
                        description="Create a Prefect deployment of the pipeline flow with a cron schedule and run "
                                    "its flow runs from this process (Prefect's flow.serve). Uses the server in "
                                    "PREFECT_API_URL, else starts a local one on 127.0.0.1. --preset, --until and "
                                    "--set become deployment parameters; each run writes them into params.yaml.")
    sv.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *" (03:00 every day, server time zone UTC)')
    sv.add_argument("--preset", help="preset each run uses (default: the one in params.yaml)")
    sv.add_argument("--until", help="stop each run after this DVC stage")
    sv.add_argument("--name", help="deployment name (default: quillan-<preset>)")
    sv.add_argument("--host", default="127.0.0.1", help="address of the local Prefect server (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=4200, help="port of the local Prefect server (default 4200)")
    sv.set_defaults(func=cmd_serve)

    v = sub.add_parser("validate", parents=[common], help="run a data-validation gate on files; exit 1 if it fails")
    v.add_argument("suite", help="suite name (gates/<suite>.json): data, calibration, model or export")
    v.add_argument("paths", nargs="+", help="file(s) to validate, e.g. data/generated/train.jsonl")
    v.add_argument("--report", help="also write a JSON summary here")
    v.add_argument("--mlflow", action="store_true", help="log the gate's result as an MLflow run")
    v.add_argument("--run-name", help="MLflow run name (default: gate_<suite>)")
    v.set_defaults(func=cmd_validate)

    c = sub.add_parser("config", parents=[common], help="print the resolved, validated config")
    c.add_argument("--preset", help="resolve with this preset instead of params.yaml's")
    c.set_defaults(func=cmd_config)
    sm = sub.add_parser("sample", help="print a completion from a model directory (any export, models/train, models/grpo)")
    sm.add_argument("model_dir", help="e.g. models/export/ternary")
    sm.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text, e.g. '12+30='")
    sm.add_argument("--max-new-tokens", type=int, default=48)
    sm.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sm.add_argument("--seed", type=int, default=0)
    sm.set_defaults(func=cmd_sample)
    mi = sub.add_parser("model-info", help="parameter counts and sizes of the model presets (meta device, no memory)")
    mi.add_argument("preset", nargs="?", help="one model preset (default: all)")
    mi.set_defaults(func=cmd_model_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
