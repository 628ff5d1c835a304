"""Training configuration: a YAML file of three sections (model, data, run), checked against
dataclasses before any work starts, plus `key=value` overrides from the command line.

    model:  family + stage (which registry entry and recipe), then that family's config
    data:   where the shards are and how images and captions are prepared
    run:    steps, optimiser, schedule, logging, checkpoints, EMA

ZeRO stage, precision, micro-batch size and gradient accumulation are not here: they are
DeepSpeed's, in the JSON given with --deepspeed_config (training/configs/ds_zero*.json).
A wrong key, a wrong type or a missing data path fails with a message naming the key.
"""

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    """A configuration mistake, found before any work starts."""


@dataclass
class DataConfig:
    path: str = "data/synth"  # shard folder, split.json or tar paths (t2i.data.resolve_shards)
    synth_if_missing: int = 20000  # scenes to synthesise when `path` is absent (0: fail)
    synth_held_out: float = 0.0  # share of those training scenes with a held-out pair (probe)
    image_size: int = 32  # images are resized (shorter side) and centre-cropped to this
    text_length: int = 224  # caption tokens with <bos>/<eos> (synthetic captions: <= 208 bytes)
    tokenizer: str = "byte"  # "byte", "bpe" (trained on the captions), or a tokenizer folder
    bpe_vocab: int = 512  # "bpe": vocabulary size (256 byte tokens + merges + 4 specials)
    workers: int = 1  # DataLoader worker processes per rank
    val_batches: int = 4  # validation batches for sample grids and evaluation


@dataclass
class RunConfig:
    out: str = "runs/default"  # run directory: checkpoints, export, samples, logs
    steps: int = 2000  # optimiser steps
    seed: int = 0  # model initialisation (same on every rank) and training randomness
    lr: float = 2e-4  # peak learning rate
    betas: tuple[float, float] = (0.5, 0.9)  # AdamW betas (VQGAN's)
    weight_decay: float = 0.0
    warmup: int = 100  # linear warm-up steps
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant" after warm-up
    min_lr_ratio: float = 0.1
    ema: float = 0.0  # decay of an EMA of the model's weights (0: none); exported when set
    log_every: int = 20  # steps between metrics.jsonl / TensorBoard rows
    sample_every: int = 500  # steps between sample grids (PNG) of validation batches
    ckpt_every: int = 500  # steps between DeepSpeed checkpoints
    keep: int = 2  # checkpoints kept (older ones are deleted once a newer one is complete)
    max_bad_steps: int = 20  # consecutive non-finite losses that stop the run
    progress: bool = True  # tqdm progress bar on rank 0
    autocast: str = "off"  # "bf16": forward passes under torch.autocast in bfloat16 (matrix
    # products and convolutions; weights, optimiser and losses stay fp32); "auto": bf16 on a
    # CPU with native bf16 dot products (avx512_bf16 / amx_bf16: a painter step ~1.2x),
    # else off (a GPU: use DeepSpeed's bf16 config, ds_zero2_bf16.json)


@dataclass
class TrainConfig:
    model: dict = field(default_factory=dict)  # family, stage, then the family's own keys
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """`value` as type `tp`, or ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in
                         enumerate(zip(value, args, strict=True)))
        inner = args[0] if args else typing.Any
        return origin(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is typing.Any or tp is dict and isinstance(value, dict):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls, data: dict | None, prefix: str):
    """Build dataclass `cls` from `data`, checking every key and type."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}.{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{prefix}.{key}'{hint}; known: "
                              f"{', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}.{name}")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}.{name}")
    return cls(**kwargs)


def apply_override(raw: dict, override: str) -> None:
    """`section.key=value` (value parsed as YAML; nothing after '=': the empty string) into
    the raw config mapping."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. run.steps=100")
    path, value = override.split("=", 1)
    keys = path.strip().split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(value) if value.strip() else ""


def load_config(path: str | None, overrides: list[str] = ()) -> tuple[TrainConfig, dict]:
    """-> (checked TrainConfig, raw mapping). Raises ConfigError naming the bad key."""
    raw: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"--config {path}: no such file")
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections model/data/run")
    for override in overrides:
        apply_override(raw, override)
    config = from_dict(TrainConfig, raw, "config")
    for key in ("family", "stage"):
        if not isinstance(config.model.get(key), str):
            raise ConfigError(f"model.{key}: required (a string), got "
                              f"{config.model.get(key)!r}")
    if config.run.schedule not in ("cosine", "constant"):
        raise ConfigError(f"run.schedule: 'cosine' or 'constant', got {config.run.schedule!r}")
    if config.run.autocast not in ("off", "bf16", "auto"):
        raise ConfigError(f"run.autocast: 'off', 'bf16' or 'auto', got {config.run.autocast!r}")
    for key in ("steps", "log_every", "sample_every", "ckpt_every", "keep", "max_bad_steps"):
        if getattr(config.run, key) < 1:
            raise ConfigError(f"run.{key}: must be >= 1, got {getattr(config.run, key)}")
    if not 0.0 <= config.run.ema < 1.0:
        raise ConfigError(f"run.ema: a decay in [0, 1), got {config.run.ema}")
    if not os.path.exists(config.data.path) and config.data.synth_if_missing <= 0:
        raise ConfigError(f"data.path: {config.data.path!r} does not exist (set "
                          f"data.synth_if_missing > 0 to synthesise scenes there)")
    return config, raw
