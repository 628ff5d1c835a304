"""Trained generators from run directories, ready to call.

    >>> pipe = t2i.pipelines.load("runs/muse_shapes")
    >>> images = pipe(["a red circle above a blue square"], seed=0).images   # [1, 3, 32, 32]

A run's export/ holds everything: the transformer (model.safetensors, config.json), the
caption tokenizer, the frozen VQGAN(s) it was trained on (vqgan/, low_res_vqgan/) and, for
a painter, its layout model with that model's caption tokenizer (layout/). Neither
DeepSpeed nor the training code is needed.
"""

import json
import os

from t2i.data import load_tokenizer
from t2i.generate import LayoutDrawer, MuseGenerator
from t2i.models import export_path, load_pretrained


def _export_dir(run_dir: str) -> str:
    path = export_path(run_dir)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{run_dir}: no exported model (export/config.json); a "
                                f"training run writes one at every checkpoint")
    return path


def load(run_dir: str, *, base: str | None = None, critic: str | None = None,
         device: str = "cpu") -> MuseGenerator:
    """The generator exported under `run_dir`. A super-resolution stage chains after the
    base stage at `base` (a run directory), unless low-res tokens or images are passed at
    call time. `critic`: a token-critic run, used when generating with critic="critic"."""
    from t2i.models.muse import LowRes, MaskGitTransformer

    path = _export_dir(run_dir)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if meta["family"] != "muse":
        raise ValueError(f"{run_dir} holds a {meta['family']} {meta['stage']}, not a "
                         f"generator (t2i.pipelines loads: muse)")
    model = load_pretrained(path, expect=MaskGitTransformer).to(device)
    if model.config.critic:
        raise ValueError(f"{run_dir} holds a token critic; load its generator and pass "
                         f"critic={run_dir!r}")
    if model.config.layout_model:
        raise ValueError(f"{run_dir} holds a layout model; load a painter trained with "
                         f"model.layout={run_dir!r}")
    vqgan = load_pretrained(os.path.join(path, "vqgan")).to(device)
    tokenizer = load_tokenizer(path)
    low = base_gen = None
    if model.config.low_res_codes:
        low_path = os.path.join(path, "low_res_vqgan")
        low = LowRes(load_pretrained(low_path).to(device), model.config.low_res_size)
        if base is not None:
            base_gen = load(base, device=device)
    judge = None
    if critic is not None:
        judge = load_pretrained(_export_dir(critic), expect=MaskGitTransformer).to(device)
        if not judge.config.critic:
            raise ValueError(f"{critic} holds a generator, not a token critic")
    layouts = load_layouts(os.path.join(path, "layout"), device) if model.config.layout \
        else None
    return MuseGenerator(model, vqgan, tokenizer, low=low, base=base_gen, critic=judge,
                         layouts=layouts)


def load_layouts(run_dir: str, device: str = "cpu") -> LayoutDrawer:
    """The layout model exported under `run_dir` (a layout run, or a painter's export/layout)
    with its caption tokenizer."""
    from t2i.models.muse import MaskGitTransformer

    path = _export_dir(run_dir)
    model = load_pretrained(path, expect=MaskGitTransformer).to(device)
    if not model.config.layout_model:
        raise ValueError(f"{run_dir} holds no layout model (training stage 'layout')")
    tokenizer = load_tokenizer(path) if model.config.condition == "text" else None
    return LayoutDrawer(model, tokenizer)
