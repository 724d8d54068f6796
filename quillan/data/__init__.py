"""Self-generated, verifiable training data: generators, filters, verifiers, splits, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer

from quillan.data.filters import FilterReport, apply_filters
from quillan.data.generators import DOMAINS, CodeFormat, Domain, MathFormat, ReasoningFormat, generate_tasks
from quillan.data.splits import SPLITS, split_records
from quillan.data.tokenizer import train_tokenizer, training_text
from quillan.data.verify import ANSWER_MARK, extract_answer


class SelfGenConfig(BaseModel):
    """Optional extra samples written by a local model and kept only if they verify."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: Optional[str] = Field(None, description="local Quillan model dir; null = off")
    samples_per_domain: int = Field(0, ge=0, description="prompts per domain sent to the model")
    temperature: float = Field(0.7, gt=0, le=2)
    max_new_tokens: int = Field(48, ge=1)


class DataConfig(BaseModel):
    """Knobs of the `generate` stage. Lengths are characters unless named *_tokens."""

    model_config = ConfigDict(extra="forbid")
    n_per_domain: int = Field(2000, ge=3, description="raw records per domain before filters")
    domains: list[Domain] = Field(default_factory=lambda: list(DOMAINS), min_length=1)
    math_steps_frac: float = Field(0.3, ge=0, le=1, description="share of math items with worked steps")
    math_format: MathFormat = Field(
        "plain", description="plain: the answer; reversed: `rev <digits least significant first>` then "
                             "`Answer: N` (Lee et al. 2023); columns: add/sub as one line per place "
                             "`x+y+c=d cC` then `Answer: N`, mul as reversed (generators.column_steps); "
                             "columns_mul: also mul by a one-digit number as `x*y+c=d cC` lines")
    reasoning_format: ReasoningFormat = Field(
        "plain", description="plain: the answer; steps: max/min/count_even/count_gt/next write one line per "
                             "list item (running extreme or count) or the rule's step, then `Answer: N`; "
                             "sort and greater stay plain (generators.reasoning_steps)")
    code_format: CodeFormat = Field(
        "plain", description="plain: the answer; steps: the value of each inner subexpression, innermost "
                             "first, one per line, then `Answer: <value>` (code_expr.evaluation_trace; "
                             "single operations and traces over 96 characters stay plain)")
    val_frac: float = Field(0.1, gt=0, lt=0.5)
    test_frac: float = Field(0.1, gt=0, lt=0.5)
    min_chars: int = Field(4, ge=1, description="prompt+target characters, lower bound")
    max_chars: int = Field(400, ge=8)
    min_tokens: int = Field(3, ge=1, description="prompt+target tokens, lower bound")
    max_tokens: int = Field(128, ge=4)
    near_dup_threshold: float = Field(0.9, gt=0, le=1, description="word-3-gram Jaccard")
    vocab_size: int = Field(1024, ge=260, le=65536, description="tokenizer vocabulary; 260 = the 256 bytes and "
                                                                 "4 special tokens, no merges (character level)")
    tokenizer_min_frequency: int = Field(2, ge=1)
    max_domain_share_deviation: float = Field(
        0.05, gt=0, le=1, description="gate: |share of a domain − 1/#domains| must stay below this")
    self_generate: SelfGenConfig = Field(default_factory=SelfGenConfig)

    @model_validator(mode="after")
    def _check_bounds(self) -> "DataConfig":
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be < max_chars ({self.max_chars})")
        if self.min_tokens >= self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be < max_tokens ({self.max_tokens})")
        if self.val_frac + self.test_frac >= 0.9:
            raise ValueError("val_frac + test_frac must leave at least 10% for train")
        return self


@dataclass
class Dataset:
    splits: dict[str, list[dict[str, Any]]]
    tokenizer: Tokenizer
    report: FilterReport


Completer = Callable[[list[str]], list[str]]


def self_generated_records(cfg: DataConfig, seed: int, complete: Completer) -> list[dict[str, Any]]:
    """Fresh task prompts answered by a model; target and answer are the model's words.

    The verifier filter later keeps only the ones the model got right (rejection sampling).
    """
    prompts = generate_tasks(cfg.self_generate.samples_per_domain, seed + 7919, cfg.math_steps_frac,
                             tuple(cfg.domains))
    completions = complete([p["prompt"] for p in prompts])
    out = []
    for rec, text in zip(prompts, completions):
        text = text.strip()
        out.append({**rec, "target": text, "answer": extract_answer(text), "source": "self"})
    return out


def build_dataset(cfg: DataConfig, seed: int, complete: Completer | None = None) -> Dataset:
    """Generate, filter, split and tokenize: the whole `generate` stage minus file I/O.

    The tokenizer is trained on the train split only; the token-length filter runs after it
    on every split, and its drops are counted in the same report.
    """
    records = generate_tasks(cfg.n_per_domain, seed, cfg.math_steps_frac, tuple(cfg.domains), cfg.math_format,
                             cfg.reasoning_format, cfg.code_format)
    for r in records:
        r["source"] = "procedural"
    if complete is not None and cfg.self_generate.samples_per_domain > 0:
        records += self_generated_records(cfg, seed, complete)
    kept, report = apply_filters(records, min_chars=cfg.min_chars, max_chars=cfg.max_chars,
                                 near_dup_threshold=cfg.near_dup_threshold)
    splits = split_records(kept, cfg.val_frac, cfg.test_frac, seed)
    tok = train_tokenizer((training_text(r) for r in splits["train"]), cfg.vocab_size,
                          cfg.tokenizer_min_frequency)
    for name in SPLITS:
        survivors = []
        for i, rec in enumerate(splits[name]):
            n_tok = len(tok.encode(training_text(rec)).ids)
            if n_tok < cfg.min_tokens:
                report.drop("too_few_tokens", rec)
            elif n_tok > cfg.max_tokens:
                report.drop("too_many_tokens", rec)
            else:
                survivors.append({"id": f"{name}-{i:06d}", **rec, "n_tokens": n_tok})
        splits[name] = survivors
    return Dataset(splits=splits, tokenizer=tok, report=report)


__all__ = ["ANSWER_MARK", "DataConfig", "Dataset", "SelfGenConfig", "build_dataset", "DOMAINS", "SPLITS"]
