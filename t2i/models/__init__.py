"""Model families, and the registry that train.py and the loaders pick them from.

Adding a family is one module defining CONFIG (its config dataclass), MODEL (the exported
nn.Module class) and STAGES (stage name -> t2i.training.task.Task subclass), plus one line
in FAMILIES below.
"""

import dataclasses
import importlib
import json
import os

FAMILIES = {
    "vqgan": "t2i.models.vqgan",  # VQGAN image tokenizer (Make-A-Scene's VQ-IMG)
    "dvae": "t2i.models.dvae",  # DALL-E discrete VAE
    "vqseg": "t2i.models.vqseg",  # Make-A-Scene segmentation-map tokenizer
    "muse": "t2i.models.muse",  # Muse / MaskGIT masked-token transformer (base, super-res)
    "probe": "t2i.models.probe",  # attribute probe that scores generated scenes (t2i.eval)
}


def get_family(name: str):
    if name not in FAMILIES:
        raise ValueError(f"model.family: unknown family {name!r}; known: "
                         f"{', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def save_pretrained(model, out_dir: str, *, family: str, stage: str,
                    extra: dict | None = None) -> None:
    """model.safetensors (fp32) + config.json, written to a temporary name and renamed."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point()
             else v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors.tmp"))
    os.replace(os.path.join(out_dir, "model.safetensors.tmp"),
               os.path.join(out_dir, "model.safetensors"))
    meta = {"family": family, "stage": stage, "model": dataclasses.asdict(model.config),
            **(extra or {})}
    with open(os.path.join(out_dir, "config.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(out_dir, "config.json.tmp"), os.path.join(out_dir, "config.json"))


def export_path(path: str) -> str:
    """Where a run's exported model lives: `path`/export when the run has one, else `path`
    itself (an export folder given directly)."""
    export = os.path.join(path, "export")
    return export if os.path.isdir(export) else path


def finished_export(path: str) -> bool:
    """Whether `path` (a run directory or its export/ folder) holds the exported model of its
    run's last step. A run exports at every checkpoint: one interrupted, or still training,
    holds an earlier step's. An export that names no run length (not from training) counts."""
    try:
        with open(os.path.join(export_path(path), "config.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return False
    return meta.get("step", 0) >= meta.get("steps", 0)


def load_pretrained(path: str, expect: type | None = None):
    """The model exported to `path` (a run directory or its export/ folder), in eval mode.
    Needs neither DeepSpeed nor the training code."""
    from safetensors.torch import load_file

    from t2i.training.config import from_dict

    path = export_path(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: no exported model (config.json); a training run "
                                f"exports one with every checkpoint and at its end")
    with open(config_path, encoding="utf-8") as f:
        meta = json.load(f)
    family = get_family(meta["family"])
    config = from_dict(family.CONFIG, meta["model"], "model")
    model = family.MODEL(config)
    if expect is not None and not isinstance(model, expect):
        raise TypeError(f"{path} holds a {meta['family']} model, not a {expect.__name__}")
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return model.eval()


class Pretrained:
    """Mixin: `Model.from_pretrained(run_dir)`."""

    @classmethod
    def from_pretrained(cls, path: str):
        return load_pretrained(path, expect=cls)
