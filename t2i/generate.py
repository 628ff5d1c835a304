"""MaskGIT decoding: from all-[MASK] to a full token map in a few parallel steps.

Per step: one transformer call (conditional and unconditional rows batched together when
guidance is on), one `sample_logits(..., return_probs=True)` for every masked position at
once, one `lowest_k_mask` choosing what to mask again. No Python loop over tokens.

    >>> gen = MuseGenerator(model, vqgan, tokenizer)
    >>> out = gen(["a large red circle on the left"], steps=12, cfg_scale=3.0, seed=0)
    >>> out.images.shape, out.pil[0]       # [1, 3, 32, 32] in [-1, 1], a PIL image
"""

import ctypes
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from t2i.images import to_pil
from t2i.models.muse import SCHEDULES, mask_ratio, pick_layout
from t2i_kernels import lowest_k_mask, sample_logits

# decoding defaults. A painter samples at temperature 1: since it reads shape ids, the
# cooler 0.5 of "Painting what the layout says" left stray objects (default run, seeds 0-2:
# single-object whole 90.4% -> 92.8%, two-object whole 89.2% -> 90.7%): README "Shape ids".
# On the surer cells' layouts, re-masking by confidence alone (no Gumbel noise) paints more
# of them right (seeds 0-2: single-object shape 63.8% -> 68.7%, two-object whole 39.1% ->
# 42.0%; recall 0.81 -> 0.79): README "The surer cells".
PLAIN_DECODING = {"temperature": 1.0, "remask_temperature": 4.5}
PAINTER_DECODING = {"temperature": 1.0, "remask_temperature": 0.0}
# a drawn layout's objects: the cells where the layout model gives the background less than
# this probability. Each cell's most likely class (about 0.5) rounds the corners that the
# ~1 px a caption's placement varies makes uncertain; the surer cells keep the outline
# (default run, seeds 0-2: single-object shape 56.3% -> 63.8%): README "The surer cells"
LAYOUT_THRESHOLD = 0.4
# ... after unsharp-masking that probability (`pick_layout`): small crosses keep their arms
# (a painter of the default configuration, seed 0: single-object shape 71.6% -> 84.2%,
# two-object captions whole 67.3% -> 80.2%): README "Sharper layouts"
LAYOUT_SHARPEN = 8.0


# glibc's malloc parameters (mallopt): sizes up to this come from the heap, and this much of
# its freed top stays mapped
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_MMAP, _HEAP_TRIM = 64 << 20, 256 << 20
_heap_kept: bool | None = None  # None: not tried yet in this process


def keep_freed_heap() -> bool:
    """CPU decoding: let glibc reuse freed heap memory for the next step's temporaries.

    A decode step allocates a few MiB-sized tensors (logits, probabilities, their sums) and
    frees them. By default glibc serves such sizes from fresh mappings or hands the freed
    top of the heap back to the OS, so every step page-faults its temporaries in again:
    about half of the time a batch-1 decode spends outside the network (benchmarks/
    RESULTS.md, "Generation: Muse base"). Process-wide, tried once: sizes up to 64 MiB come
    from the heap, and up to 256 MiB of freed heap stays mapped. A no-op on other C
    libraries and with T2I_MALLOC=system. -> whether the parameters are set."""
    global _heap_kept
    if _heap_kept is None and os.environ.get("T2I_MALLOC", "") != "system":
        _heap_kept = False
        try:
            libc = ctypes.CDLL(None)  # the symbols the process already has: its C library
            if hasattr(libc, "gnu_get_libc_version"):  # glibc: another's parameters differ
                _heap_kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_MMAP)) and \
                    bool(libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_TRIM))
        except (OSError, AttributeError):
            pass
    return bool(_heap_kept)


@dataclass
class Generated:
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    tokens: torch.Tensor  # long [B, g, g]
    steps: list[torch.Tensor] | None = None  # token map after each step (mask id = masked)
    layout: torch.Tensor | None = None  # painters: the layouts painted on, long [B, g*d, g*d]

    @property
    def pil(self):
        return to_pil(self.images)


def masked_counts(n: int, steps: int, schedule: str) -> list[int]:
    """Tokens still masked after each step: decreasing by at least one, 0 after the last."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out, current = [], n
    for t in range(steps):
        k = math.floor(n * float(mask_ratio((t + 1) / steps, schedule)))
        current = 0 if t == steps - 1 else max(0, min(k, current - 1))
        out.append(current)
    return out


def _minus_gumbel(shape, generator, device) -> torch.Tensor:
    """log(-log u), u uniform from the generator (on its device): minus a standard Gumbel
    sample, in place (torch's exponential_ is 2x slower than these three passes at 8k draws).
    u = 0 gives +inf: the callers scale it by a positive factor."""
    return torch.rand(shape, generator=generator, device=generator.device).log_().neg_().log_() \
        .to(device)


def encode_texts(tokenizer, texts: Sequence[str], device, warn: bool = True):
    """Prompts -> (ids long [B, T], mask bool [B, T]) on `device`; empty prompts are an
    error, prompts past the tokenizer's length are truncated (with a warning)."""
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise ValueError("a prompt is empty; every prompt needs some text")
    ids, cut = [], []
    for i, t in enumerate(texts):
        enc, truncated = tokenizer.encode(t)
        if truncated:
            cut.append(i)
        ids.append(enc)
    if cut and warn:
        warnings.warn(f"prompt(s) {cut} longer than the model's {tokenizer.max_length} "
                      f"text tokens: truncated", stacklevel=4)
    ids, masks = tokenizer.pad(ids)
    return ids.to(device), masks.to(device)


class LayoutDrawer:
    """Captions (or class ids) -> layouts: the segmentation class (and colour) of each
    layout cell, drawn by a layout model (MaskGitTransformer with config.layout_model, read
    with its own caption tokenizer) in one pass (`pick_layout`): an object's most likely
    class and colour where the background's probability is below `threshold`, else the
    background."""

    def __init__(self, model, tokenizer=None, threshold: float = LAYOUT_THRESHOLD,
                 sharpen: float = LAYOUT_SHARPEN):
        if not model.config.layout_model:
            raise ValueError("LayoutDrawer needs a layout model (training stage 'layout')")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.threshold, self.sharpen = threshold, sharpen

    @torch.no_grad()
    def __call__(self, texts: Sequence[str] | None = None, class_ids=None,
                 threshold: float | None = None, sharpen: float | None = None
                 ) -> torch.Tensor:
        """-> layout maps long [B, g*d, g*d] (d: config.layout_detail) on the model's
        device. threshold / sharpen: this call's, instead of the drawer's."""
        threshold = self.threshold if threshold is None else threshold
        sharpen = self.sharpen if sharpen is None else sharpen
        if not 0 < threshold <= 1:
            raise ValueError(f"layout threshold must be in (0, 1], got {threshold}")
        if sharpen < 0:
            raise ValueError(f"layout sharpen must be >= 0, got {sharpen}")
        model = self.model
        device = next(model.parameters()).device
        if model.config.condition == "text":
            ids, mask = encode_texts(self.tokenizer, texts, device, warn=False)
            ctx = model.condition(text=ids, text_mask=mask)
        else:
            ctx = model.condition(class_ids=torch.as_tensor(class_ids).to(device))
        return pick_layout(model.layout_logits(*ctx), model.config.layout_classes, threshold,
                           sharpen)


class MuseGenerator:
    """Text (or class) -> images with a trained MaskGitTransformer, its VQGAN and its
    caption tokenizer. `low`: a super-resolution stage's LowRes (t2i.models.muse), whose
    tokens come from `base` (another MuseGenerator) or are given. `layouts`: a painter's
    LayoutDrawer, whose layouts it paints on."""

    def __init__(self, model, vqgan, tokenizer=None, *, low=None, base=None, critic=None,
                 layouts=None):
        self.model, self.vqgan, self.tokenizer = model.eval(), vqgan.eval(), tokenizer
        self.low, self.base, self.critic = low, base, critic
        if bool(model.config.layout) != (layouts is not None):
            raise ValueError("a painter (model.layout) generates with the LayoutDrawer of its "
                             "layout model, and only a painter does")
        self.layouts = layouts
        self.transformer_seconds = 0.0  # time inside transformer calls (benchmarks read it)
        self.decode_seconds = 0.0  # time in the VQGAN decoder (tokens -> pixels)
        # True: synchronise CUDA around the timed calls so that the two figures above hold
        # the GPU's time, not the launches' (benchmarks; it stalls the launch queue)
        self.synchronize = False

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, texts: Sequence[str] | str | None = None, *, class_ids=None,
                 negative_texts: Sequence[str] | None = None, steps: int = 12,
                 schedule: str = "cosine",
                 temperature: float | tuple[float, float] | None = None,
                 remask_temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, cfg_scale: float | None = None,
                 critic: str | None = None, remask_fixed: bool = False, seed: int | None = None,
                 generator: torch.Generator | None = None, batch_size: int | None = None,
                 low_res_tokens: torch.Tensor | None = None,
                 low_res_images: torch.Tensor | None = None,
                 layout_threshold: float | None = None, layout_sharpen: float | None = None,
                 return_steps: bool = False) -> Generated:
        """Generate one image per text (or class id).

        temperature: token sampling temperature, or (start, end) annealed linearly over
        the steps. remask_temperature: Gumbel noise on the confidences that decide what is
        masked again, annealed to 0 (MaskGIT's choice temperature). None: the model's
        defaults, `PAINTER_DECODING` for a painter (its images come out cleaner: colours and
        whole captions right more often), else 1 and 4.5. cfg_scale: logits =
        uncond + cfg_scale * (cond - uncond): 1 is the conditional model, 0 the
        unconditional one, None no guidance (one pass per step). negative_texts replace the
        unconditional rows' null condition. critic: None (the sampled tokens' own
        probabilities), "self" (the model re-scores the completed map: one more call per
        step), "critic" (the token critic this generator was loaded with) or a critic
        model (MaskGitTransformer with config.critic). remask_fixed: tokens fixed in
        earlier steps may be masked again. layout_threshold: a painter's layouts have
        objects where the layout model gives the background less than this probability
        (None: its LayoutDrawer's, `LAYOUT_THRESHOLD` by default), after unsharp-masking it
        by `layout_sharpen` (None: the drawer's, `LAYOUT_SHARPEN`; 0: none). seed / generator:
        reproducible draws on any kernel backend, on the same kind of device (a seed draws
        its noise on the model's device: CPU and CUDA runs of one seed differ)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if self.device.type == "cpu":
            keep_freed_heap()
        defaults = PAINTER_DECODING if self.layouts is not None else PLAIN_DECODING
        temperature = defaults["temperature"] if temperature is None else temperature
        if remask_temperature is None:
            remask_temperature = defaults["remask_temperature"]
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        c = self.model.config
        if c.condition == "text":
            if texts is None:
                raise ValueError("this model generates from texts")
            texts = [texts] if isinstance(texts, str) else list(texts)
            rows = len(texts)
        else:
            if class_ids is None:
                raise ValueError("this model is class-conditional: pass class_ids")
            class_ids = torch.as_tensor(class_ids, dtype=torch.long).flatten()
            rows = len(class_ids)
        if rows == 0:
            raise ValueError("no prompts: pass at least one text or class id")
        if cfg_scale is not None and c.cond_dropout == 0:
            warnings.warn("cfg_scale given, but this model was trained without condition "
                          "dropout: its unconditional branch is untrained", stacklevel=2)
        if (layout_threshold, layout_sharpen) != (None, None) and self.layouts is None:
            raise ValueError("layout_threshold / layout_sharpen: this model paints on no "
                             "layout (not a painter)")
        if negative_texts is not None and len(negative_texts) != rows:
            raise ValueError(f"{len(negative_texts)} negative texts for {rows} prompts")
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(0 if seed is None else seed)
        if self.low is not None and low_res_tokens is None:
            if low_res_images is not None:
                low_res_tokens = self.low.tokens(low_res_images.to(self.device))
            elif self.base is not None:  # a painter base decodes without guidance, which
                # blurs its shapes; another base with this call's guidance
                base_cfg = None if self.base.layouts is not None else cfg_scale
                low_res_tokens = self.base(texts, class_ids=class_ids, steps=steps,
                                           cfg_scale=base_cfg, generator=generator,
                                           negative_texts=negative_texts,
                                           batch_size=batch_size).tokens.flatten(1)
            else:
                raise ValueError("a super-resolution stage needs low_res_tokens, "
                                 "low_res_images or a base generator")
        if critic == "critic":
            if self.critic is None:
                raise ValueError("critic='critic' needs a generator loaded with a critic")
            critic = self.critic
        batch_size = batch_size or rows
        outs, drawn = [], []
        for start in range(0, rows, batch_size):
            sl = slice(start, start + batch_size)
            cond = {}
            if c.condition == "text":
                cond["text"], cond["text_mask"] = encode_texts(self.tokenizer, texts[sl],
                                                               self.device)
            else:
                cond["class_ids"] = class_ids[sl].to(self.device)
            if low_res_tokens is not None:
                cond["low_res"] = low_res_tokens[sl].to(self.device)
            negative = None
            if negative_texts is not None:
                negative = encode_texts(self.tokenizer, negative_texts[sl], self.device)
            layout = None
            if self.layouts is not None:  # a painter: the layout first, then the tokens on it
                layout = self._timed(self.layouts, texts[sl] if texts is not None else None,
                                     class_ids[sl] if class_ids is not None else None,
                                     layout_threshold, layout_sharpen)
                drawn.append(layout)
            outs.append(self._decode(cond, negative, steps, schedule, temperature,
                                     remask_temperature, top_k, top_p, cfg_scale,
                                     critic, remask_fixed, generator, return_steps, layout))
        tokens = torch.cat([o[0] for o in outs])
        grid = c.grid
        tokens = tokens.view(-1, grid, grid)
        start = self._clock()
        images = self.vqgan.decode(tokens).clamp(-1, 1)
        self.decode_seconds += self._clock() - start
        history = None
        if return_steps:
            history = [torch.cat([o[1][t] for o in outs]).view(-1, grid, grid)
                       for t in range(steps)]
        layout = torch.cat(drawn) if drawn else None
        return Generated(images=images, tokens=tokens, steps=history, layout=layout)

    def _timed(self, fn, *args, **kwargs):
        """Run a network call (text encoder, transformer, output head), adding its time to
        `transformer_seconds`: what decoding spends outside is the rest."""
        start = self._clock()
        out = fn(*args, **kwargs)
        self.transformer_seconds += self._clock() - start
        return out

    def _clock(self) -> float:
        if self.synchronize and self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _logits(self, inputs, ctx, ctx_mask, self_cond, where, layout=None):
        """Logits at the positions `where` (long [R, k], R = rows of inputs; None: all):
        the output head runs only where tokens are still to be drawn."""
        _, hidden = self._timed(self.model.transformer, inputs, ctx, ctx_mask, self_cond,
                                return_logits=False, layout=layout)
        picked = hidden
        if where is not None:  # rows of the flattened [R * N, dim]: 5x a broadcast gather
            r, n, d = hidden.shape
            flat = where if r == 1 else where + torch.arange(r, device=where.device)[:, None] * n
            picked = hidden.reshape(r * n, d).index_select(0, flat.flatten()).view(r, -1, d)
        return self._timed(self.model.head, picked), hidden

    def _decode(self, cond, negative, steps, schedule, temperature, remask_temperature,
                top_k, top_p, cfg_scale, critic, remask_fixed, generator, return_steps,
                layout=None):
        model, device = self.model, self.device
        ctx, ctx_mask = self._timed(model.condition, **cond)
        b, n, v = ctx.shape[0], model.num_tokens, model.config.num_codes
        guided = cfg_scale is not None
        if layout is not None and guided:  # both halves paint on the same layout
            layout = torch.cat([layout, layout])
        if layout is not None:  # its features once, for every step
            layout = self._timed(model.layout_features, layout)
        if guided:  # conditional rows first, then the unconditional (null or negative) ones
            if negative is not None:
                u_ctx, u_mask = self._timed(model.condition, **{**cond, "text": negative[0],
                                                                "text_mask": negative[1]})
            else:
                u_ctx, u_mask = self._timed(model.condition, **cond, drop=True)
            length = max(ctx.shape[1], u_ctx.shape[1])
            ctx = torch.cat([_pad(ctx, length), _pad(u_ctx, length)])
            ctx_mask = torch.cat([_pad(ctx_mask, length), _pad(u_mask, length)])
        tokens = torch.full((b, n), model.mask_id, dtype=torch.long, device=device)
        known = torch.zeros(b, n, dtype=torch.bool, device=device)
        hidden = None
        history = []
        current = n  # every row has exactly this many masked tokens
        for t, n_masked in enumerate(masked_counts(n, steps, schedule)):
            # the masked positions of each row, in order (a stable sort: no host sync)
            where = None if remask_fixed else \
                torch.argsort(known.to(torch.int8), dim=1, stable=True)[:, :current]
            inputs = torch.cat([tokens, tokens]) if guided else tokens
            rows = None if where is None else (torch.cat([where, where]) if guided else where)
            logits, hidden = self._logits(inputs, ctx, ctx_mask, hidden, rows, layout)
            cond_logits = None
            if guided:
                cond_logits, logits = logits[:b], logits[b:]
            k = logits.shape[1]
            temp = temperature if not isinstance(temperature, (tuple, list)) else \
                temperature[0] + (temperature[1] - temperature[0]) * t / max(1, steps - 1)
            # one uniform a row (the inverse CDF): V times fewer draws than the race
            noise = torch.rand(b * k, generator=generator, device=generator.device).to(device)
            drawn, probs = sample_logits(
                logits.reshape(b * k, v), temperature=temp, top_k=top_k, top_p=top_p,
                cond_logits=cond_logits.reshape(b * k, v) if guided else None,
                cfg_scale=cfg_scale, noise=noise, return_probs=True)
            drawn, probs = drawn.view(b, k), probs.view(b, k)
            sampled = torch.where(known, tokens, drawn) if where is None else \
                tokens.scatter(1, where, drawn)
            if n_masked == 0:  # every drawn token stays (the last step): nothing to rank
                tokens, known = sampled, torch.ones_like(known)
            else:
                log_probs = probs.clamp_min_(1e-30).log_()
                if where is None:
                    confidence = log_probs
                else:  # known tokens at +inf: never masked again
                    confidence = torch.full((b, n), math.inf, device=device).scatter_(
                        1, where, log_probs)
                if critic == "self":
                    # the model's probability of each token given the completed map
                    full = torch.cat([sampled, sampled]) if guided else sampled
                    re_logits, _ = self._logits(full, ctx, ctx_mask, None, None, layout)
                    confidence = torch.log_softmax(re_logits[:b].float(), -1).gather(
                        -1, sampled[..., None])[..., 0]
                elif critic is not None:  # a token critic model reads the map itself
                    confidence = self._timed(critic.score, sampled, **cond)
                elif remask_fixed:  # fixed tokens compete with their current probability
                    mixed = logits if cond_logits is None else \
                        logits + cfg_scale * (cond_logits - logits)
                    fixed = torch.log_softmax(mixed.float(), -1).gather(
                        -1, sampled[..., None])[..., 0]
                    confidence = torch.where(known, fixed, confidence)
                if remask_temperature > 0:  # + scale * Gumbel noise
                    scale = remask_temperature * (1 - (t + 1) / steps)
                    confidence = confidence.sub_(_minus_gumbel((b, n), generator, device),
                                                 alpha=scale)
                if not remask_fixed and critic is not None:
                    confidence = confidence.masked_fill(known, math.inf)
                remask = lowest_k_mask(confidence.float(), n_masked)
                tokens = torch.where(remask, model.mask_id, sampled)
                known = ~remask
            current = n_masked
            if return_steps:
                history.append(tokens.clone())
        return tokens, history


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dim 1 to `length` with zeros (False for masks)."""
    if x.shape[1] == length:
        return x
    pad = torch.zeros(x.shape[0], length - x.shape[1], *x.shape[2:], dtype=x.dtype,
                      device=x.device)
    return torch.cat([x, pad], 1)
