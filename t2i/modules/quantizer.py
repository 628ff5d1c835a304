"""VectorQuantizer: the codebook every tokenizer in t2i uses (VQGAN, VQ-SEG, ...).

Distances are never computed here: the lookup is `t2i_kernels.vq_lookup` (fused kernel on
GPU, chunked GEMM on CPU) and the per-code statistics `vq_stats`.

Two ways to learn the codebook:
- EMA (default, van den Oord et al. 2017 appendix; Razavi et al. 2019): codes move to the
  running mean of the vectors assigned to them; only the commitment loss is trained.
- learned: the codebook is a parameter trained by the codebook loss ||sg(z) - e||^2.
Both: commitment loss beta * ||z - sg(e)||^2, straight-through output, k-means init from
the first training batch, restart of dead codes from recent inputs, usage and perplexity.
Under torch.distributed, statistics are summed over ranks and initialisations/restarts
are broadcast from rank 0, so every rank keeps the same codebook.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from t2i_kernels import vq_lookup, vq_stats


@dataclass
class QuantizerConfig:
    num_codes: int = 512  # K: codebook size
    dim: int = 64  # D: code vector size
    beta: float = 0.25  # commitment loss weight
    ema: bool = True  # EMA codebook updates (else a learned codebook parameter)
    decay: float = 0.99  # EMA decay of counts and sums
    eps: float = 1e-5  # Laplace smoothing of EMA counts
    metric: str = "l2"  # "l2" or "cosine" (codes and inputs on the unit sphere)
    kmeans_init: bool = True  # initialise codes by k-means on the first training batch
    kmeans_iters: int = 10
    dead_threshold: float = 0.01  # codes whose EMA usage (per step) falls below are restarted
    channel_first: bool = False  # inputs [B, D, ...] (conv features) instead of [..., D]


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # like the input: straight-through (value of the codes)
    indices: torch.Tensor  # long, the input's shape without D
    loss: torch.Tensor  # commitment (+ codebook loss when learned), scalar
    perplexity: torch.Tensor  # exp(entropy) of this batch's code histogram, scalar
    usage: torch.Tensor  # fraction of codes used in this batch, scalar


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class VectorQuantizer(nn.Module):
    """z [..., D] (or [B, D, ...] with channel_first) -> QuantizerOutput.

    >>> vq = VectorQuantizer(QuantizerConfig(num_codes=512, dim=64))
    >>> out = vq(torch.randn(8, 16, 16, 64))
    >>> out.quantized.shape, out.indices.shape        # [8, 16, 16, 64], [8, 16, 16]
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        if config.metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', got {config.metric!r}")
        self.config = config
        k, d = config.num_codes, config.dim
        codebook = torch.randn(k, d)
        if config.metric == "cosine":
            codebook = F.normalize(codebook, dim=-1)
        if config.ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_count", torch.ones(k))
            self.register_buffer("ema_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("usage_ema", torch.ones(k))  # mean uses per step, for restarts
        self.register_buffer("initialized", torch.tensor(not config.kmeans_init))

    # ------------------------------------------------------------------ helpers

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.channel_first:
            z = z.movedim(1, -1)
        if z.shape[-1] != self.config.dim:
            raise ValueError(f"VectorQuantizer(dim={self.config.dim}) got inputs with "
                             f"D={z.shape[-1]} (shape {tuple(z.shape)}; "
                             f"channel_first={self.config.channel_first})")
        return z.reshape(-1, self.config.dim)

    def _unflat(self, flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        shape = like.movedim(1, -1).shape if self.config.channel_first else like.shape
        out = flat.reshape(shape)
        return out.movedim(-1, 1) if self.config.channel_first else out

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.config.metric == "cosine" else x

    def _set_codes(self, codes: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Replace all codes (or those under `mask`), with rank 0's values everywhere."""
        codes = self._normalise(codes.detach().float())
        if _distributed():
            torch.distributed.broadcast(codes, src=0)
        with torch.no_grad():
            if mask is None:
                self.codebook.copy_(codes)
            else:
                self.codebook[mask] = codes[mask]
            if self.config.ema:  # restart the running means at the new codes
                if mask is None:
                    self.ema_count.fill_(1.0)
                else:
                    self.ema_count[mask] = 1.0
                self.ema_sum.copy_(self.codebook * self.ema_count[:, None])

    def _sample_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        idx = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        return flat[idx]

    @torch.no_grad()
    def kmeans_init(self, flat: torch.Tensor) -> None:
        """Lloyd's k-means on these vectors (sampled with replacement if there are fewer
        than K), using the lookup kernel for the assignments. A centre that wins no vector
        is moved to a random one, so no code starts dead."""
        flat = self._normalise(flat.detach().float())
        k = self.config.num_codes
        centres = self._sample_rows(flat, k)
        for _ in range(self.config.kmeans_iters):
            idx, _ = vq_lookup(flat, centres, metric=self.config.metric)
            stats = vq_stats(idx, flat, k)
            used = stats.counts > 0
            centres[used] = self._normalise(stats.sums[used] / stats.counts[used, None])
            centres[~used] = self._sample_rows(flat, int((~used).sum()))
        self._set_codes(centres)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        cfg = self.config
        self.ema_count.mul_(cfg.decay).add_(counts, alpha=1 - cfg.decay)
        self.ema_sum.mul_(cfg.decay).add_(sums, alpha=1 - cfg.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + cfg.eps) / (total + cfg.num_codes * cfg.eps) * total
        self.codebook.copy_(self._normalise(self.ema_sum / smoothed[:, None]))

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor) -> None:
        dead = self.usage_ema < self.config.dead_threshold
        if _distributed():
            torch.distributed.broadcast(dead, src=0)
        if dead.any():
            self._set_codes(self._sample_rows(flat.detach().float(), self.config.num_codes),
                            mask=dead)
            self.usage_ema[dead] = 1.0

    # ------------------------------------------------------------------ forward

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        cfg = self.config
        flat = self._flat(z)
        if self.training and not bool(self.initialized):
            self.kmeans_init(flat)
        flat_n = self._normalise(flat)
        # detached input: the codebook loss must not reach z, the commitment loss does below
        idx, codes = vq_lookup(flat_n.detach(), self.codebook, metric=cfg.metric)
        codes = codes.to(flat.dtype)

        stats = vq_stats(idx, flat_n.detach(), cfg.num_codes)
        counts, sums = stats.counts, stats.sums
        if self.training:
            if _distributed():
                torch.distributed.all_reduce(counts)
                torch.distributed.all_reduce(sums)
            with torch.no_grad():
                per_step = counts / counts.sum().clamp_min(1) * cfg.num_codes
                self.usage_ema.mul_(cfg.decay).add_(per_step, alpha=1 - cfg.decay)
            if cfg.ema:
                self._ema_update(counts, sums)

        loss = cfg.beta * F.mse_loss(flat_n, codes.detach())
        if not cfg.ema:
            loss = loss + F.mse_loss(codes, flat_n.detach())
        if self.training and cfg.dead_threshold > 0:
            self._restart_dead(flat)

        quantized = flat_n + (codes - flat_n).detach()  # straight-through
        lead = (z.shape[0], *z.shape[2:]) if cfg.channel_first else z.shape[:-1]
        probs = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
        return QuantizerOutput(self._unflat(quantized, z), idx.view(lead), loss, perplexity,
                               (counts > 0).float().mean())

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of indices [...] -> [..., D] (or [B, D, ...] with channel_first)."""
        codes = self.codebook[indices]
        return codes.movedim(-1, 1) if self.config.channel_first else codes
