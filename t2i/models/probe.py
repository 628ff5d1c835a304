"""The attribute probe: a small CNN that reads a synthetic scene's table from its pixels.

    image [B, 3, S, S] -> conv stages -> 4x4 grid -> features [B, F] -> per slot and head,
    logits over (nothing, value 1, ..., value n)   (t2i.eval.attributes.HEADS)

It stands in for the pretrained networks no machine here can download: its accuracy on
real validation images is the ceiling of every caption-accuracy figure, and its features
are the space of the Fréchet distance FD-probe. The spatial grid is flattened, not pooled,
so where an object is stays in the features. Trained on the training split with a little
Gaussian noise and blur, so that decoded (slightly soft) images are judged by content.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.eval.attributes import HEAD_CLASSES, SLOTS, caption_scores, scene_table, summarize
from t2i.models import Pretrained
from t2i.training.task import Task


@dataclass
class ProbeConfig:
    image_size: int = 32  # side of the images it reads; others are refused
    channels: int = 32  # width of the first stage
    mults: tuple[int, ...] = (1, 2, 4)  # width multiplier per stage; each but the last halves
    features: int = 256  # penultimate width: the FD-probe feature space
    noise: float = 0.1  # largest std of the Gaussian noise added in training ([-1, 1] scale)
    blur: float = 0.5  # probability of a 3x3 blur in training


class AttributeProbe(nn.Module, Pretrained):
    """>>> probe = AttributeProbe.from_pretrained("runs/probe_shapes")
    >>> probe.predict(images)   # long [B, 5 slots, 3 heads (shape, colour, size)], 0 = none
    >>> probe.features(images)  # [B, 256]"""

    kind = "probe"  # what `t2i eval` scores it as

    def __init__(self, config: ProbeConfig):
        super().__init__()
        self.config = c = config
        layers, width = [], 3
        for i, m in enumerate(c.mults):
            out = c.channels * m
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            if i < len(c.mults) - 1:
                layers.append(nn.AvgPool2d(2))
            width = out
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(width * 16, c.features),
                   nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c.features, len(SLOTS) * sum(HEAD_CLASSES.values()))

    def _check(self, images: torch.Tensor) -> None:
        s = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"the probe reads images [B, 3, {s}, {s}], got "
                             f"{list(images.shape)}")

    def forward(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """-> ({head: logits [B, slots, classes]}, features [B, F])."""
        self._check(images)
        features = self.body(images)
        logits = self.head(features).view(len(images), len(SLOTS), -1)
        heads = logits.split(list(HEAD_CLASSES.values()), -1)
        return dict(zip(HEAD_CLASSES, heads, strict=True)), features

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """-> long [B, slots, heads]: per slot the class of each head, 0 = no object."""
        return self.read(images)[0]

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 256
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables and features of many images in one pass, `batch_size` at a time.
        -> (long [N, slots, heads] on the CPU, features [N, F] on the CPU)."""
        tables, features = [], []
        for i in range(0, len(images), batch_size):
            logits, f = self(images[i:i + batch_size].float())
            tables.append(torch.stack([x.argmax(-1) for x in logits.values()], -1).cpu())
            features.append(f.cpu())
        return torch.cat(tables), torch.cat(features)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        return self.body(images.float())


def _augment(images: torch.Tensor, noise: float, blur: float) -> torch.Tensor:
    b = len(images)
    if blur > 0:
        kernel = torch.tensor([1.0, 2.0, 1.0], device=images.device)
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        soft = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel.to(images.dtype),
                        groups=3)
        pick = torch.rand(b, 1, 1, 1, device=images.device) < blur
        images = torch.where(pick, soft, images)
    if noise > 0:
        std = torch.rand(b, 1, 1, 1, device=images.device, dtype=images.dtype) * noise
        images = images + std * torch.randn_like(images)
    return images


def batch_tables(batch: dict) -> torch.Tensor:
    """The scene tables of a batch's json records, long [B, slots, heads]."""
    records = batch.get("record")
    if records is None or any(r is None or "objects" not in r for r in records):
        raise ValueError("the probe learns from the synthetic scenes' json attributes "
                         "('objects'); this data set has none (train it on `t2i data synth` "
                         "shards)")
    return torch.stack([scene_table(r["objects"]) for r in records])


class ProbeTask(Task):
    family, stage = "probe", "classifier"

    def __init__(self, config: ProbeConfig, data, tokenizer=None):
        super().__init__(config, data, tokenizer)
        if data.image_size != config.image_size:
            raise ValueError(f"model.image_size {config.image_size} differs from "
                             f"data.image_size {data.image_size}")
        self.model = AttributeProbe(config)

    def losses(self, engines, batch, step):
        target = batch_tables(batch).to(batch["image"].device)
        images = _augment(batch["image"], self.config.noise, self.config.blur)
        logits, _ = engines["model"](images)
        loss, logs = 0.0, {}
        for h, (name, x) in enumerate(logits.items()):
            ce = F.cross_entropy(x.flatten(0, 1).float(), target[..., h].flatten())
            loss = loss + ce
            logs[f"{name}_acc"] = float((x.argmax(-1) == target[..., h]).float().mean())
        yield "model", loss, {"ce": loss.item(), **logs}

    @torch.no_grad()
    def samples(self, model, batch):
        """Row 1: the first images; row 2: the worst-read images of the batch."""
        scores = caption_scores(model.predict(batch["image"]).cpu(), batch["record"])
        worst = sorted(range(len(scores)), key=lambda i: scores[i]["score"])[:8]
        return [batch["image"][:8], batch["image"][worst]]

    @torch.no_grad()
    def evaluate(self, model, batches):
        predicted, tables, records = [], [], []
        for batch in batches:
            predicted.append(model.predict(batch["image"]).cpu())
            tables.append(batch_tables(batch))
            records += batch["record"]
        pred, table = torch.cat(predicted), torch.cat(tables)
        summary = summarize(caption_scores(pred, records))
        return {"slot_accuracy": float((pred == table).all(-1).float().mean()),
                **{f"caption_{k}": v for k, v in summary.items()
                   if k != "by_objects" and v is not None}}


CONFIG, MODEL, STAGES = ProbeConfig, AttributeProbe, {"classifier": ProbeTask}
