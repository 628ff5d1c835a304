"""VQGAN image tokenizer (Esser et al. 2021), with Make-A-Scene's VQ-IMG losses.

    image [B, 3, H, W] -> Encoder -> [B, code_dim, H/f, W/f] -> VectorQuantizer -> indices
    indices [B, H/f, W/f] -> codes -> Decoder -> image

Trained (stage "tokenizer") with: L1 (+ optional L2) reconstruction; a perceptual loss on
features of a network that needs no download (the patch discriminator's own feature maps,
by default) or of a TorchScript feature network on disk (e.g. an exported VGG/LPIPS
trunk); the codebook's commitment loss; after `disc_start` steps, a PatchGAN with hinge
loss weighted by VQGAN's adaptive weight. Make-A-Scene (Gafni et al. 2022) adds an
object-aware weighting (pixels of objects, from the segmentation map, weigh
`object_weight`) and a face-aware loss: feature distance on crops of the `face_class`
region through a face network the user provides (off by default).
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.eval.metrics import reconstruction_metrics
from t2i.models import Pretrained
from t2i.modules.conv import ConvStackConfig, Decoder, Encoder, PatchDiscriminator
from t2i.modules.losses import adaptive_weight, feature_loss, hinge_d_loss, weighted_mean
from t2i.modules.quantizer import QuantizerConfig, QuantizerOutput, VectorQuantizer
from t2i.training.task import Task, frozen, unwrap


@dataclass
class VQGANConfig(ConvStackConfig):
    image_channels: int = 3
    num_codes: int = 512  # codebook size
    code_dim: int = 32  # code vector size
    commitment: float = 0.25  # commitment loss weight (beta)
    ema: bool = True  # EMA codebook (else learned by the codebook loss)
    metric: str = "l2"  # "l2" or "cosine" code lookup
    # losses (stage "tokenizer")
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual: str = "disc"  # "disc" (discriminator features), "none", or a TorchScript path
    perceptual_weight: float = 0.1
    disc_channels: int = 64
    disc_layers: int = 2  # PatchGAN depth (2 suits 32 px images, 3 suits 256 px)
    disc_start: int = 1000  # steps before the adversarial loss is switched on
    disc_weight: float = 0.1  # factor on the adaptive weight (0: no GAN)
    disc_lr_scale: float = 1.0  # discriminator learning rate relative to run.lr
    object_weight: float = 1.0  # Make-A-Scene object-aware loss: weight of object pixels
    face_net: str = ""  # TorchScript face feature network; face-aware loss when set
    face_class: int = -1  # segmentation class of faces
    face_weight: float = 1.0
    face_crop: int = 64  # face crops are resized to this before the face network


class VQGAN(nn.Module, Pretrained):
    """>>> vq = VQGAN(VQGANConfig()); ids = vq.encode(images)   # [B, 3, 32, 32] -> [B, 8, 8]
    >>> vq.decode(ids).shape                                    # [B, 3, 32, 32]"""

    kind = "image_tokenizer"  # what `t2i eval` scores it as

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c.image_channels, c.code_dim, c.channels, c.mults, c.res_blocks)
        self.quantizer = VectorQuantizer(QuantizerConfig(
            num_codes=c.num_codes, dim=c.code_dim, beta=c.commitment, ema=c.ema,
            metric=c.metric, channel_first=True))
        self.decoder = Decoder(c.code_dim, c.image_channels, c.channels, c.mults, c.res_blocks)

    def forward(self, image: torch.Tensor, last_layer: bool = True
                ) -> tuple[torch.Tensor, QuantizerOutput]:
        """-> (reconstruction, QuantizerOutput). last_layer=False stops before the decoder's
        last convolution (`decoder.out`), for the adaptive GAN weight (see VQGANTask)."""
        q = self.quantizer(self.encoder(image))
        return (self.decoder if last_layer else self.decoder.layers)(q.quantized), q

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> token indices [B, H/f, W/f]."""
        return self.quantizer(self.encoder(image)).indices

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Token indices [B, h, w] -> images [B, 3, h*f, w*f], clamped to [-1, 1]."""
        return self.decoder(self.quantizer.embed(indices)).clamp(-1, 1)


def object_weights(seg: torch.Tensor | None, weight: float) -> torch.Tensor | None:
    """Make-A-Scene's object-aware map: `weight` on object pixels (seg > 0), 1 elsewhere."""
    if seg is None or weight == 1.0:
        return None
    return 1.0 + (weight - 1.0) * (seg > 0).unsqueeze(1).float()


def face_crops(images: torch.Tensor, seg: torch.Tensor, face_class: int,
               size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding-box crops of the face region of each image, resized to size x size.
    -> (crops [F, C, size, size], index of the image each came from [F])."""
    crops, owners = [], []
    for i in range(images.shape[0]):
        ys, xs = torch.nonzero(seg[i] == face_class, as_tuple=True)
        if len(ys) == 0:
            continue
        crop = images[i:i + 1, :, int(ys.min()):int(ys.max()) + 1, int(xs.min()):int(xs.max()) + 1]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear",
                                   align_corners=False))
        owners.append(i)
    if not crops:
        return images.new_zeros(0, images.shape[1], size, size), torch.zeros(0, dtype=torch.long)
    return torch.cat(crops), torch.tensor(owners)


class VQGANTask(Task):
    family, stage = "vqgan", "tokenizer"

    def __init__(self, config: VQGANConfig, data, tokenizer=None):
        super().__init__(config, data, tokenizer)
        self.model = VQGAN(config)
        c = config
        self.use_disc = c.disc_weight > 0 or c.perceptual == "disc"
        self.disc = (PatchDiscriminator(c.image_channels, c.disc_channels, c.disc_layers)
                     if self.use_disc else None)
        # external feature networks: frozen, not trained, not exported
        self.feature_net = (torch.jit.load(c.perceptual, map_location="cpu").eval()
                            if c.perceptual not in ("disc", "none") else None)
        self.face_net = torch.jit.load(c.face_net, map_location="cpu").eval() if c.face_net \
            else None

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "disc": self.disc} if self.disc is not None \
            else {"model": self.model}

    @property
    def zero3_ok(self) -> bool:
        return self.disc is None

    def lr_scale(self, name: str) -> float:
        return self.config.disc_lr_scale if name == "disc" else 1.0

    def _features(self, engines: dict, image: torch.Tensor) -> list[torch.Tensor]:
        if self.feature_net is not None:
            out = self.feature_net(image)
            return list(out) if isinstance(out, (list, tuple)) else [out]
        # the module, not its engine: DeepSpeed engines hook the backward of every forward
        # they run, and this one takes no gradient here
        return unwrap(engines["disc"])(image)[1]

    def losses(self, engines, batch, step):
        c = self.config
        image, seg = batch["image"], batch.get("seg")
        # The decoder's last layer runs outside the engine's forward: DeepSpeed hooks the
        # backward of an engine's outputs, and the adaptive weight's autograd.grad below must
        # reach that layer's weight without passing through (and firing) those hooks.
        features, q = engines["model"](image, last_layer=False)
        recon = unwrap(engines["model"]).decoder.out(features)
        weight = object_weights(seg, c.object_weight)
        pixel = c.l1_weight * (recon - image).abs()
        if c.l2_weight:
            pixel = pixel + c.l2_weight * (recon - image).pow(2)
        rec = weighted_mean(pixel, weight)
        logs = {"rec": rec.item(), "commit": q.loss.item(), "usage": q.usage.item(),
                "perplexity": q.perplexity.item()}
        disc = engines.get("disc")
        with frozen(unwrap(disc)) if disc is not None else nullcontext():
            if c.perceptual != "none" and c.perceptual_weight > 0:
                with torch.no_grad():
                    real_features = self._features(engines, image)
                perceptual = feature_loss(real_features, self._features(engines, recon), weight)
                rec = rec + c.perceptual_weight * perceptual
                logs["perceptual"] = perceptual.item()
            if self.face_net is not None and seg is not None:
                real_faces, owners = face_crops(image, seg, c.face_class, c.face_crop)
                if len(owners):
                    fake_faces, _ = face_crops(recon, seg, c.face_class, c.face_crop)
                    face = F.l1_loss(self.face_net(fake_faces), self.face_net(real_faces).detach())
                    rec = rec + c.face_weight * face
                    logs["face"] = face.item()
            loss = rec + q.loss
            if disc is not None and c.disc_weight > 0 and step >= c.disc_start:
                gan = -unwrap(disc)(recon)[0].mean()
                scale = c.disc_weight * adaptive_weight(
                    rec, gan, unwrap(engines["model"]).decoder.out.weight)
                loss = loss + scale * gan
                logs.update(gan=gan.item(), gan_weight=scale.item())
        yield "model", loss, logs
        if disc is not None and c.disc_weight > 0 and step >= c.disc_start:
            # one engine forward per backward (DeepSpeed runs its gradient epilogue once per
            # forward), so real and fake go through together
            logits_real, logits_fake = disc(torch.cat([image, recon.detach()]))[0].chunk(2)
            d_loss = hinge_d_loss(logits_real, logits_fake)
            yield "disc", d_loss, {}

    @torch.no_grad()
    def samples(self, model, batch):
        image = batch["image"][:8]
        return [image, model(image)[0].clamp(-1, 1)]

    @torch.no_grad()
    def evaluate(self, model, batches):
        return reconstruction_metrics(model, batches, self.config.num_codes)


CONFIG, MODEL, STAGES = VQGANConfig, VQGAN, {"tokenizer": VQGANTask}
