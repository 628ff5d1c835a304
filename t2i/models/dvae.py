"""DALL-E's discrete VAE (Ramesh et al. 2021, section 2.1 and appendix A).

    image [B, 3, H, W] -> Encoder -> logits [B, K, H/f, W/f]
    training: Gumbel-softmax(logits / tau) over K -> soft one-hot -> codebook -> Decoder
    inference: argmax -> indices [B, H/f, W/f] -> one-hot codes -> Decoder

The temperature tau is annealed from `tau_start` to `tau_end` (cosine) over
`tau_anneal_steps`; `straight_through` uses hard one-hot samples with the soft gradient.
The loss is the reconstruction term (logit-Laplace likelihood as in the paper, or L1 / L2)
plus `kl_weight` x KL(q(z|x) || uniform), the KL weight ramped up over `kl_warmup` steps.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.eval.metrics import reconstruction_metrics
from t2i.models import Pretrained
from t2i.modules.conv import ConvStackConfig, Decoder, Encoder
from t2i.modules.losses import logit_laplace_mean, logit_laplace_nll
from t2i.training.task import Task

RECONSTRUCTIONS = ("logit_laplace", "l1", "l2")


@dataclass
class DVAEConfig(ConvStackConfig):
    image_channels: int = 3
    num_codes: int = 512  # K: vocabulary of image tokens
    code_dim: int = 64  # codebook vector size
    reconstruction: str = "logit_laplace"  # "logit_laplace", "l1" or "l2"
    tau_start: float = 1.0  # Gumbel-softmax temperature at step 0 ...
    tau_end: float = 1 / 16  # ... annealed to this (the paper's 1/16)
    tau_anneal_steps: int = 2000
    straight_through: bool = False  # hard one-hot samples, soft gradients
    kl_weight: float = 0.01  # KL(q || uniform prior) weight (per token, in nats) ...
    kl_warmup: int = 500  # ... ramped linearly from 0 over these steps

    def tau(self, step: int) -> float:
        t = min(1.0, step / max(1, self.tau_anneal_steps))
        return self.tau_end + (self.tau_start - self.tau_end) * 0.5 * (1 + math.cos(math.pi * t))


class DiscreteVAE(nn.Module, Pretrained):
    """>>> dvae = DiscreteVAE(DVAEConfig()); ids = dvae.encode(images)   # [B, H/4, W/4]
    >>> dvae.decode(ids).shape                                           # [B, 3, H, W]"""

    kind = "image_tokenizer"  # what `t2i eval` scores it as

    def __init__(self, config: DVAEConfig):
        super().__init__()
        if config.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"model.reconstruction: one of {RECONSTRUCTIONS}, got "
                             f"{config.reconstruction!r}")
        self.config = c = config
        out_channels = c.image_channels * (2 if c.reconstruction == "logit_laplace" else 1)
        self.encoder = Encoder(c.image_channels, c.num_codes, c.channels, c.mults, c.res_blocks)
        self.codebook = nn.Embedding(c.num_codes, c.code_dim)
        self.decoder = Decoder(c.code_dim, out_channels, c.channels, c.mults, c.res_blocks)

    def _decode_onehot(self, onehot: torch.Tensor) -> torch.Tensor:
        # onehot [B, K, h, w] -> raw decoder output
        return self.decoder(torch.einsum("bkhw,kd->bdhw", onehot, self.codebook.weight))

    def to_image(self, out: torch.Tensor) -> torch.Tensor:
        """Raw decoder output -> image in [-1, 1]."""
        if self.config.reconstruction == "logit_laplace":
            return logit_laplace_mean(out[:, :self.config.image_channels])
        return out.clamp(-1, 1)

    def forward(self, image: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (raw decoder output, encoder logits [B, K, h, w])."""
        logits = self.encoder(image)
        soft = F.gumbel_softmax(logits.float(), tau=tau, hard=self.config.straight_through,
                                dim=1).to(logits.dtype)
        return self._decode_onehot(soft), logits

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image).argmax(1)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(indices, self.config.num_codes).permute(0, 3, 1, 2)
        return self.to_image(self._decode_onehot(onehot.to(self.codebook.weight.dtype)))


class DVAETask(Task):
    family, stage = "dvae", "tokenizer"

    def __init__(self, config: DVAEConfig, data, tokenizer=None):
        super().__init__(config, data, tokenizer)
        self.model = DiscreteVAE(config)

    def losses(self, engines, batch, step):
        c = self.config
        image = batch["image"]
        out, logits = engines["model"](image, c.tau(step))
        if c.reconstruction == "logit_laplace":
            n = c.image_channels
            rec = logit_laplace_nll(image, out[:, :n], out[:, n:].clamp(-6, 6)).mean()
        elif c.reconstruction == "l1":
            rec = (out - image).abs().mean()
        else:
            rec = (out - image).pow(2).mean()
        log_q = F.log_softmax(logits.float(), dim=1)
        kl = (log_q.exp() * (log_q + math.log(c.num_codes))).sum(1).mean()  # per token
        kl_weight = c.kl_weight * min(1.0, step / max(1, c.kl_warmup))
        yield "model", rec + kl_weight * kl, {"rec": rec.item(), "kl": kl.item(),
                                             "tau": c.tau(step)}

    @torch.no_grad()
    def samples(self, model, batch):
        image = batch["image"][:8]
        return [image, model.decode(model.encode(image))]

    @torch.no_grad()
    def evaluate(self, model, batches):
        return reconstruction_metrics(model, batches, self.config.num_codes)


CONFIG, MODEL, STAGES = DVAEConfig, DiscreteVAE, {"tokenizer": DVAETask}
