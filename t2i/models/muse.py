"""Muse / MaskGIT (Chang et al. 2022, 2023): a bidirectional transformer that fills in
masked image tokens, conditioned on text (or a class), decoded in a few parallel steps.

    caption ids [B, T] -> TextEncoder -> context [B, T, C]            (or class -> [B, 1, C])
    image -> frozen VQGAN -> tokens [B, N]; some replaced by [MASK] (id = num_codes)
    tokens -> embed (+ painters: the layout's embedding) + positions
           -> blocks (self-attn, cross-attn to context, MLP,
              optionally a depthwise convolution over the position grid: `local_kernel`)
           -> logits over the codebook [B, N, num_codes]

Training masks a share of the tokens drawn from the schedule (cosine by default) and
scores the masked ones only, through `linear_cross_entropy` (no [B, N, V] logits kept);
the condition is replaced by a learned null one with probability `cond_dropout`, which is
what classifier-free guidance needs. Optional self-conditioning feeds the previous pass's
hidden states back in. A super-resolution stage is the same model with the low-resolution
stage's tokens appended to its context (`low_res_codes` > 0). Layout first (the default
run): a layout model (stage "layout", `layout_model`) learns each layout cell's
segmentation class from the caption alone, every image token masked; a painter
(`model.layout`: that run) learns the tokens with the true layout embedded in its input and
generates on the layout model's. Decoding: t2i.generate.
"""

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from t2i.data.scenes import (
    COLOUR_NAMES,
    COLOURS,
    SHAPES,
    Renderer,
    permute_colours,
    slot_layout,
    swap_shape,
)
from t2i.models import (
    Pretrained,
    export_path,
    finished_export,
    load_pretrained,
    save_pretrained,
)
from t2i.modules.attention import LearnedPositions, TransformerBlock
from t2i.training.task import Task, TokenCache
from t2i_kernels import linear_cross_entropy, lowest_k_mask

log = logging.getLogger("t2i.train")

SCHEDULES = ("cosine", "arccos", "linear")
COLOUR_CLASSES = len(COLOUR_NAMES) + 1  # a layout cell's colour: none (0) or a scene colour


def mask_ratio(progress: torch.Tensor | float, schedule: str = "cosine"):
    """Share of tokens masked at decoding progress r in [0, 1]: 1 at r = 0, 0 at r = 1."""
    r = torch.as_tensor(progress, dtype=torch.float64)
    if schedule == "cosine":
        out = torch.cos(r * math.pi / 2)
    elif schedule == "arccos":
        out = torch.arccos(r) / (math.pi / 2)
    elif schedule == "linear":
        out = 1 - r
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return out.clamp(0, 1)


@dataclass
class MuseConfig:
    tokenizer: str = "runs/muse_shapes/vqgan"  # VQGAN run whose tokens are modelled
    tokenizer_config: str = "training/configs/vqgan_shapes.yaml"  # trains it when missing
    num_codes: int = 0  # codebook size (0: the tokenizer's)
    grid: int = 0  # tokens per image side (0: the tokenizer's; a layout model's own cells)
    patch: int = 1  # tokens per side merged into one transformer position (2: 16x16 -> 8x8)
    dim: int = 256  # transformer width
    depth: int = 4  # transformer blocks
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    local_kernel: int = 0  # > 0: a depthwise k x k convolution over the grid in each block
    condition: str = "text"  # "text" (cross-attention to a text encoder) or "class"
    num_classes: int = len(SHAPES)  # "class": labels 0..num_classes-1 (synthetic: shapes)
    text_vocab: int = 0  # caption vocabulary (0: the data tokenizer's)
    text_length: int = 0  # caption positions (0: the data tokenizer's max_length)
    text_dim: int = 256  # text encoder width = cross-attention context width
    text_depth: int = 2  # text encoder blocks
    text_rotary: bool = False  # word order by rotary embeddings, not learned positions
    # (TextEncoder; False: what runs exported before it existed were trained with)
    cond_dropout: float = 0.1  # P(null condition) per sample in training: enables CFG
    self_condition: bool = False  # feed back the previous pass's hidden states
    schedule: str = "cosine"  # training mask-ratio schedule (decoding picks its own)
    label_smoothing: float = 0.1
    coverage_weight: float = 0.0  # > 0: also predict each masked token's object coverage
    layout: str = ""  # a painter: the layout run whose layouts it paints on ("": none);
    # trained on the true layouts, generated on the layout model's (without guidance)
    layout_config: str = "training/configs/muse_layout_shapes.yaml"  # trains it when missing
    layout_model: bool = False  # a layout model (stage "layout"): each cell's class
    layout_classes: int = len(SHAPES) + 1  # segmentation classes, background (0) included
    layout_detail: int = 1  # layout cells a token side: 1, a class a token (its majority);
    # 2, one for each of its 2 x 2 quarters (at 16 x 16 tokens of 32 px: every pixel)
    layout_colour: bool = False  # each cell also holds its object's colour (`colour_map`)
    layout_colour_weight: float = 0.25  # a layout model's colour term beside its classes'
    layout_skip: bool = False  # a painter: each token's own cells also embedded into its
    # output features (before the head): a direct, local path from the layout to its code
    # (ignored by other models, so that `model.layout=` trains a plain one from the config)
    layout_reach: int = 0  # a painter's skip path: also the cells this many beyond each
    # token's own on each side (its neighbours' outline: where an edge runs through it)
    layout_skip_hidden: int = 0  # > 0: a painter's skip features also through an MLP of
    # this hidden width (residual; its output starts at zero): which code a pixel takes
    # depends on its colour and its outline together, which a sum of table rows cannot say
    layout_shapes: bool = True  # a painter: each cell's shape class; False: only object or
    # background (and its colour): the footprint draws the shape, no shape id meets a colour
    layout_colour_permute: bool = False  # a layout model with layout_colour, in training:
    # each sample's colour words and layout colours permuted alike (`permute_layout_colours`)
    layout_centred: bool = False  # a layout model: learns each object drawn at its slot's
    # centre (`scenes.slot_layout`, from the synthetic scenes' records), not where the
    # renderer's jitter put it: one sharp layout a caption, not the blur of every placement
    low_res_tokenizer: str = ""  # super-resolution: the low-res stage's VQGAN run ("": base)
    low_res_size: int = 32  # super-resolution: the low-res stage's image side
    low_res_codes: int = 0  # its codebook size (0: from low_res_tokenizer)
    low_res_grid: int = 0  # its tokens per side (0: from low_res_tokenizer)
    critic: bool = False  # a token critic (Lezama et al. 2022): one "sampled?" logit a token
    base: str = ""  # critic stage: the generator run whose samples it learns to spot


class TextEncoder(nn.Module):
    """Caption ids [B, T] + mask -> states [B, T', C] (T' = the batch's longest caption).

    Word order through learned absolute positions, or with `rotary` through rotary
    embeddings in each self-attention (relative offsets: "the colour word two before me"
    is one rule at every place in the caption, which is what binds each object's words to
    its position word)."""

    def __init__(self, vocab: int, length: int, dim: int, depth: int, heads: int,
                 rotary: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = None if rotary else LearnedPositions(length, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, rotary=rotary)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor):
        n = max(1, int(mask.sum(1).max()))  # padding past the longest caption is never read
        ids, mask = ids[:, :n], mask[:, :n]
        x = self.embed(ids) if self.pos is None else self.pos(self.embed(ids))
        for block in self.blocks:
            x = block(x, key_padding_mask=mask)
        return self.norm(x), mask


class MaskGitTransformer(nn.Module, Pretrained):
    """>>> model = MaskGitTransformer.from_pretrained("runs/muse_shapes")
    >>> ctx = model.condition(text=ids, text_mask=mask)     # or class_ids=...
    >>> logits, hidden = model(tokens, *ctx)                # [B, N, num_codes]"""

    kind = "generator"  # what `t2i eval` scores it as

    def __init__(self, config: MuseConfig):
        super().__init__()
        self.config = c = config
        if c.num_codes < 1 or c.grid < 1:
            raise ValueError("MuseConfig.num_codes and grid come from the tokenizer; got "
                             f"{c.num_codes} and {c.grid}")
        if c.condition not in ("text", "class"):
            raise ValueError(f"model.condition: 'text' or 'class', got {c.condition!r}")
        if c.grid % c.patch:
            raise ValueError(f"model.patch {c.patch} does not divide the {c.grid} tokens a side")
        if c.dim % 4:
            raise ValueError(f"model.dim must be divisible by 4 (the image positions start as "
                             f"2D sine-cosine features), got {c.dim}")
        if c.local_kernel < 0 or (c.local_kernel and c.local_kernel % 2 == 0):
            raise ValueError(f"model.local_kernel: 0 (off) or an odd size, got {c.local_kernel}")
        if (c.layout or c.layout_model) and (c.low_res_codes or c.critic):
            raise ValueError("model.layout / layout_model: only for a base stage (not a "
                             "super-resolution stage or a critic)")
        if c.layout and c.layout_model:
            raise ValueError("a layout model draws layouts; it does not paint on one "
                             "(model.layout must be empty)")
        if c.layout_detail < 1:
            raise ValueError(f"model.layout_detail must be >= 1, got {c.layout_detail}")
        if c.layout_colour_permute and not (c.layout_model and c.condition == "text"):
            raise ValueError("model.layout_colour_permute: only for a layout model "
                             "conditioned on text")
        if c.layout_centred and not c.layout_model:
            raise ValueError("model.layout_centred: only for a layout model (stage 'layout'); "
                             "a painter paints on the true layouts")
        if c.layout_reach < 0:
            raise ValueError(f"model.layout_reach must be >= 0, got {c.layout_reach}")
        if c.layout_skip_hidden < 0:
            raise ValueError(f"model.layout_skip_hidden must be >= 0, got "
                             f"{c.layout_skip_hidden}")
        if c.layout_colour_weight < 0:
            raise ValueError(f"model.layout_colour_weight must be >= 0, got "
                             f"{c.layout_colour_weight}")
        self.mask_id = c.num_codes
        self.num_tokens = c.grid * c.grid
        self.token_embed = nn.Embedding(c.num_codes + 1, c.dim)
        side = c.grid // c.patch  # transformer positions a side
        self.pos = LearnedPositions(side * side, c.dim, grid=side)
        if c.patch > 1:  # p x p tokens in, one position through the blocks, p x p out
            self.merge = nn.Linear(c.patch ** 2 * c.dim, c.dim)
            self.split = nn.Linear(c.dim, c.patch ** 2 * c.dim)
        if c.condition == "text":
            self.text = TextEncoder(c.text_vocab, c.text_length, c.text_dim, c.text_depth,
                                    c.heads, rotary=c.text_rotary)
        else:
            self.class_embed = nn.Embedding(c.num_classes, c.text_dim)
        self.null = nn.Parameter(torch.randn(1, 1, c.text_dim) * 0.02)  # the dropped condition
        if c.low_res_codes:
            self.low_embed = nn.Embedding(c.low_res_codes, c.text_dim)
            self.low_pos = LearnedPositions(c.low_res_grid ** 2, c.text_dim)
        if c.self_condition:
            self.self_cond = nn.Linear(c.dim, c.dim)
            nn.init.zeros_(self.self_cond.weight)
            nn.init.zeros_(self.self_cond.bias)
        self.blocks = nn.ModuleList(
            TransformerBlock(c.dim, c.heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout,
                             context_dim=c.text_dim) for _ in range(c.depth))
        self.local = None
        if c.local_kernel:
            self.local = nn.ModuleList(LocalMix(c.dim, c.local_kernel, c.grid // c.patch)
                                       for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        cells = c.layout_detail ** 2  # layout cells a token
        width = layout_width(c)  # a painter's embeddings a cell
        # a layout model's scores a cell: classes, then scene colours (not "none": the
        # background's colour is no target)
        scores = c.layout_classes + (len(COLOUR_NAMES) if c.layout_colour else 0)
        outputs = 1 if c.critic else cells * scores if c.layout_model else c.num_codes
        self.head = nn.Linear(c.dim, outputs)
        if c.coverage_weight:  # a training aid: generation never calls it
            self.coverage = nn.Linear(c.dim, 1)
        if c.layout:  # a painter: each token's cells' classes (and colours), embedded (a
            # table a cell position), summed and added to its input
            self.layout_embed = nn.Embedding(cells * width, c.dim)
            if c.layout_skip:  # its cells again (and `layout_reach` beyond), to the output
                self.layout_out = nn.Embedding((c.layout_detail + 2 * c.layout_reach) ** 2
                                               * width, c.dim)
                if c.layout_skip_hidden:
                    self.layout_mlp = nn.Sequential(
                        nn.Linear(c.dim, c.layout_skip_hidden), nn.GELU(),
                        nn.Linear(c.layout_skip_hidden, c.dim))
                    nn.init.zeros_(self.layout_mlp[2].weight)
                    nn.init.zeros_(self.layout_mlp[2].bias)
        if c.critic:
            self.kind = "critic"
        if c.layout_model:
            self.kind = "layout"

    # ---------------------------------------------------------------- condition

    def condition(self, *, text=None, text_mask=None, class_ids=None, low_res=None,
                  drop: torch.Tensor | None = None):
        """-> (context [B, L, C], context mask bool [B, L]). Rows where `drop` (bool [B])
        is True get the null condition (the text or class is hidden; low-res tokens never
        are); drop=True: every row, as the null vector alone, without running the text
        encoder whose states would be hidden anyway (guidance's unconditional branch)."""
        if drop is True:
            ctx, mask = self.null_condition(len(text if text is not None else class_ids))
            drop = None
        elif self.config.condition == "text":
            if text is None:
                raise ValueError("this model is conditioned on text: pass text and text_mask")
            ctx, mask = self.text(text, text_mask)
        else:
            if class_ids is None:
                raise ValueError("this model is class-conditional: pass class_ids")
            if int(class_ids.min()) < 0 or int(class_ids.max()) >= self.config.num_classes:
                raise ValueError(f"class ids must be in [0, {self.config.num_classes})")
            ctx = self.class_embed(class_ids)[:, None]
            mask = torch.ones(len(class_ids), 1, dtype=torch.bool, device=ctx.device)
        if drop is not None:
            ctx, mask = self._drop(ctx, mask, drop)
        if self.config.low_res_codes:
            if low_res is None:
                raise ValueError("a super-resolution stage needs the low-res tokens")
            low = self.low_pos(self.low_embed(low_res.flatten(1)))
            ctx = torch.cat([ctx, low], 1)
            mask = torch.cat([mask, torch.ones(low.shape[:2], dtype=torch.bool,
                                               device=mask.device)], 1)
        return ctx, mask

    def _drop(self, ctx, mask, drop):
        """Null condition: the learned vector at position 0, nothing else visible."""
        drop = drop.to(ctx.device)[:, None]
        first = torch.zeros_like(mask)
        first[:, 0] = True
        ctx = torch.cat([torch.where(drop[..., None], self.null.to(ctx.dtype), ctx[:, :1]),
                         ctx[:, 1:]], 1)
        return ctx, torch.where(drop, first, mask)

    def null_condition(self, batch: int):
        """The unconditional context for `batch` rows: the null vector alone."""
        ctx = self.null.expand(batch, 1, self.config.text_dim).contiguous()
        return ctx, torch.ones(batch, 1, dtype=torch.bool, device=ctx.device)

    # ---------------------------------------------------------------- transformer

    def forward(self, *args, mode: str = "logits", **kwargs):
        """mode "logits": `transformer(...)`; mode "loss": `training_loss(...)`. One entry,
        so that a DeepSpeed engine (ZeRO-3 included) sees every parameter a training step
        uses inside its forward."""
        if mode == "loss":
            return self.training_loss(*args, **kwargs)
        if mode == "critic":
            return self.critic_loss(*args, **kwargs)
        if mode == "layout":
            return self.layout_loss(*args, **kwargs)
        return self.transformer(*args, **kwargs)

    def transformer(self, tokens: torch.Tensor, context: torch.Tensor,
                    context_mask: torch.Tensor, self_cond: torch.Tensor | None = None,
                    return_logits: bool = True, layout: torch.Tensor | None = None):
        """tokens long [B, N] (mask id = num_codes) -> (logits [B, N, V] or None,
        hidden [B, N, dim]). `layout` long [B, g*d, g*d] (d = layout_detail): the class of
        each cell of the token grid, with `layout_colour` class + layout_classes x colour
        (painters), or its `layout_features`."""
        if layout is not None and not isinstance(layout, tuple):
            layout = self.layout_features(layout)
        x = self.token_embed(tokens)  # [B, N, dim]
        if layout is not None:
            x = x + layout[0]
        if self_cond is not None and self.config.self_condition:
            x = x + self.self_cond(self_cond)
        p = self.config.patch
        if p > 1:
            x = self.merge(self._group(x))  # [B, N / p^2, dim]
        x = self.pos(x)
        for i, block in enumerate(self.blocks):
            x = block(x, context=context, context_mask=context_mask)
            if self.local is not None:
                x = x + self.local[i](x)
        hidden = self.norm(x)
        if p > 1:
            hidden = self._ungroup(self.split(hidden))  # [B, N, dim]
        if layout is not None and layout[1] is not None:
            hidden = hidden + layout[1]
        return (self.head(hidden) if return_logits else None), hidden

    def layout_features(self, layout: torch.Tensor):
        """A painter's layout long [B, g*d, g*d] -> (what `transformer` adds to the token
        embeddings [B, N, dim], what it adds to the output features [B, N, dim] or None
        without `layout_skip`). They depend on the layout alone: decoding computes them once
        a generation and passes them to every step's `transformer` as its `layout`. One
        one-hot layout serves both paths (the input path reads its unpadded middle)."""
        c = self.config
        reach = c.layout_reach if c.layout_skip else 0
        cells = self._layout_cells(layout, reach)
        side = cells.shape[-1] - reach
        skip = None
        if c.layout_skip:
            skip = self._embed_cells(cells, self.layout_out, reach)
            if c.layout_skip_hidden:
                skip = skip + self._skip_mlp(skip, layout)
        return self._embed_cells(cells[..., reach:side, reach:side], self.layout_embed), skip

    def _skip_mlp(self, skip: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        """`layout_mlp` over the skip features [B, N, dim], run only on the tokens whose
        window holds a cell other than plain background (class and colour 0) and on one
        plain token: every plain window has the same features, so the same output, which
        the others share. On the synthetic scenes ~24% of the 5 x 5 windows touch an object,
        and the MLP was ~30% of a painter's training step."""
        c = self.config
        w = c.layout_detail + 2 * c.layout_reach
        busy = F.max_pool2d((layout != 0).float()[:, None], w, stride=c.layout_detail,
                            padding=c.layout_reach).flatten() > 0
        rows = busy.nonzero()[:, 0]
        if len(rows) == len(busy):  # no plain window
            return self.layout_mlp(skip)
        plain = (~busy).int().argmax().view(1)  # the first plain window
        flat = skip.reshape(len(busy), -1)
        out = self.layout_mlp(flat[torch.cat([rows, plain])])
        return out[-1:].expand(len(flat), -1).index_copy(0, rows, out[:-1]).view(skip.shape)

    def _embed_layout(self, layout: torch.Tensor, table: nn.Embedding, reach: int = 0
                      ) -> torch.Tensor:
        """Layout map long [B, g*d, g*d] -> [B, N, dim]: for each token the cells of its
        window (its d x d cells and `reach` cells beyond on each side; past the image edge,
        background) — each cell's class (without `layout_shapes` object or background) and,
        with `layout_colour`, its colour — each window place with its own table (a row a
        class and a colour), summed, over the window side (its w^2 unit-variance embeddings
        then sum to the token embedding's scale): a convolution over the one-hot layout,
        stride d, ~3x faster on the CPU than the embedding-bag of the same rows it replaced,
        backward included."""
        return self._embed_cells(self._layout_cells(layout, reach), table, reach)

    def _layout_cells(self, layout: torch.Tensor, reach: int) -> torch.Tensor:
        """Layout map long [B, g*d, g*d] -> its one-hot cells [B, W, side + 2r, side + 2r]
        (class rows, then colour rows; `reach` cells of background, no colour, around it)."""
        c = self.config
        k, side = c.layout_classes, c.grid * c.layout_detail
        if layout.shape[1:] != (side, side):
            raise ValueError(f"layout: expected maps of {side}x{side} cells, got "
                             f"{tuple(layout.shape[1:])}")
        layout = F.pad(layout, (reach,) * 4)  # 0: background, no colour
        cls = layout % k
        if not c.layout_shapes:  # object (1) or background (0)
            cls = (cls > 0).long()
        cells = F.one_hot(cls, k)
        if c.layout_colour:  # a cell's class rows, then its colour's (after the classes')
            cells = torch.cat([cells, F.one_hot(layout // k, COLOUR_CLASSES)], -1)
        return cells.permute(0, 3, 1, 2)

    def _embed_cells(self, cells: torch.Tensor, table: nn.Embedding, reach: int = 0
                     ) -> torch.Tensor:
        """One-hot cells (`_layout_cells`, padded by `reach`) -> [B, N, dim] through
        `table` (`_embed_layout`)."""
        w = self.config.layout_detail + 2 * reach  # window side in cells
        kernel = table.weight.view(w, w, cells.shape[1], -1).permute(3, 2, 0, 1)
        x = F.conv2d(cells.to(kernel.dtype), kernel, stride=self.config.layout_detail)
        return x.flatten(2).transpose(1, 2) / w

    def _group(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] in raster order -> [B, N / p^2, p^2 D], one row per p x p patch."""
        b, _, d = x.shape
        g, p = self.config.grid, self.config.patch
        x = x.view(b, g // p, p, g // p, p, d).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (g // p) ** 2, p * p * d)

    def _ungroup(self, x: torch.Tensor) -> torch.Tensor:
        b, _, pd = x.shape
        g, p = self.config.grid, self.config.patch
        x = x.view(b, g // p, g // p, p, p, pd // (p * p)).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, g * g, pd // (p * p))

    def loss(self, tokens: torch.Tensor, masked: torch.Tensor, context, context_mask,
             self_cond_rows: torch.Tensor | None = None, coverage: torch.Tensor | None = None,
             return_correct: bool = False, layout: torch.Tensor | None = None):
        """Cross-entropy on the masked positions. tokens long [B, N] (the truth), masked
        bool [B, N]. `self_cond_rows` bool [B]: rows that first run once without gradient
        and see that pass's hidden states. `coverage` float [B, N]: the fraction of each
        token's pixels that show an object (`object_coverage`), which a second head learns
        to predict with `config.coverage_weight` (binary cross-entropy on the masked tokens:
        the objects' outline below token size, whatever their colour and background).
        `layout` long [B, g*d, g*d]: each layout cell's class as input (painters).
        -> (loss, accuracy on masked tokens), and with `return_correct` the bool [B, N] map
        of the masked tokens the argmax gets right."""
        inputs = torch.where(masked, self.mask_id, tokens)
        self_cond = None
        if self.config.self_condition and self_cond_rows is not None:
            with torch.no_grad():
                _, first = self.transformer(inputs, context, context_mask, return_logits=False,
                                            layout=layout)
            self_cond = first * self_cond_rows[:, None, None].to(first.dtype)
        _, hidden = self.transformer(inputs, context, context_mask, self_cond,
                                     return_logits=False, layout=layout)
        targets = torch.where(masked, tokens, -100)
        loss = linear_cross_entropy(hidden, self.head.weight, targets, bias=self.head.bias,
                                    label_smoothing=self.config.label_smoothing)
        picked = hidden[masked]
        if coverage is not None and self.config.coverage_weight:
            predicted = self.coverage(picked)[:, 0].float()
            loss = loss + self.config.coverage_weight * F.binary_cross_entropy_with_logits(
                predicted, coverage[masked].float())
        with torch.no_grad():
            hits = (picked @ self.head.weight.T + self.head.bias).argmax(-1) == tokens[masked]
            accuracy = hits.float().mean()
        if return_correct:
            return loss, accuracy, torch.zeros_like(masked).masked_scatter_(masked, hits)
        return loss, accuracy

    def training_loss(self, tokens, masked, condition: dict, self_cond_rows=None,
                      coverage=None, layout=None):
        """The condition (with its dropped rows) and `loss`, in one call."""
        return self.loss(tokens, masked, *self.condition(**condition), self_cond_rows, coverage,
                         layout=layout)

    def layout_logits(self, context, context_mask) -> torch.Tensor:
        """A layout model's logits for every layout cell from the condition alone (every
        image token masked: one pass) -> [B, g*d, g*d, W]: its layout_classes class logits,
        then with `layout_colour` a logit for each scene colour (`pick_layout`)."""
        c = self.config
        if not c.layout_model:
            raise ValueError("layout_logits: this model is not a layout model (stage 'layout')")
        b, g, d = context.shape[0], c.grid, c.layout_detail
        tokens = torch.full((b, self.num_tokens), self.mask_id, device=context.device)
        logits, _ = self.transformer(tokens, context, context_mask)  # [B, N, d*d*C]
        w = logits.shape[-1] // (d * d)
        logits = logits.view(b, g, g, d, d, w).permute(0, 1, 3, 2, 4, 5)
        return logits.reshape(b, g * d, g * d, w)

    def layout_loss(self, target: torch.Tensor, condition: dict):
        """A layout model's loss: soft cross-entropy between each cell's class mix `target`
        float [B, g*d, g*d, W] (`MuseTask._layout`) and its predicted classes (with
        `layout_colour`: plus that of the object's colour where a cell shows one).
        -> (loss, accuracy of the class argmax against each cell's majority class)."""
        logits = self.layout_logits(*self.condition(**condition)).float()
        k = self.config.layout_classes
        loss = layout_ce(logits, target.float(), k, self.config.layout_colour_weight).mean()
        accuracy = (logits[..., :k].argmax(-1) == target[..., :k].argmax(-1)).float().mean()
        return loss, accuracy.detach()

    def critic_loss(self, tokens, sampled: torch.Tensor, condition: dict):
        """Critic: binary cross-entropy of "this token was sampled, not the original" over
        every position of a partly re-sampled map. -> (loss, accuracy)."""
        logits, _ = self.transformer(tokens, *self.condition(**condition))
        target = sampled.to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits[..., 0].float(), target.float())
        accuracy = ((logits[..., 0] > 0) == sampled).float().mean()
        return loss, accuracy.detach()

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, **condition) -> torch.Tensor:
        """Critic: how original each token of a full map looks (higher: keep it) [B, N]."""
        logits, _ = self.transformer(tokens, *self.condition(**condition))
        return -logits[..., 0].float()


class LocalMix(nn.Module):
    """x [B, g*g, D] -> a depthwise k x k convolution of LN x over the g x g grid, mixed
    across channels (zero-initialised: the block starts as the identity)."""

    def __init__(self, dim: int, kernel: int, grid: int):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.norm(x).transpose(1, 2).reshape(b, d, self.grid, self.grid)
        return self.proj(F.gelu(self.conv(h)).flatten(2).transpose(1, 2))


def random_mask(batch: int, n: int, schedule: str, device, generator=None) -> torch.Tensor:
    """Training masks: per row a ratio from the schedule at a uniform progress, at least one
    token, positions uniformly at random. -> bool [B, N]."""
    r = torch.rand(batch, generator=generator, device=device)
    k = (mask_ratio(r, schedule) * n).ceil().long().clamp(1, n).to(device)
    return lowest_k_mask(torch.rand(batch, n, generator=generator, device=device), k)


def has_segmentation(seg: torch.Tensor | None) -> bool:
    """Whether a batch's segmentation maps exist for every image (-1 marks a missing one)."""
    return seg is not None and not bool((seg < 0).any())


def class_mix(seg: torch.Tensor, grid: int, classes: int) -> torch.Tensor:
    """Segmentation maps long [B, H, W] -> float [B, grid^2, classes]: the share of each
    token's image patch that shows each class (background 0 included)."""
    if seg.shape[-1] % grid or seg.shape[-2] % grid:
        raise ValueError(f"segmentation maps of {tuple(seg.shape[-2:])} px do not split into "
                         f"{grid} x {grid} cells (model.layout_detail too fine?)")
    if int(seg.min()) < 0 or int(seg.max()) >= classes:
        raise ValueError(f"segmentation classes must be in [0, {classes}) (model.layout_classes)"
                         f", got {int(seg.min())}..{int(seg.max())}")
    onehot = F.one_hot(seg.long(), classes).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(onehot, seg.shape[-1] // grid).flatten(2).transpose(1, 2)


def layout_width(config: MuseConfig) -> int:
    """A painter's embeddings a layout cell: its classes, and with `layout_colour` its
    COLOUR_CLASSES colours (none included)."""
    return config.layout_classes + (COLOUR_CLASSES if config.layout_colour else 0)


def layout_ce(logits: torch.Tensor, target: torch.Tensor, classes: int,
              colour_weight: float = 1.0) -> torch.Tensor:
    """Soft cross-entropy a cell [...] of a layout model's logits [..., W] against a mix
    [..., W'] (`MuseTask._layout`): of the first `classes` scores against the class mix,
    plus (W > classes) `colour_weight` x that of the scene-colour scores against the mix's
    scene colours, whose mass is the share of the cell an object covers (the background's
    colour is no target: the classes say where objects are, the colours only which colour
    they have)."""
    ce = -(target[..., :classes] * F.log_softmax(logits[..., :classes], -1)).sum(-1)
    if logits.shape[-1] > classes:
        colours = len(COLOUR_NAMES)
        ce = ce - colour_weight * (target[..., -colours:] *
                                   F.log_softmax(logits[..., -colours:], -1)).sum(-1)
    return ce


def pick_layout(scores: torch.Tensor, classes: int, threshold: float | None = None,
                sharpen: float = 0.0) -> torch.Tensor:
    """Scores or mixes [..., W] -> each cell's layout long [...]: its most likely class,
    and (W > classes) + classes x its colour, 1 + its most likely scene colour where the
    class is an object's (0 on the background). `threshold`: a cell is an object's where
    the background's probability (softmax of the class scores) is below it, then its most
    likely object class; else the background (None: the most likely class). `sharpen`
    (with a threshold; maps [B, S, S, W]): that probability p is first unsharp-masked,
    p + sharpen x (p - blur(p)) (`blur_cells`), which undoes some of the blur that the ~1 px
    spread of an object's placements leaves on a layout model's outlines (README: Sharper
    layouts)."""
    if threshold is None:
        out = scores[..., :classes].argmax(-1)
    else:
        background = torch.softmax(scores[..., :classes].float(), -1)[..., 0]
        if sharpen:
            if background.dim() != 3:
                raise ValueError(f"sharpen: expected layouts [B, S, S, W], got scores of "
                                 f"{tuple(scores.shape)}")
            background = background + sharpen * (background - blur_cells(background))
        out = torch.where(background < threshold, scores[..., 1:classes].argmax(-1) + 1, 0)
    if scores.shape[-1] > classes:
        colour = scores[..., -len(COLOUR_NAMES):].argmax(-1) + 1
        out = out + classes * torch.where(out > 0, colour, 0)
    return out


def blur_cells(maps: torch.Tensor) -> torch.Tensor:
    """float [B, S, S] -> the same filtered by [1, 2, 1] / 4 along each side (the edge cells
    repeated beyond the edge)."""
    taps = torch.tensor([0.25, 0.5, 0.25], dtype=maps.dtype, device=maps.device)
    x = F.pad(maps[:, None], (1, 1, 1, 1), mode="replicate")
    x = F.conv2d(F.conv2d(x, taps.view(1, 1, 1, 3)), taps.view(1, 1, 3, 1))
    return x[:, 0]


def permute_layout_colours(captions, mix: torch.Tensor, classes: int):
    """A random permutation of the scene colours a sample, applied alike to its caption's
    colour words (scenes.permute_colours) and to the colour part of its layout mix
    [B, S, S, classes + COLOUR_CLASSES] (colour class 1 + i becomes 1 + perm[i]; "none"
    stays). -> (captions, mix). Training data never shows some colours on some shapes (the
    held-out pairs); a layout model trained as is learns that and draws, for "a red
    triangle", a triangle in another colour. Permuted, every colour goes with every shape
    and the colour can only come from the colour word."""
    n = len(COLOUR_NAMES)
    perm = torch.rand(len(captions), n).argsort(-1)  # [B, n]: colour i -> perm[i]
    texts = [permute_colours(t, p) for t, p in zip(captions, perm.tolist(), strict=True)]
    source = torch.cat([torch.zeros(len(perm), 1, dtype=torch.long), 1 + perm.argsort(-1)], 1)
    colours = mix[..., classes:]
    source = source.to(mix.device)[:, None, None].expand_as(colours)
    return texts, torch.cat([mix[..., :classes], colours.gather(-1, source)], -1)


def scene_colours(device) -> torch.Tensor:
    """The scene colours in COLOUR_NAMES order as RGB in [-1, 1]: float [8, 3]."""
    return torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32,
                        device=device) / 127.5 - 1


def colour_map(images: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] and their segmentation maps long [B, H, W] -> each
    pixel's colour class long [B, H, W]: 0 on the background, else 1 + the index in
    COLOUR_NAMES of the scene colour nearest to the pixel's."""
    palette = scene_colours(images.device)
    distance = (images.float().permute(0, 2, 3, 1)[..., None, :] - palette).square().sum(-1)
    return torch.where(seg.to(images.device) > 0, distance.argmin(-1) + 1, 0)


def slot_layouts(batch: dict, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's objects at their slots' centres (`scenes.slot_layout`) -> (seg, colour
    classes), long [B, size, size] each. Needs the synthetic scenes' records."""
    records = batch.get("record") or []
    if len(records) != len(batch["caption"]) or not all(r and "objects" in r for r in records):
        raise ValueError("model.layout_centred draws each object at its slot's centre from "
                         "the synthetic scenes' records (the json member of each sample); "
                         "this batch lacks them: set model.layout_centred=false")
    renderer = Renderer(size)
    pairs = [slot_layout(r, renderer) for r in records]
    return tuple(torch.from_numpy(np.stack(maps)).long() for maps in zip(*pairs, strict=True))


def object_coverage(seg: torch.Tensor | None, grid: int) -> torch.Tensor:
    """Segmentation maps long [B, H, W] (0: background, -1: no map) -> float [B, grid^2]:
    the fraction of each token's image patch that shows an object."""
    if not has_segmentation(seg):
        raise ValueError("model.coverage_weight needs the segmentation maps of every "
                         "training image (seg.png in the shards); this data set has none")
    f = seg.shape[-1] // grid
    return F.avg_pool2d((seg > 0).float()[:, None], f).flatten(1)


@torch.no_grad()
def shape_word_nll(model, tokens, seg, captions, records, tokenizer):
    """What the shape word is worth to an object's tokens, over the single-object scenes of
    a batch: the summed cross-entropy of the object's tokens (those with at least half of
    their pixels on it), every image token masked, under the caption and under the same
    caption naming the next shape in SHAPES instead. -> (nll with the true word, nll with
    the swapped word, object tokens), or None without single-object scenes. Equal sums:
    the model draws the same object whatever shape the caption names."""
    rows = [i for i, r in enumerate(records or [])
            if r is not None and len(r.get("objects", ())) == 1]
    if not rows or not has_segmentation(seg):
        return None
    device = tokens.device
    shapes = [records[i]["objects"][0]["shape"] for i in rows]
    texts = [captions[i] for i in rows]
    swapped = [swap_shape(t, s, SHAPES[(SHAPES.index(s) + 1) % len(SHAPES)])
               for t, s in zip(texts, shapes, strict=True)]
    targets = tokens[rows]
    on = (object_coverage(seg[rows], model.config.grid) >= 0.5).to(device)
    inputs = torch.full_like(targets, model.mask_id)
    out = []
    for text in (texts, swapped):
        ids, mask = tokenizer(text)
        ctx, ctx_mask = model.condition(text=ids.to(device), text_mask=mask.to(device))
        _, hidden = model.transformer(inputs, ctx, ctx_mask, return_logits=False)
        logits = model.head(hidden[on]).float()  # the object tokens only
        out.append(float(F.cross_entropy(logits, targets[on], reduction="sum")))
    return out[0], out[1], int(on.sum())


def class_labels(batch: dict) -> torch.Tensor:
    """Class of each synthetic scene: the shape of its first-drawn object."""
    records = batch.get("record")
    if records is None or any(r is None or not r.get("objects") for r in records):
        raise ValueError("class-conditional training reads the shape classes from the "
                         "synthetic scenes' json attributes; this data set has none")
    return torch.tensor([SHAPES.index(r["objects"][0]["shape"]) for r in records])


class MuseTask(Task):
    family, stage = "muse", "transformer"

    def __init__(self, config: MuseConfig, data, tokenizer=None):
        super().__init__(config, data, tokenizer)
        from t2i.models.vqgan import VQGAN

        if config.schedule not in SCHEDULES:
            raise ValueError(f"model.schedule must be one of {SCHEDULES}")
        self.vqgan = _load_tokenizer(config.tokenizer, VQGAN).requires_grad_(False)
        grid = data.image_size // 2 ** (len(self.vqgan.config.mults) - 1)
        config.num_codes = config.num_codes or self.vqgan.config.num_codes
        if config.layout_model and config.grid:  # a layout model's own cells: it never reads
            # or predicts image tokens, so its grid need not be the tokenizer's
            if data.image_size % (config.grid * config.layout_detail):
                raise ValueError(f"model.grid {config.grid} x layout_detail "
                                 f"{config.layout_detail} cells do not split the "
                                 f"{data.image_size} px images")
            grid = config.grid
        config.grid = config.grid or grid
        if (config.num_codes, config.grid) != (self.vqgan.config.num_codes, grid):
            raise ValueError(f"model.num_codes / grid ({config.num_codes}, {config.grid}) "
                             f"differ from the tokenizer's ({self.vqgan.config.num_codes}, "
                             f"{grid}) at data.image_size {data.image_size}")
        if tokenizer is not None:
            config.text_vocab = config.text_vocab or tokenizer.vocab_size
            config.text_length = config.text_length or tokenizer.max_length
        self.layouts = None  # a painter's layout model (t2i.generate.LayoutDrawer)
        if config.layout and self.layout_drawer() is None:
            if not os.path.isdir(config.layout):
                raise ValueError(f"model.layout: {config.layout} has no exported layout "
                                 f"model; train it first (train.py does so itself from "
                                 f"model.layout_config)")
            log.warning("model.layout: %s has not exported its layout model's last step yet "
                        "(train.py trains it beside a painter): sample grids paint on the "
                        "true layouts, and the export holds it once it has", config.layout)
        self.low = None
        if config.low_res_tokenizer:
            self.low = LowRes(_load_tokenizer(config.low_res_tokenizer, VQGAN),
                              config.low_res_size)
            config.low_res_codes = self.low.vqgan.config.num_codes
            config.low_res_grid = self.low.grid
        self.model = MaskGitTransformer(config)
        self.train_tokens = TokenCache(self._tokens)  # training batches: encoded once each
        self.low_tokens = TokenCache(self.low.tokens) if self.low is not None else None

    @classmethod
    def prerequisite(cls, model: dict):
        """The VQGAN first, then (painters) the layout model, each when it has not exported
        its last step (`finished_export`). A painter trains on the true layouts: its layout
        model may train beside it."""
        path = model.get("tokenizer", MuseConfig.tokenizer)
        if not finished_export(path):
            return (model.get("tokenizer_config", MuseConfig.tokenizer_config),
                    [f"run.out={path}"], False)
        layout = model.get("layout", MuseConfig.layout)
        if layout and not finished_export(layout):  # drawn on this painter's grid and cells
            config = model.get("layout_config", MuseConfig.layout_config)
            colour = model.get("layout_colour", MuseConfig.layout_colour)
            overrides = [f"run.out={layout}", f"model.tokenizer={path}",
                         f"model.layout_colour={str(colour).lower()}"]
            if not _config_grid(config):  # on the tokenizer's grid: the painter's cells
                detail = model.get("layout_detail", MuseConfig.layout_detail)
                overrides.append(f"model.layout_detail={detail}")
            return config, overrides, True
        return None

    def layout_drawer(self):
        """A painter's layout model (t2i.generate.LayoutDrawer), loaded once its run has
        exported its last step; None before (train.py may train it beside the painter, which
        trains on the true layouts: an earlier checkpoint's export is not it) and for other
        stages."""
        if self.layouts is None and self.config.layout and finished_export(self.config.layout):
            with torch.random.fork_rng(devices=[]):  # loading draws a model's initial weights:
                # the painter's own must not depend on whether it was there yet
                self.layouts = _load_layouts(self.config)
        return self.layouts

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        self.vqgan.to(images.device)
        with torch.no_grad():
            return self.vqgan.encode(images.float()).flatten(1)

    def _inputs(self, batch: dict, drop=None, training: bool = False):
        """The condition's arguments; `training`: low-res tokens through the cache (the
        training split's keys only: validation keys may name other images)."""
        c = self.config
        kwargs = {"drop": drop}
        if c.condition == "text":
            kwargs.update(text=batch["text"], text_mask=batch["text_mask"])
        else:
            kwargs["class_ids"] = class_labels(batch).to(batch["image"].device)
        if self.low is not None:
            keys = batch.get("key") if training else None  # None: encoded, not cached
            kwargs["low_res"] = self.low_tokens(batch["image"], keys)
        return kwargs

    def losses(self, engines, batch, step):
        tokens = self.train_tokens(batch["image"], batch.get("key"))
        b, n = tokens.shape
        device = tokens.device
        masked = random_mask(b, n, self.config.schedule, device)
        drop = torch.rand(b, device=device) < self.config.cond_dropout
        sc = torch.rand(b, device=device) < 0.5 if self.config.self_condition else None
        coverage = None
        if self.config.coverage_weight:
            coverage = object_coverage(batch.get("seg"), self.config.grid).to(device)
        layout = self._layout(batch)[1] if self.config.layout else None  # painters: the truth
        loss, accuracy = engines["model"](tokens, masked, self._inputs(batch, drop, True), sc,
                                          coverage, layout, mode="loss")
        yield "model", loss, {"ce": loss.item(), "accuracy": accuracy.item(),
                              "masked": masked.float().mean().item()}

    def _layout(self, batch, config: MuseConfig | None = None):
        """-> (class mix float [B, g*d, g*d, W], each cell's layout long [B, g*d, g*d]:
        `pick_layout`) from the segmentation maps (and, with `layout_colour`, the colours
        the images show on their objects), as `config` (default: this stage's) draws
        layouts."""
        c = config or self.config
        if not has_segmentation(batch.get("seg")):
            raise ValueError("layout models and painters (model.layout) need the segmentation "
                             "maps of every image (seg.png in the shards); this data set has "
                             "none")
        side = c.grid * c.layout_detail
        if c.layout_model and c.layout_centred:
            seg, colours = slot_layouts(batch, batch["seg"].shape[-1])
        else:
            seg = batch["seg"]
            colours = colour_map(batch["image"], seg) if c.layout_colour else None
        mix = class_mix(seg, side, c.layout_classes)
        if c.layout_colour:
            mix = torch.cat([mix, class_mix(colours.to(mix.device), side, COLOUR_CLASSES)], -1)
        mix = mix.view(len(mix), side, side, -1).to(batch["image"].device)
        return mix, pick_layout(mix, c.layout_classes)

    def _prompts(self, batch, n: int) -> dict:
        """The first n samples' captions (or class ids) as a generator's keyword arguments."""
        if self.config.condition == "class":
            return {"class_ids": class_labels(batch)[:n]}
        return {"texts": batch["caption"][:n]}

    @torch.no_grad()
    def samples(self, model, batch):
        """Rows: real images; generated for their captions (seed 0, CFG 3); the same, no CFG.
        Painters: real images, their layouts, the layout model's layouts for their captions
        (the true ones again while it is still training), the images painted on those
        without guidance."""
        from t2i.generate import MuseGenerator

        n = min(8, len(batch["image"]))
        cond = self._prompts(batch, n)
        extra = {"low_res_images": batch["image"][:n]} if self.low is not None else {}
        rows = [batch["image"][:n]]
        if self.config.layout:
            true = self._layout(batch)[1][:n]
            drawer = self.layout_drawer() or (lambda *_: true)
            gen = MuseGenerator(model, self.vqgan, self.tokenizer, low=self.low,
                                layouts=drawer)
            out = gen(**cond, **extra, seed=0)
            size = batch["image"].shape[-1]
            return rows + [layout_picture(true, size, self.config),
                           layout_picture(out.layout, size, self.config),
                           out.images]
        gen = MuseGenerator(model, self.vqgan, self.tokenizer, low=self.low)
        for cfg in (3.0, None):
            rows.append(gen(**cond, **extra, seed=0, cfg_scale=cfg).images)
        return rows

    @torch.no_grad()
    def evaluate(self, model, batches):
        """Masked-token accuracy and loss at a fixed set of masks (seeded), conditional;
        with segmentation maps also the accuracy on the masked tokens that show an object
        (a small part of each image, and the part the captions are about)."""
        g = torch.Generator().manual_seed(0)
        losses, accs, hits, counts = [], [], 0, 0
        shape_nll = [0.0, 0.0, 0]  # true word, swapped word, object tokens
        # text-only base stages (a super-resolution stage also sees the shape itself)
        # (and not painters: their tokens follow the layout, drawn by another model)
        shape_word = self.config.condition == "text" and self.tokenizer is not None and \
            self.low is None and not self.config.layout
        for batch in batches:
            tokens = self._tokens(batch["image"])
            masked = random_mask(*tokens.shape, self.config.schedule, "cpu", g).to(tokens.device)
            ctx = model.condition(**self._inputs(batch))
            # painters paint on the true layout here: this scores the painter alone
            layout = self._layout(batch)[1] if self.config.layout else None
            loss, acc, correct = model.loss(tokens, masked, *ctx, return_correct=True,
                                            layout=layout)
            losses.append(float(loss))
            accs.append(float(acc))
            seg = batch.get("seg")
            if has_segmentation(seg):
                on = masked & (object_coverage(seg, self.config.grid) > 0).to(masked.device)
                hits += int(correct[on].sum())
                counts += int(on.sum())
            if shape_word:
                nll = shape_word_nll(model, tokens, seg, batch["caption"], batch.get("record"),
                                     self.tokenizer)
                if nll is not None:
                    shape_nll = [a + b for a, b in zip(shape_nll, nll, strict=True)]
        out = {"val_ce": sum(losses) / len(losses), "val_accuracy": sum(accs) / len(accs)}
        if counts:
            out["val_object_accuracy"] = hits / counts
        if shape_nll[2]:  # nats a token: how much the caption's shape word tells the model
            out["val_shape_word_gain"] = (shape_nll[1] - shape_nll[0]) / shape_nll[2]
        return out

    def export(self, path: str) -> None:
        save_pretrained(self.vqgan, os.path.join(path, "vqgan"), family="vqgan",
                        stage="tokenizer")
        if self.low is not None:
            save_pretrained(self.low.vqgan, os.path.join(path, "low_res_vqgan"),
                            family="vqgan", stage="tokenizer",
                            extra={"image_size": self.low.size})
        if self.layout_drawer() is not None:  # the layout model and its caption tokenizer
            save_pretrained(self.layouts.model, os.path.join(path, "layout"), family="muse",
                            stage="layout")
            if self.layouts.tokenizer is not None:
                self.layouts.tokenizer.save(os.path.join(path, "layout"))


class LowRes:
    """What a super-resolution stage sees of the base stage: its frozen VQGAN, which
    tokenizes the image shrunk to the base's size."""

    def __init__(self, vqgan, size: int):
        self.vqgan, self.size = vqgan.requires_grad_(False), size
        self.grid = size // 2 ** (len(vqgan.config.mults) - 1)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] -> the base's tokens of their downsized copies [B, n]."""
        self.vqgan.to(images.device)
        small = F.interpolate(images.float(), size=(self.size, self.size), mode="area")
        return self.vqgan.encode(small).flatten(1)


def layout_picture(layout: torch.Tensor, size: int, config: MuseConfig) -> torch.Tensor:
    """Layout maps long [B, h, w] -> pictures [B, 3, size, size] in [-1, 1]: a colour a
    class, or (`layout_colour`) each object cell in its colour on black."""
    from t2i.models.vqseg import colourise

    if config.layout_colour:
        black = torch.full((1, 3), -1.0, device=layout.device)
        palette = torch.cat([black, scene_colours(layout.device)])  # colour class -> RGB
        picture = palette[layout // config.layout_classes].permute(0, 3, 1, 2)
    else:
        picture = colourise(layout)
    return F.interpolate(picture, size=(size, size), mode="nearest")


def _config_grid(path: str) -> int:
    """The model.grid a training config file sets (0: none, the tokenizer's). Read raw, not
    through `load_config`: that checks the file's data.path, which a prerequisite's file
    need not hold (it trains on the painter's data)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        return int((yaml.safe_load(f).get("model") or {}).get("grid") or 0)


def _load_layouts(config: MuseConfig):
    """A painter's layout model, checked against the painter's grid, classes and condition."""
    from t2i.pipelines import load_layouts

    try:
        layouts = load_layouts(config.layout)
    except FileNotFoundError:
        raise ValueError(f"model.layout: {config.layout} has no exported layout model; train "
                         f"it first (train.py does so itself from model.layout_config)") from None
    c = layouts.model.config
    theirs = (c.grid * c.layout_detail, c.layout_classes, c.condition, c.layout_colour)
    ours = (config.grid * config.layout_detail, config.layout_classes, config.condition,
            config.layout_colour)
    if theirs != ours:
        raise ValueError(f"model.layout: {config.layout} draws layouts of {theirs[0]}x"
                         f"{theirs[0]} cells of {theirs[1]} classes from a {theirs[2]} "
                         f"condition, colours {theirs[3]}; this painter needs {ours[0]}x"
                         f"{ours[0]}, {ours[1]}, {ours[2]} and {ours[3]} (model.layout_detail,"
                         f" layout_classes, condition, layout_colour)")
    layouts.model.requires_grad_(False)
    return layouts


def _load_tokenizer(path: str, expect):
    try:
        return load_pretrained(path, expect=expect)
    except FileNotFoundError:
        raise ValueError(f"model.tokenizer: {path} has no exported VQGAN; train it first "
                         f"(train.py does so itself when model.tokenizer_config names its "
                         f"config)") from None


class CriticTask(MuseTask):
    """The token critic: learns which tokens of a map the base generator filled in."""

    stage = "critic"

    def __init__(self, config: MuseConfig, data, tokenizer=None):
        if not config.base:
            raise ValueError("model.base: the critic stage needs the generator run it judges")
        config.critic = True
        self.base = load_pretrained(config.base, expect=MaskGitTransformer)
        self.base.requires_grad_(False)
        export = export_path(config.base)
        config.tokenizer = os.path.join(export, "vqgan")
        super().__init__(config, data, tokenizer)
        self.base_layouts = None  # a painter base: true layouts here, its layout model's in
        if self.base.config.layout:  # the sample grids
            from t2i.pipelines import load_layouts

            self.base_layouts = load_layouts(os.path.join(export, "layout"))
        if self.base.config.text_vocab != config.text_vocab:
            raise ValueError("the critic reads captions with another tokenizer than its base: "
                             "set data.tokenizer to the base run's export folder")

    @classmethod
    def prerequisite(cls, model: dict):
        return None

    def losses(self, engines, batch, step):
        tokens = self.train_tokens(batch["image"], batch.get("key"))
        b, n = tokens.shape
        masked = random_mask(b, n, self.config.schedule, tokens.device)
        cond = self._inputs(batch, training=True)
        with torch.no_grad():
            logits = self._base_logits(torch.where(masked, self.base.mask_id, tokens), batch,
                                       cond)
            drawn = torch.distributions.Categorical(logits=logits.float()).sample()
        mixed = torch.where(masked, drawn, tokens)
        sampled = masked & (drawn != tokens)
        loss, accuracy = engines["model"](mixed, sampled, cond, mode="critic")
        yield "model", loss, {"bce": loss.item(), "accuracy": accuracy.item(),
                              "sampled": sampled.float().mean().item()}

    def _base_logits(self, inputs, batch, cond):
        """The base generator's logits for a partly masked map (a painter's: on the true
        layout)."""
        base = self.base.config  # its grid and cells, not the critic's
        layout = self._layout(batch, base)[1] if base.layout else None
        self.base.to(inputs.device)
        return self.base(inputs, *self.base.condition(**cond), layout=layout)[0]

    @torch.no_grad()
    def samples(self, model, batch):
        from t2i.generate import MuseGenerator

        gen = MuseGenerator(self.base, self.vqgan, self.tokenizer, layouts=self.base_layouts)
        texts = batch["caption"][:8]
        cfg = None if self.base_layouts is not None else 3.0  # painters: no guidance
        return [batch["image"][:8], gen(texts, seed=0, cfg_scale=cfg).images,
                gen(texts, seed=0, cfg_scale=cfg, critic=model).images]

    @torch.no_grad()
    def evaluate(self, model, batches):
        g = torch.Generator().manual_seed(0)
        accs = []
        for batch in batches:
            tokens = self._tokens(batch["image"])
            masked = random_mask(*tokens.shape, self.config.schedule, "cpu", g)
            cond = self._inputs(batch)
            drawn = self._base_logits(torch.where(masked, self.base.mask_id, tokens), batch,
                                      cond).argmax(-1)
            sampled = masked & (drawn != tokens)
            _, acc = model.critic_loss(torch.where(masked, drawn, tokens), sampled, cond)
            accs.append(float(acc))
        return {"val_accuracy": sum(accs) / len(accs)}


class LayoutTask(MuseTask):
    """A layout model: the segmentation class (background or a shape) of each layout cell
    (a token, or a d x d part of one) from the caption alone, every image token masked, in
    one pass (t2i.generate.LayoutDrawer). A painter (`model.layout`) paints image tokens on
    its layouts."""

    stage = "layout"

    def __init__(self, config: MuseConfig, data, tokenizer=None):
        config.layout_model = True
        super().__init__(config, data, tokenizer)

    def losses(self, engines, batch, step):
        mix = self._layout(batch)[0]
        if self.config.layout_colour_permute and self.config.layout_colour:
            texts, mix = permute_layout_colours(batch["caption"], mix,
                                                self.config.layout_classes)
            ids, mask = self.tokenizer(texts)
            batch = {**batch, "text": ids.to(mix.device), "text_mask": mask.to(mix.device)}
        loss, accuracy = engines["model"](mix, self._inputs(batch, training=True), mode="layout")
        yield "model", loss, {"ce": loss.item(), "accuracy": accuracy.item()}

    @torch.no_grad()
    def samples(self, model, batch):
        """Rows: real images, their layouts, the layouts drawn for their captions."""
        from t2i.generate import LayoutDrawer

        n, size = min(8, len(batch["image"])), batch["image"].shape[-1]
        cond = self._prompts(batch, n)
        drawn = LayoutDrawer(model, self.tokenizer)(**cond)
        true = self._layout(batch)[1][:n]
        return [batch["image"][:n], layout_picture(true, size, self.config),
                layout_picture(drawn, size, self.config)]

    @torch.no_grad()
    def evaluate(self, model, batches):
        """Soft cross-entropy against the class mixes; the class argmax's accuracy against
        each cell's majority class over all cells and over the cells an object holds (what
        carries the shapes: a few percent of them); with `layout_colour` also the colour
        argmax's accuracy over those object cells."""
        k = self.config.layout_classes
        ce, hits, count, object_hits, objects, colour_hits = 0.0, 0, 0, 0, 0, 0
        for batch in batches:
            mix, true = self._layout(batch)
            logits = model.layout_logits(*model.condition(**self._inputs(batch))).float()
            ce += float(layout_ce(logits, mix, k, self.config.layout_colour_weight).sum())
            drawn = pick_layout(logits, k)
            right, on = drawn % k == true % k, true % k > 0
            hits, count = hits + int(right.sum()), count + true.numel()
            object_hits, objects = object_hits + int(right[on].sum()), objects + int(on.sum())
            colour_hits += int((drawn // k == true // k)[on].sum())
        out = {"val_ce": ce / count, "val_accuracy": hits / count}
        if objects:
            out["val_object_accuracy"] = object_hits / objects
            if self.config.layout_colour:
                out["val_colour_accuracy"] = colour_hits / objects
        return out

    def export(self, path: str) -> None:
        """Nothing beside the model: a painter exports it with its own run."""


CONFIG, MODEL = MuseConfig, MaskGitTransformer
STAGES = {"transformer": MuseTask, "critic": CriticTask, "layout": LayoutTask}
