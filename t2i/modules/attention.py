"""Attention layers every transformer in t2i is built from.

- `Attention`: multi-head self- or cross-attention on `t2i_kernels.masked_attention`, with
  rotary positions and an optional `KVCache` for token-by-token decoding.
- `LearnedPositions`: absolute position embeddings added to token embeddings; over an
  image's grid they start from `grid_positions` (2D sine-cosine features).
- `TransformerBlock`: pre-norm self-attention, optional cross-attention, MLP.

Masks are passed straight to the kernel: causal, prefix_len (Make-A-Scene's text + scene
prefix), key_padding_mask (True = keep) and attn_mask (True = attend).
"""

import math

import torch
from torch import nn

from t2i_kernels import masked_attention


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), half-split pairing: [B, H, L, Dh]."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, H, L, Dh], positions long [L] -> x rotated by its positions."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [L, Dh/2]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of the positions decoded so far, preallocated:
    [B, H, max_len, Dh] each. `append` adds new positions and returns all of them."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        self.k = torch.empty(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2]
        if self.length + n > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; "
                             f"{self.length} + {n} do not fit")
        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v
        self.length += n
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class Attention(nn.Module):
    """Multi-head attention. x [B, L, dim] -> [B, L, dim].

    Cross-attention when context_dim is given (keys and values from `context`); rotary
    positions (self-attention) when rotary=True; with a KVCache, x holds only the new
    positions and attends to everything cached before them.
    """

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None,
                 dropout: float = 0.0, rotary: bool = False, bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.cross = context_dim is not None
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)
        self.dropout = dropout
        self.rotary = RotaryEmbedding(self.head_dim) if rotary and not self.cross else None

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [B, L, dim] -> [B, H, L, Dh]
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                causal: bool = False, prefix_len=None, key_padding_mask=None, attn_mask=None,
                cache: KVCache | None = None) -> torch.Tensor:
        if self.cross != (context is not None):
            raise ValueError("cross-attention needs a context; self-attention takes none")
        q = self._heads(self.q(x))  # [B, H, Lq, Dh]
        k, v = (self._heads(t) for t in self.kv(context if self.cross else x).chunk(2, -1))
        if self.rotary is not None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + x.shape[1], device=x.device)
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            k, v = cache.append(k, v)
        out = masked_attention(q, k, v, causal=causal, prefix_len=prefix_len,
                               key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                               dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).flatten(2))  # [B, Lq, dim]


def grid_positions(grid: int, dim: int) -> torch.Tensor:
    """2D sine-cosine features of a grid x grid raster (row-major) -> [grid^2, dim]: sin and
    cos of x in the first half of the channels, of y in the second, at dim / 4 frequencies
    from pi/2 a position down to ~pi/200. Neighbours start out alike and distant positions
    apart, so a model need not learn the grid's geometry from scratch."""
    if dim % 4:
        raise ValueError(f"grid positions need a width divisible by 4, got {dim}")
    q = dim // 4
    freq = (math.pi / 2) / 100 ** (torch.arange(q, dtype=torch.float64) / q)
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                          torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (x, y):
        angles = coord.flatten()[:, None] * freq
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, 1).float()


class LearnedPositions(nn.Module):
    """Absolute learned position embeddings: x [B, L, dim] -> x + pos[offset:offset+L].
    With `grid` (max_len = grid^2 image positions) they start as `grid_positions`, else as
    small random vectors."""

    def __init__(self, max_len: int, dim: int, grid: int | None = None):
        super().__init__()
        if grid is None:
            init = torch.randn(max_len, dim) * 0.02
        elif grid * grid != max_len:
            raise ValueError(f"a {grid} x {grid} grid has {grid * grid} positions, not {max_len}")
        else:
            init = grid_positions(grid, dim)
        self.embedding = nn.Parameter(init)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if offset + x.shape[1] > self.embedding.shape[0]:
            raise ValueError(f"positions up to {offset + x.shape[1]} exceed the "
                             f"{self.embedding.shape[0]} learned ones")
        return x + self.embedding[offset:offset + x.shape[1]]


class TransformerBlock(nn.Module):
    """Pre-norm block: x + SelfAttn(LN x) [+ CrossAttn(LN x, context)] + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, *, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 rotary: bool = False, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout=dropout, rotary=rotary)
        self.cross = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross = Attention(dim, heads, context_dim=context_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.mlp_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, context=None, context_mask=None, causal=False,
                prefix_len=None, key_padding_mask=None, attn_mask=None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=causal, prefix_len=prefix_len,
                          key_padding_mask=key_padding_mask, attn_mask=attn_mask, cache=cache)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, key_padding_mask=context_mask)
        return x + self.mlp_dropout(self.mlp(self.norm2(x)))

