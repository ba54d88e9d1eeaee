"""Vector quantisers for the image VQ-VAE and the audio codec.

`VectorQuantizer`: a codebook updated by exponential moving averages (no gradient
reaches the codes), initialised from the first batch it sees, whose unused codes
are restarted on live encoder outputs, so the codebook does not collapse.
`ResidualVQ`: a stack of them, each quantising what the previous ones left over.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, decay: float = 0.95, eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.dim, self.decay, self.eps = codebook_size, dim, decay, eps
        self.register_buffer("codebook", torch.zeros(codebook_size, dim))
        self.register_buffer("ema_count", torch.zeros(codebook_size))
        self.register_buffer("ema_sum", torch.zeros(codebook_size, dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """`[N, D]` vectors -> `[N]` int64 index of the nearest code (squared L2)."""
        dist = (z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.t()
                + self.codebook.pow(2).sum(1)[None, :])  # [N, K]
        return dist.argmin(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes `[...]` -> vectors `[..., D]`."""
        return F.embedding(codes, self.codebook)

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None):
        """`[N, D]` -> (quantised `[N, D]` with a straight-through gradient, codes `[N]`,
        commitment loss). In training mode it also updates the codebook by EMA."""
        if self.training and not bool(self.initialised):
            self._init_from(z.detach(), generator)
        codes = self.nearest(z.detach())
        if self.training:
            self._ema_update(z.detach(), codes)
        zq = self.lookup(codes)
        commit = F.mse_loss(z, zq.detach())
        return z + (zq - z).detach(), codes, commit

    @torch.no_grad()
    def _init_from(self, z: torch.Tensor, generator: torch.Generator | None) -> None:
        pick = torch.randint(0, z.shape[0], (self.codebook_size,), generator=generator)
        self.codebook.copy_(z[pick])
        self.ema_sum.copy_(z[pick])
        self.ema_count.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, self.codebook_size).type_as(z)  # [N, K]
        self.ema_count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(onehot.t() @ z, alpha=1 - self.decay)
        n = self.ema_count.sum()
        count = (self.ema_count + self.eps) / (n + self.codebook_size * self.eps) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_sum / count[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, generator: torch.Generator | None = None,
                           threshold: float = 0.05) -> int:
        """Move every code whose EMA usage is below `threshold` (expected hits per batch)
        onto a random vector of `z` `[N, D]`; returns how many moved."""
        dead = torch.nonzero(self.ema_count < threshold).flatten()
        if dead.numel() == 0:
            return 0
        pick = torch.randint(0, z.shape[0], (dead.numel(),), generator=generator)
        self.codebook[dead] = z[pick]
        self.ema_sum[dead] = z[pick]
        self.ema_count[dead] = 1.0
        return int(dead.numel())


class ResidualVQ(nn.Module):
    """`n_stages` quantisers; stage j encodes the residual left by stages < j."""

    def __init__(self, n_stages: int, codebook_size: int, dim: int, decay: float = 0.95):
        super().__init__()
        self.stages = nn.ModuleList(VectorQuantizer(codebook_size, dim, decay) for _ in range(n_stages))

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None):
        """`[N, D]` -> (quantised `[N, D]` straight-through, codes `[N, n_stages]`, commit loss)."""
        residual = z
        total = torch.zeros_like(z)
        codes, commit = [], z.new_zeros(())
        for vq in self.stages:
            q, c, loss = vq(residual, generator)
            residual = residual - q.detach()
            total = total + q.detach()
            codes.append(c)
            commit = commit + loss
        return z + (total - z).detach(), torch.stack(codes, dim=1), commit

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """`[N, D]` -> codes `[N, n_stages]` (no codebook update)."""
        residual, codes = z, []
        for vq in self.stages:
            c = vq.nearest(residual)
            residual = residual - vq.lookup(c)
            codes.append(c)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes `[N, n_stages]` -> `[N, D]`."""
        return sum(vq.lookup(codes[:, j]) for j, vq in enumerate(self.stages))

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, generator: torch.Generator | None = None,
                           threshold: float = 0.05) -> int:
        """Restart dead codes of every stage on that stage's residuals of `z` `[N, D]`."""
        moved, residual = 0, z
        for vq in self.stages:
            moved += vq.restart_dead_codes(residual, generator, threshold)
            residual = residual - vq.lookup(vq.nearest(residual))
        return moved
