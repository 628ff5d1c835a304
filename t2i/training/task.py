"""What a family stage gives the training loop: its modules and how to train them.

A family module (t2i/models/<family>.py) defines its config dataclass, its model and one
Task subclass per stage; the registry in t2i/models/__init__.py maps the config's
`model.family` to that module. train.py knows nothing else about any family.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def unwrap(engine) -> nn.Module:
    """The nn.Module inside a DeepSpeed engine (or the module itself)."""
    return getattr(engine, "module", engine)


@contextmanager
def frozen(module: nn.Module):
    """Parameters of `module` take no gradient inside (a GAN's discriminator while the
    generator's loss goes through it), restored afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class TokenCache:
    """A frozen tokenizer's token maps, kept per sample key: a training run encodes each
    image once, not once per epoch (the images are decoded and centre-cropped the same way
    every time). `encode`: images [B, ...] -> long [B, N], run in full precision also
    under run.autocast (a nearest code must not move with the precision). Holds at most
    `limit` maps, as int16 on the CPU when the codes fit (256 tokens: 512 bytes a
    sample)."""

    def __init__(self, encode, limit: int = 200_000):
        self.encode, self.limit = encode, limit
        self.store: dict[str, torch.Tensor] = {}

    def __call__(self, images: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):
            return self._cached(images, keys)

    def _cached(self, images: torch.Tensor, keys: list[str] | None) -> torch.Tensor:
        if keys is None or self.limit <= 0:
            return self.encode(images)
        maps = [self.store.get(k) for k in keys]
        missing = [i for i, m in enumerate(maps) if m is None]
        if missing:
            fresh = self.encode(images[missing])
            small = fresh.cpu().to(torch.int16) if int(fresh.max()) < 2**15 else fresh.cpu()
            for j, i in enumerate(missing):
                maps[i] = small[j]
                if len(self.store) < self.limit:
                    self.store[keys[i]] = small[j]
        return torch.stack(maps).to(images.device, torch.long)


class Task:
    """One family stage's recipe.

    `model` is the module exported for inference (model.safetensors). `modules()` lists
    every trained module, the model first; each gets its own optimiser and DeepSpeed
    engine (a GAN: generator, then discriminator). `losses` yields, in order, one
    (module name, loss, logs) per optimiser for a batch; the loop checks the loss, runs
    backward and steps that module's engine before asking for the next.
    """

    family = ""
    stage = ""

    def __init__(self, config, data, tokenizer=None):
        self.config = config  # the family's config dataclass
        self.data = data  # t2i.training.config.DataConfig
        self.tokenizer = tokenizer  # t2i.data.Tokenizer of the captions (None outside training)
        self.model: nn.Module

    @classmethod
    def prerequisite(cls, model: dict) -> tuple[str, list[str], bool] | None:
        """(config path, overrides, beside) of a stage train.py must train, when this stage
        needs its output and it is missing or unfinished (a transformer's image tokenizer).
        `beside`: this stage trains without it (it needs it only for its sample grids and
        export, as a painter its layout model), so train.py may train the two at once;
        otherwise first."""
        return None

    def export(self, path: str) -> None:
        """Write what inference needs beside the exported model (a frozen tokenizer)."""

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    @property
    def zero3_ok(self) -> bool:
        """False when a loss calls a module outside its own engine's forward (a frozen
        discriminator inside the generator's loss): ZeRO-3 releases such a module's
        partitioned weights before the backward that needs them."""
        return True

    def lr_scale(self, name: str) -> float:
        """Learning rate of module `name` relative to run.lr."""
        return 1.0

    def losses(self, engines: dict, batch: dict, step: int
               ) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        raise NotImplementedError

    @torch.no_grad()
    def samples(self, model: nn.Module, batch: dict) -> list[torch.Tensor]:
        """Rows of a sample grid, each [N, 3, H, W] in [-1, 1]."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict]) -> dict[str, float]:
        """Validation metrics of the model on these batches."""
        raise NotImplementedError
