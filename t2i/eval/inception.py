"""Standard FID and Inception Score, when the user has Inception-v3 weights on disk.

The network is the FID variant of Inception-v3 (TF-slim's 2015-12-05 graph as ported by
pytorch-fid, the reference implementation people compare with): 1008 classes, average
pools that do not count padding in the A, C and first E blocks, a max pool in the last E
block's pooling branch. Its parameter names follow that port, so its state dict
(`pt_inception-2015-12-05-*.pth`) loads as it is; torchvision's ImageNet Inception-v3
weights load too (their auxiliary classifier is dropped), but give a non-standard score.

Images are resized as the reference does: [0, 1] values, bilinear to 299x299
(align_corners=False), then scaled to [-1, 1]. FID uses the 2048 pool features after the
last block, IS the softmax over the classifier's logits (10 splits).
"""

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from t2i.eval.distribution import frechet_distance

INPUT_SIZE = 299


class _Conv(nn.Module):  # conv (no bias) + batch norm (eps 1e-3) + ReLU
    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # the FID variant's pooling branch: padding not counted
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):  # Mixed_5b/c/d: 35x35
    def __init__(self, cin: int, pool: int, w):
        super().__init__()
        self.branch1x1 = _Conv(cin, w(64), 1)
        self.branch5x5_1 = _Conv(cin, w(48), 1)
        self.branch5x5_2 = _Conv(w(48), w(64), 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, w(64), 1)
        self.branch3x3dbl_2 = _Conv(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = _Conv(w(96), w(96), 3, padding=1)
        self.branch_pool = _Conv(cin, w(pool), 1)
        self.out_channels = 2 * w(64) + w(96) + w(pool)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x))], 1)


class _BlockB(nn.Module):  # Mixed_6a: 35 -> 17
    def __init__(self, cin: int, w):
        super().__init__()
        self.branch3x3 = _Conv(cin, w(384), 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, w(64), 1)
        self.branch3x3dbl_2 = _Conv(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = _Conv(w(96), w(96), 3, stride=2)
        self.out_channels = w(384) + w(96) + cin

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):  # Mixed_6b..e: 17x17, factorised 7x7
    def __init__(self, cin: int, c7: int, w):
        super().__init__()
        row = {"kernel": (1, 7), "padding": (0, 3)}
        col = {"kernel": (7, 1), "padding": (3, 0)}
        c7, out = w(c7), w(192)
        self.branch1x1 = _Conv(cin, out, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, **row)
        self.branch7x7_3 = _Conv(c7, out, **col)
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, **col)
        self.branch7x7dbl_3 = _Conv(c7, c7, **row)
        self.branch7x7dbl_4 = _Conv(c7, c7, **col)
        self.branch7x7dbl_5 = _Conv(c7, out, **row)
        self.branch_pool = _Conv(cin, out, 1)
        self.out_channels = 4 * out

    def forward(self, x):
        dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            dbl = conv(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg3(x))], 1)


class _BlockD(nn.Module):  # Mixed_7a: 17 -> 8
    def __init__(self, cin: int, w):
        super().__init__()
        c = w(192)
        self.branch3x3_1 = _Conv(cin, c, 1)
        self.branch3x3_2 = _Conv(c, w(320), 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, c, 1)
        self.branch7x7x3_2 = _Conv(c, c, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(c, c, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(c, c, 3, stride=2)
        self.out_channels = w(320) + c + cin

    def forward(self, x):
        b = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), self.branch7x7x3_4(b),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):  # Mixed_7b/c: 8x8, expanded filter banks
    def __init__(self, cin: int, max_pool: bool, w):
        super().__init__()
        self.max_pool = max_pool  # Mixed_7c of the FID graph pools with max, not average
        c = w(384)
        self.branch1x1 = _Conv(cin, w(320), 1)
        self.branch3x3_1 = _Conv(cin, c, 1)
        self.branch3x3_2a = _Conv(c, c, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(c, c, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, w(448), 1)
        self.branch3x3dbl_2 = _Conv(w(448), c, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(c, c, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(c, c, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, w(192), 1)
        self.out_channels = w(320) + 4 * c + w(192)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """The FID Inception-v3. `forward(images in [-1, 1], any size)` -> (pool features
    [B, 2048], logits [B, num_classes]).

    `width` scales every layer's channels; anything but 1 is a stand-in for tests (the
    real weights need width 1).

    >>> net = load_inception("pt_inception-2015-12-05-6726825d.pth")
    >>> feats, logits = net(images)
    """

    def __init__(self, num_classes: int = 1008, width: float = 1.0):
        super().__init__()

        def w(channels: int) -> int:
            return max(1, round(channels * width))

        self.Conv2d_1a_3x3 = _Conv(3, w(32), 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(w(32), w(32), 3)
        self.Conv2d_2b_3x3 = _Conv(w(32), w(64), 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(w(64), w(80), 1)
        self.Conv2d_4a_3x3 = _Conv(w(80), w(192), 3)
        self.Mixed_5b = _BlockA(w(192), 32, w)
        self.Mixed_5c = _BlockA(self.Mixed_5b.out_channels, 64, w)
        self.Mixed_5d = _BlockA(self.Mixed_5c.out_channels, 64, w)
        self.Mixed_6a = _BlockB(self.Mixed_5d.out_channels, w)
        self.Mixed_6b = _BlockC(self.Mixed_6a.out_channels, 128, w)
        self.Mixed_6c = _BlockC(self.Mixed_6b.out_channels, 160, w)
        self.Mixed_6d = _BlockC(self.Mixed_6c.out_channels, 160, w)
        self.Mixed_6e = _BlockC(self.Mixed_6d.out_channels, 192, w)
        self.Mixed_7a = _BlockD(self.Mixed_6e.out_channels, w)
        self.Mixed_7b = _BlockE(self.Mixed_7a.out_channels, max_pool=False, w=w)
        self.Mixed_7c = _BlockE(self.Mixed_7b.out_channels, max_pool=True, w=w)
        cin = self.Mixed_7c.out_channels
        self.num_features = cin  # 2048 at width 1
        self.fc = nn.Linear(cin, num_classes)

    def _blocks(self):
        return [m for name, m in self.named_children() if name.startswith("Mixed_")]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images.float().clamp(-1, 1) + 1) / 2  # the reference resizes [0, 1] values
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                          align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in self._blocks():
            x = block(x)
        features = x.mean((2, 3))
        return features, self.fc(features)


def load_inception(path: str) -> InceptionV3:
    """An InceptionV3 with the weights in `path` (a state dict saved by torch), in eval
    mode. FileNotFoundError when the file is missing; never downloads."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--inception {path}: no such file (FID/IS need Inception-v3 "
                                f"weights on disk, e.g. pytorch-fid's "
                                f"pt_inception-2015-12-05-6726825d.pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    if "fc.weight" not in state or "Conv2d_1a_3x3.conv.weight" not in state:
        raise ValueError(f"{path}: not an Inception-v3 state dict (no fc.weight)")
    num_classes = state["fc.weight"].shape[0]
    width = state["Conv2d_1a_3x3.conv.weight"].shape[0] / 32
    if num_classes != 1008 or width != 1:
        warnings.warn(f"{path} is not the FID graph ({num_classes} classes, width {width:g}; "
                      f"the graph has 1008 and 1): the scores will not compare with "
                      f"published FID / IS", stacklevel=2)
    net = InceptionV3(num_classes, width)
    net.load_state_dict(state)
    return net.eval()


@torch.no_grad()
def inception_outputs(net: InceptionV3, images: torch.Tensor, batch_size: int = 50
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (pool features [N, 2048] float64, logits [N, classes] float64)."""
    if images.dim() != 4 or images.shape[1] != 3 or len(images) == 0:
        raise ValueError(f"expected images [N > 0, 3, H, W], got {list(images.shape)}")
    device = next(net.parameters()).device
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        f, lg = net(images[i:i + batch_size].to(device))
        feats.append(f.double().cpu())
        logits.append(lg.double().cpu())
    return torch.cat(feats), torch.cat(logits)


def fid(net: InceptionV3, images: torch.Tensor, references: torch.Tensor,
        batch_size: int = 50) -> float:
    """Fréchet Inception distance between two image sets [N, 3, H, W] in [-1, 1]."""
    if len(images) < 2 or len(references) < 2:
        raise ValueError("FID needs at least two images in each set")
    generated, _ = inception_outputs(net, images, batch_size)
    real, _ = inception_outputs(net, references, batch_size)
    return frechet_distance(real, generated)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over `splits` equal parts of the set -> (mean, std)."""
    n = len(logits)
    if n < splits:
        raise ValueError(f"inception_score: {n} images for {splits} splits")
    logp = torch.log_softmax(logits.double(), -1)
    scores = []
    for part in logp.chunk(splits):
        marginal = torch.logsumexp(part, 0) - math.log(len(part))
        kl = (part.exp() * (part - marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    return mean, std
