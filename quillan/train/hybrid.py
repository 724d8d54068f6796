"""The hybrid trust-region optimizer (seed note 003), `train.optimizer: hybrid`.

Three parts, each usable alone:

1. Data clustering: k-means (Lloyd 1982, k-means++ seeding, Arthur & Vassilvitskii 2007) of the
   training examples' token statistics, and `ClusterBalancedSampler`, whose batches draw the
   clusters in turn (every cluster gets the same share of each batch, whatever its size).
2. `TrustRegionController`: a small network that maps the training state (loss, gradient norm,
   the batch's worst cluster, loss trend, gradient variance, progress) to a learning-rate
   multiplier and a trust-region radius. It is a Gaussian policy trained online by REINFORCE
   (Williams 1992) on the loss reduction each choice produced: reward log(L_t / L_{t+1}).
3. `HybridTrustRegion`: AdamW whose step is scaled by that multiplier and then clipped to the
   radius, ‖Δθ‖₂ ≤ r (seed note 003 "Stage 3: Constrained Update"), with r relative to ‖θ‖₂;
   optionally the update is ternary-quantized first (absmean, per tensor).

No Lightning here: the optimizer is a plain `torch.optim.Optimizer` that takes a closure.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import Sampler

from quillan.bitnet import ternary_quantize


class HybridConfig(BaseModel):
    """`train.hybrid`: knobs of the hybrid trust-region optimizer (used when `train.optimizer: hybrid`)."""

    model_config = ConfigDict(extra="forbid")
    clusters: int = Field(8, ge=1, description="k-means clusters of the training examples (token statistics)")
    kmeans_iters: int = Field(25, ge=1, description="Lloyd iterations")
    radius: float = Field(0.02, gt=0, description="base trust-region radius, as a share of ‖θ‖₂")
    radius_range: float = Field(4.0, ge=1, description="the controller scales the radius within [1/r, r]×")
    lr_range: float = Field(4.0, ge=1, description="the controller's LR multiplier lies within [1/r, r]")
    hidden: int = Field(16, ge=1, description="hidden width of the controller network")
    controller_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the controller")
    exploration: float = Field(0.1, gt=0, description="σ of the controller's Gaussian policy (pre-tanh units)")
    ternary_update: bool = Field(False, description="ternary-quantize each tensor's update (absmean) before the clip")


# -- 1. clustering ---------------------------------------------------------------------------------
def token_histograms(sequences: list[list[int]], vocab_size: int) -> torch.Tensor:
    """(N, vocab_size) float: each sequence's token counts, square-rooted and L2-normalized (so
    k-means on it compares token mixes, not lengths)."""
    rows = torch.repeat_interleave(torch.arange(len(sequences)), torch.tensor([len(s) for s in sequences]))
    cols = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    if len(cols) and int(cols.max()) >= vocab_size:
        raise ValueError(f"token id {int(cols.max())} is outside the vocabulary ({vocab_size})")
    h = torch.zeros(len(sequences), vocab_size)
    h.index_put_((rows, cols), torch.ones(len(cols)), accumulate=True)
    h = h.sqrt()
    return h / h.norm(dim=1, keepdim=True).clamp(min=1e-12)


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of rows x (N, d): (labels (N,) long, centroids (k, d)). k-means++ seeding from a
    generator seeded by `seed`, then Lloyd iterations until no label changes or `iters`; an
    emptied cluster takes the point farthest from its centroid. Deterministic on CPU."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k}, N={n}")
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(n, (1,), generator=g)]
    d2 = torch.cdist(x, centroids).squeeze(1) ** 2
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
        nxt = x[torch.multinomial(probs, 1, generator=g)]
        centroids = torch.cat([centroids, nxt])
        d2 = torch.minimum(d2, (torch.cdist(x, nxt).squeeze(1)) ** 2)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(x, centroids)
        new = dist.argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        for c in torch.nonzero(counts == 0).flatten().tolist():
            far = int(dist.gather(1, labels[:, None]).squeeze(1).argmax())
            labels[far] = c
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = sums / counts[:, None].clamp(min=1)
    return labels, centroids


class ClusterBalancedSampler(Sampler[list[int]]):
    """Batches whose slots take the clusters in turn: slot j of step s draws from cluster
    (s·B + j) mod K, so every cluster fills B/K of each batch (±1). Each cluster is read through
    its own seeded permutations, a fresh one each time it runs out (small clusters repeat, large
    ones are sampled). Batch s is a pure function of (labels, seed, s), like StepBatchSampler,
    so a resumed run sees the same batches."""

    def __init__(self, labels: torch.Tensor, batch_size: int, total_steps: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.labels = labels.long()
        self.k = int(self.labels.max()) + 1
        self.members = [torch.nonzero(self.labels == c).flatten() for c in range(self.k)]
        if any(len(m) == 0 for m in self.members):
            raise ValueError("every cluster needs at least one example")
        self.bs, self.total, self.seed, self.rank, self.world = batch_size, total_steps, seed, rank, world_size
        self._streams: dict[tuple[int, int], list[int]] = {}

    def _draws_before(self, step: int, cluster: int) -> int:
        """Slots of cluster `cluster` in steps [0, step): slots 0 .. step·B - 1 taken mod K."""
        slots = step * self.bs
        return slots // self.k + (1 if cluster < slots % self.k else 0)

    def _stream(self, cluster: int, cycle: int) -> list[int]:
        key = (cluster, cycle)
        if key not in self._streams:
            if len(self._streams) > 4 * self.k:
                self._streams.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + cluster * 7919 + cycle)
            m = self.members[cluster]
            self._streams[key] = m[torch.randperm(len(m), generator=g)].tolist()
        return self._streams[key]

    def _draw(self, cluster: int, position: int) -> int:
        cycle, offset = divmod(position, len(self.members[cluster]))
        return self._stream(cluster, cycle)[offset]

    def batch_indices(self, step: int) -> list[int]:
        rows, seen = [], {}
        for j in range(self.bs):
            c = (step * self.bs + j) % self.k
            seen[c] = seen.get(c, self._draws_before(step, c) - 1) + 1
            rows.append(self._draw(c, seen[c]))
        return rows[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.total):
            yield self.batch_indices(step)

    def __len__(self) -> int:
        return self.total


# -- 2. the controller --------------------------------------------------------------------------------
N_FEATURES = 6


def state_features(loss: float, grad_norm: float, cluster: int, n_clusters: int, prev_loss: float | None,
                   grad_var: float, progress: float) -> torch.Tensor:
    """The controller's input (6,): log loss, log ‖g‖₂, worst cluster id / (K − 1), loss trend
    log(L_t / L_{t−1}) (0 at the first step), log10 of the gradient's variance over its
    coordinates / 10, and training progress in [0, 1]."""
    trend = math.log(loss / prev_loss) if prev_loss else 0.0
    return torch.tensor([math.log(max(loss, 1e-12)), math.log(max(grad_norm, 1e-12)),
                         cluster / max(n_clusters - 1, 1), trend, math.log10(max(grad_var, 1e-30)) / 10, progress])


class TrustRegionController(nn.Module):
    """Gaussian policy over two pre-tanh actions a = (a_lr, a_r) ~ N(μ(φ), σ²):
    LR multiplier exp(tanh(a_lr)·ln lr_range), radius share radius·exp(tanh(a_r)·ln radius_range).
    The output layer starts at zero, so the first choices centre on multiplier 1 and the base radius.
    """

    def __init__(self, cfg: HybridConfig, seed: int):
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(nn.Linear(N_FEATURES, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, 2))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.net[0].weight.copy_(torch.randn(self.net[0].weight.shape, generator=g) / math.sqrt(N_FEATURES))
            self.net[0].bias.zero_()
            self.net[2].weight.zero_()
            self.net[2].bias.zero_()
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.controller_lr)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.baseline = 0.0
        self.n_updates = 0

    def decode(self, action: torch.Tensor) -> tuple[float, float]:
        """(LR multiplier, radius as a share of ‖θ‖₂) for a pre-tanh action (2,)."""
        t = torch.tanh(action)
        return (math.exp(float(t[0]) * math.log(self.cfg.lr_range)),
                self.cfg.radius * math.exp(float(t[1]) * math.log(self.cfg.radius_range)))

    def act(self, features: torch.Tensor) -> torch.Tensor:
        """A sampled pre-tanh action (2,) for features (6,)."""
        with torch.no_grad():
            mu = self.net(features)
        return mu + self.cfg.exploration * torch.randn(2, generator=self.gen)

    def learn(self, features: torch.Tensor, action: torch.Tensor, reward: float) -> float:
        """One REINFORCE step: raise log π(action | features) in proportion to reward − baseline
        (baseline: a running mean of rewards, 0.9 decay). Returns the advantage."""
        advantage = reward - self.baseline
        self.baseline = reward if self.n_updates == 0 else 0.9 * self.baseline + 0.1 * reward
        self.n_updates += 1
        with torch.enable_grad():
            mu = self.net(features)
            log_prob = -((action - mu) ** 2).sum() / (2 * self.cfg.exploration ** 2)
            loss = -advantage * log_prob
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.opt.step()
        return advantage

    def get_state(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "gen": self.gen.get_state(),
                "baseline": self.baseline, "n_updates": self.n_updates}

    def set_state(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        self.baseline, self.n_updates = state["baseline"], state["n_updates"]


# -- 3. the constrained update ------------------------------------------------------------------------
def clip_to_radius(deltas: list[torch.Tensor], radius: float) -> tuple[list[torch.Tensor], float, bool]:
    """Scale the update (a list of tensors, one vector) so that its global L2 norm is at most
    `radius`: (scaled, norm before, whether the clip was active)."""
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in deltas))
    if norm <= radius:
        return deltas, norm, False
    scale = radius / norm
    return [d * scale for d in deltas], norm, True


def ternary_update(delta: torch.Tensor) -> torch.Tensor:
    """`scale · q` with q ∈ {−1, 0, 1}: the absmean ternary quantization (BitNet b1.58, eq. 1-3) of
    one tensor's update."""
    q, scale = ternary_quantize(delta)
    return q.to(delta.dtype) * scale


class HybridTrustRegion(torch.optim.AdamW):
    """AdamW with the controller's LR multiplier and the trust-region clip (module docstring).

    `step(closure)` needs the closure (it reads the loss). Before each step, the caller may set
    `worst_cluster` (the cluster whose examples had the highest loss in this batch). After it,
    `last` holds {lr_multiplier, radius, update_norm, clipped, advantage}.
    """

    def __init__(self, params, cfg: HybridConfig, total_steps: int, seed: int, **adamw_kw):
        super().__init__(params, **adamw_kw)
        self.hybrid_cfg, self.total_steps = cfg, total_steps
        self.controller = TrustRegionController(cfg, seed)
        self.worst_cluster = 0
        self.steps_done = 0
        self.prev_loss: float | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (features, action) awaiting its reward
        self.last: dict[str, float] = {}

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise ValueError("HybridTrustRegion.step needs a closure (it reads the loss)")
        with torch.enable_grad():
            loss_t = closure()
        loss = float(loss_t)
        params = self._params()
        grads = torch.cat([p.grad.reshape(-1).float() for p in params]) if params else torch.zeros(1)
        grad_norm = float(grads.norm())
        grad_var = float(grads.var(unbiased=False)) if grads.numel() > 1 else 0.0
        feats = state_features(loss, grad_norm, self.worst_cluster, self.hybrid_cfg.clusters, self.prev_loss,
                               grad_var, self.steps_done / max(self.total_steps, 1))
        advantage = 0.0
        if self.pending is not None and self.prev_loss:
            advantage = self.controller.learn(*self.pending, reward=math.log(self.prev_loss / max(loss, 1e-12)))
        action = self.controller.act(feats)
        lr_mult, radius_share = self.controller.decode(action)
        self.pending, self.prev_loss = (feats, action), loss

        before = [p.detach().clone() for p in params]
        lrs = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = group["lr"] * lr_mult
        super().step()
        for group, lr in zip(self.param_groups, lrs):
            group["lr"] = lr
        deltas = [p - b for p, b in zip(params, before)]
        if self.hybrid_cfg.ternary_update:
            deltas = [ternary_update(d) for d in deltas]
        theta_norm = math.sqrt(sum(float(b.double().pow(2).sum()) for b in before))
        radius = radius_share * theta_norm
        deltas, norm, clipped = clip_to_radius(deltas, radius)
        for p, b, d in zip(params, before, deltas):
            p.copy_(b + d)
        self.steps_done += 1
        self.last = {"lr_multiplier": lr_mult, "radius": radius, "update_norm": min(norm, radius),
                     "clipped": float(clipped), "advantage": advantage}
        return loss_t

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["hybrid"] = {"controller": self.controller.get_state(), "steps_done": self.steps_done,
                           "prev_loss": self.prev_loss, "pending": self.pending}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        hybrid = state_dict.pop("hybrid", None)
        super().load_state_dict(state_dict)
        if hybrid is not None:
            self.controller.set_state(hybrid["controller"])
            self.steps_done, self.prev_loss, self.pending = hybrid["steps_done"], hybrid["prev_loss"], hybrid["pending"]
