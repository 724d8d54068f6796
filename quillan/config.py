"""`QuillanConfig`: the model's shape, with named presets (smoke, cpu, gpu).

Field docs state units. Presets are plain data in `PRESETS`; `QuillanConfig.preset(name,
**overrides)` builds one. The pipeline's params.yaml `model:` section takes the same keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from quillan.bitnet import QUANT_METHODS, QUANT_PLANS

DIGIT_ORDERS = ("msb", "lsb")


@dataclass
class QuillanConfig:
    vocab_size: int = 1024            # tokens (the pipeline sets it from the trained tokenizer)
    dim: int = 128                    # model width d
    n_layers: int = 4
    n_heads: int = 4                  # attention query heads; head_dim = dim // n_heads
    n_kv_heads: int = 2               # key/value heads (GQA); must divide n_heads
    max_seq_len: int = 256            # positions (RoPE table size, KV cache length)
    rope_theta: float = 10000.0
    # Numbers (McLeish et al. 2024, arXiv 2405.17399): the model reads and writes digits
    digit_order: str = "msb"          # msb: as typed; lsb: every digit run reversed in and out (quillan.data.tokenizer.model_text)
    digit_positions: int = 0          # Abacus: embed a digit's index in its number, 1..this (clipped); 0 = off
    digit_ids: tuple[int, ...] = ()   # token ids of "0".."9" (the pipeline sets them from the tokenizer)
    tie_embeddings: bool = True       # output head shares the token embedding
    norm_eps: float = 1e-5
    # Council feed-forward (seed notes 000, 001): overseer → M mini-MoEs (E experts each) + micro agents
    council_every: int = 1            # council FFN in every k-th block (others: dense SwiGLU)
    dense_hidden: int = 256           # hidden width of dense SwiGLU blocks
    n_council: int = 4                # M mini-MoEs (council members)
    council_top_k: int = 2            # members the overseer keeps per token
    n_experts: int = 4                # E SwiGLU experts per mini-MoE
    expert_top_k: int = 2             # experts per member per token (top-2)
    expert_hidden: int = 128          # hidden width of one expert
    n_micro: int = 16                 # P micro agents per mini-MoE (PEER-style single neurons); 0 = none
    micro_top_k: int = 4              # micro agents retrieved per token and member
    micro_key_dim: int = 32           # query/key width of the micro-agent retrieval
    # Diffusion refinement (seed note 000): a weight-shared denoiser applied diffusion_steps times
    diffusion_steps: int = 2          # 0 removes the denoiser
    diffusion_hidden: int = 128
    # Inference
    early_exit_threshold: float = 1.01  # > 1 disables early exit
    # Quantization
    quantize: bool = True             # False: every BitLinear is a plain Linear (FP reference)
    act_quant: bool = True            # 8-bit per-token activations in BitLinear
    per_channel: bool = False         # per-output-channel weight scales (default: per tensor)
    quant_method: str = "absmean"     # absmean (BitNet b1.58) or tequila (+ dead-zone bias); params: quant.method
    tequila_lambda: float = 1e-3      # λ of tequila's dead-zone bias; params: quant.tequila_lambda
    quant_plan: str = "uniform"       # uniform | adaptive (micro agents binary); params: quant.plan
    linear_bias: bool = False         # BitLinears carry a bias (fp16 copies of tequila models fold it in)
    grad_checkpointing: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.digit_ids = tuple(self.digit_ids)  # config.json stores a list
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "council_every",
                     "dense_hidden", "n_council", "council_top_k", "n_experts", "expert_top_k", "expert_hidden",
                     "micro_key_dim", "diffusion_hidden"):
            need(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_micro", "micro_top_k", "diffusion_steps"):
            need(getattr(self, name) >= 0, f"model.{name} must be >= 0, got {getattr(self, name)}")
        need(self.dim % self.n_heads == 0, f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        need((self.dim // self.n_heads) % 2 == 0, f"model.dim / model.n_heads must be even for RoPE, got {self.dim // self.n_heads}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_heads ({self.n_heads})")
        need(self.council_top_k <= self.n_council,
             f"model.council_top_k ({self.council_top_k}) must be <= model.n_council ({self.n_council})")
        need(self.expert_top_k <= self.n_experts,
             f"model.expert_top_k ({self.expert_top_k}) must be <= model.n_experts ({self.n_experts})")
        need(self.n_micro == 0 or self.micro_top_k <= self.n_micro,
             f"model.micro_top_k ({self.micro_top_k}) must be <= model.n_micro ({self.n_micro})")
        need(self.digit_order in DIGIT_ORDERS,
             f"model.digit_order must be one of {', '.join(DIGIT_ORDERS)}, got {self.digit_order!r}")
        need(self.digit_positions >= 0, f"model.digit_positions must be >= 0, got {self.digit_positions}")
        need(self.digit_positions == 0 or len(self.digit_ids) == 10,
             f"model.digit_positions > 0 needs the 10 digit token ids (digit_ids), got {len(self.digit_ids)}")
        need(all(0 <= i < self.vocab_size for i in self.digit_ids),
             f"model.digit_ids must lie in [0, vocab_size={self.vocab_size}), got {list(self.digit_ids)}")
        need(self.early_exit_threshold > 0, f"model.early_exit_threshold must be > 0, got {self.early_exit_threshold}")
        need(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        need(self.quant_method in QUANT_METHODS,
             f"quant.method must be one of {', '.join(QUANT_METHODS)}, got {self.quant_method!r}")
        need(self.quant_plan in QUANT_PLANS,
             f"quant.plan must be one of {', '.join(QUANT_PLANS)}, got {self.quant_plan!r}")
        need(self.tequila_lambda >= 0, f"quant.tequila_lambda must be >= 0, got {self.tequila_lambda}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def has_council(self, layer: int) -> bool:
        """Whether block `layer` (0-based) uses the council FFN (every k-th block, the last included)."""
        return (self.n_layers - 1 - layer) % self.council_every == 0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "QuillanConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r} (one of: {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # about 0.1 M parameters: for tests
    "smoke": dict(vocab_size=384, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                  dense_hidden=128, n_council=2, council_top_k=1, n_experts=4, expert_top_k=2, expert_hidden=16,
                  n_micro=8, micro_top_k=2, micro_key_dim=16, diffusion_steps=1, diffusion_hidden=64),
    # 1-5 M parameters: learns the generated tasks on 2 cores in minutes
    "cpu": dict(vocab_size=1024, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=192,
                dense_hidden=256, n_council=4, council_top_k=2, n_experts=4, expert_top_k=2, expert_hidden=128,
                n_micro=16, micro_top_k=4, micro_key_dim=32, diffusion_steps=2, diffusion_hidden=128),
    # seed note 000's full size
    "gpu": dict(vocab_size=50257, dim=512, n_layers=6, n_heads=8, n_kv_heads=8, max_seq_len=2048,
                dense_hidden=1536, n_council=32, council_top_k=2, n_experts=8, expert_top_k=2, expert_hidden=128,
                n_micro=325, micro_top_k=8, micro_key_dim=64, diffusion_steps=10, diffusion_hidden=1024,
                grad_checkpointing=True),
}
