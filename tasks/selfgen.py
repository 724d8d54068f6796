"""Self-generation for `generate`: a local Quillan model directory answers fresh task prompts."""

from __future__ import annotations

from pathlib import Path

from quillan.checkpoint import load_model_dir
from quillan.data import SelfGenConfig
from quillan.data.tokenizer import SEP
from quillan.inference import complete


def completer_from_checkpoint(directory: Path, cfg: SelfGenConfig, seed: int):
    """A `prompts → completions` function backed by the model in `directory`.

    The directory must be a Quillan model directory (model.safetensors, config.json,
    tokenizer.json), e.g. models/train/ or an fp16 export of a previous run.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"data.self_generate.checkpoint: {directory} is not a directory")
    model, tokenizer = load_model_dir(directory)
    if tokenizer is None:
        raise FileNotFoundError(f"data.self_generate.checkpoint: {directory} has no tokenizer.json")

    def run(prompts: list[str]) -> list[str]:
        return complete(model, tokenizer, [p + SEP for p in prompts], cfg.max_new_tokens,
                        temperature=cfg.temperature, seed=seed)

    return run
