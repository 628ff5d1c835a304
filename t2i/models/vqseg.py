"""VQ-SEG: Make-A-Scene's segmentation-map tokenizer (Gafni et al. 2022, section 3.1).

    class map [B, H, W] -> one-hot [B, C, H, W] -> Encoder -> VectorQuantizer -> indices
    indices -> codes -> Decoder -> class logits [B, C, H, W] -> argmax class map

Trained with a per-class binary cross-entropy, weighted up on chosen classes
(`heavy_classes`: the paper's faces and people; here any class ids) by `heavy_weight`.
Pixels marked -1 (samples without a map) are ignored.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.data.scenes import SHAPES
from t2i.eval.metrics import codebook_stats, mean_iou, pixel_accuracy
from t2i.models import Pretrained
from t2i.modules.conv import ConvStackConfig, Decoder, Encoder
from t2i.modules.quantizer import QuantizerConfig, VectorQuantizer
from t2i.training.task import Task

# a fixed colour per class for pictures of class maps (background dark grey)
PALETTE = torch.tensor([[40, 40, 40], [230, 25, 75], [60, 180, 75], [255, 225, 25],
                        [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
                        [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]])


@dataclass
class VQSegConfig(ConvStackConfig):
    num_classes: int = len(SHAPES) + 1  # class 0 is background (synthetic scenes: 8)
    num_codes: int = 256  # codebook size
    code_dim: int = 32
    commitment: float = 0.25
    heavy_classes: tuple[int, ...] = ()  # classes whose BCE weighs heavy_weight
    heavy_weight: float = 5.0


class VQSeg(nn.Module, Pretrained):
    """>>> seg_tok = VQSeg(VQSegConfig()); ids = seg_tok.encode(class_map)  # [B, H/4, W/4]
    >>> seg_tok.decode(ids).shape                                           # [B, H, W] long"""

    kind = "seg_tokenizer"  # what `t2i eval` scores it as

    def __init__(self, config: VQSegConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c.num_classes, c.code_dim, c.channels, c.mults, c.res_blocks)
        self.quantizer = VectorQuantizer(QuantizerConfig(
            num_codes=c.num_codes, dim=c.code_dim, beta=c.commitment, channel_first=True))
        self.decoder = Decoder(c.code_dim, c.num_classes, c.channels, c.mults, c.res_blocks)

    def one_hot(self, seg: torch.Tensor) -> torch.Tensor:
        """Class map [B, H, W] (-1: unknown) -> [B, C, H, W] float, all zero where unknown."""
        if int(seg.max()) >= self.config.num_classes:
            raise ValueError(f"class map has class {int(seg.max())} but the model has "
                             f"{self.config.num_classes} classes")
        onehot = F.one_hot(seg.clamp_min(0), self.config.num_classes).permute(0, 3, 1, 2)
        return (onehot * (seg >= 0).unsqueeze(1)).to(self.encoder.layers[0].weight.dtype)

    def forward(self, seg: torch.Tensor):
        """-> (class logits [B, C, H, W], QuantizerOutput)."""
        q = self.quantizer(self.encoder(self.one_hot(seg)))
        return self.decoder(q.quantized), q

    @torch.no_grad()
    def encode(self, seg: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.encoder(self.one_hot(seg))).indices

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.embed(indices)).argmax(1)


def colourise(seg: torch.Tensor) -> torch.Tensor:
    """Class map [B, H, W] -> picture [B, 3, H, W] in [-1, 1]."""
    palette = PALETTE.to(seg.device).float() / 127.5 - 1
    return palette[seg.clamp_min(0) % len(PALETTE)].permute(0, 3, 1, 2)


class VQSegTask(Task):
    family, stage = "vqseg", "tokenizer"

    def __init__(self, config: VQSegConfig, data, tokenizer=None):
        super().__init__(config, data, tokenizer)
        self.model = VQSeg(config)
        weights = torch.ones(config.num_classes)
        weights[list(config.heavy_classes)] = config.heavy_weight
        self.class_weights = weights

    def losses(self, engines, batch, step):
        seg = batch["seg"]
        logits, q = engines["model"](seg)
        target = F.one_hot(seg.clamp_min(0), self.config.num_classes).permute(0, 3, 1, 2)
        weight = self.class_weights.to(logits.device, logits.dtype)[None, :, None, None]
        known = (seg >= 0).unsqueeze(1).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype),
                                                 weight=weight * known, reduction="sum")
        bce = bce / (known.sum() * self.config.num_classes).clamp_min(1)
        accuracy = pixel_accuracy(logits.argmax(1), seg)
        yield "model", bce + q.loss, {"bce": bce.item(), "commit": q.loss.item(),
                                      "accuracy": accuracy, "usage": q.usage.item()}

    @torch.no_grad()
    def samples(self, model, batch):
        seg = batch["seg"][:8]
        return [batch["image"][:8], colourise(seg), colourise(model.decode(model.encode(seg)))]

    @torch.no_grad()
    def evaluate(self, model, batches):
        preds, targets, indices = [], [], []
        for batch in batches:
            ids = model.encode(batch["seg"])
            preds.append(model.decode(ids))
            targets.append(batch["seg"])
            indices.append(ids.flatten())
        pred, target = torch.cat(preds), torch.cat(targets)
        return {"pixel_accuracy": pixel_accuracy(pred, target),
                "mean_iou": mean_iou(pred, target, self.config.num_classes),
                **codebook_stats(torch.cat(indices), self.config.num_codes)}


CONFIG, MODEL, STAGES = VQSegConfig, VQSeg, {"tokenizer": VQSegTask}
