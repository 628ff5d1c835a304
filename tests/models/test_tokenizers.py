"""The tokenizers (VQGAN, discrete VAE, VQ-SEG) and their losses, without the training loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from t2i.eval.metrics import codebook_stats, mean_iou, pixel_accuracy, psnr
from t2i.images import image_grid
from t2i.models import get_family, load_pretrained, save_pretrained
from t2i.models.dvae import DiscreteVAE, DVAEConfig, DVAETask
from t2i.models.vqgan import VQGAN, VQGANConfig, VQGANTask, face_crops, object_weights
from t2i.models.vqseg import VQSeg, VQSegConfig, VQSegTask
from t2i.modules.losses import (
    adaptive_weight,
    hinge_d_loss,
    logit_laplace_mean,
    logit_laplace_nll,
    weighted_mean,
)
from t2i.training.config import DataConfig

TINY = dict(channels=8, mults=(1, 2, 2), num_codes=16, code_dim=8)


def _images(b=2, size=16):
    return torch.rand(b, 3, size, size) * 2 - 1


@pytest.mark.parametrize("cls, config, inputs", [
    (VQGAN, VQGANConfig(**TINY), _images()),
    (DiscreteVAE, DVAEConfig(**TINY), _images()),
    (VQSeg, VQSegConfig(**TINY), torch.randint(0, 8, (2, 16, 16))),
], ids=["vqgan", "dvae", "vqseg"])
def test_encode_decode_shapes_and_export_round_trip(cls, config, inputs, tmp_path):
    torch.manual_seed(0)
    model = cls(config).eval()
    ids = model.encode(inputs)
    assert ids.shape == (2, 4, 4) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < 16
    out = model.decode(ids)
    assert out.shape == ((2, 3, 16, 16) if cls is not VQSeg else (2, 16, 16))
    family = {VQGAN: "vqgan", DiscreteVAE: "dvae", VQSeg: "vqseg"}[cls]
    save_pretrained(model, str(tmp_path), family=family, stage="tokenizer")
    loaded = cls.from_pretrained(str(tmp_path))
    assert torch.equal(loaded.encode(inputs), ids) and torch.equal(loaded.decode(ids), out)
    assert loaded.config == config
    with pytest.raises(TypeError, match=f"holds a {family} model"):
        (VQSeg if cls is not VQSeg else VQGAN).from_pretrained(str(tmp_path))


def test_loading_a_directory_without_an_export_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no exported model"):
        load_pretrained(str(tmp_path))


def test_registry_entries_name_config_model_and_stages():
    for name in ("vqgan", "dvae", "vqseg"):
        family = get_family(name)
        assert "tokenizer" in family.STAGES and family.STAGES["tokenizer"].family == name


def test_vqgan_task_yields_generator_then_discriminator_losses_after_the_warm_up():
    torch.manual_seed(0)
    task = VQGANTask(VQGANConfig(**TINY, disc_channels=8, disc_start=1), DataConfig())
    batch = {"image": _images(4), "seg": torch.randint(0, 3, (4, 16, 16))}
    modules = task.modules()
    assert [n for n, _, _ in task.losses(modules, batch, 0)] == ["model"]
    out = list(task.losses(modules, batch, 1))
    assert [n for n, _, _ in out] == ["model", "disc"]
    assert out[0][2]["gan_weight"] > 0
    # the generator's loss gives no gradient to the discriminator
    out[0][1].backward()
    assert all(p.grad is None for p in task.disc.parameters())
    assert all(p.requires_grad for p in task.disc.parameters())  # restored after freezing


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(5, 3)
    rec, gan = (x @ w).pow(2).mean(), (x @ w).sum() * 0.1
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, w, retain_graph=True)[0]
    expected = g_rec.norm() / (g_gan.norm() + 1e-4)
    torch.testing.assert_close(adaptive_weight(rec, gan, w), expected)


def test_hinge_loss_is_zero_only_beyond_the_margins():
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -2.0)) == 0
    torch.testing.assert_close(hinge_d_loss(torch.zeros(4), torch.zeros(4)), torch.tensor(1.0))


def test_object_aware_weights_and_weighted_mean():
    seg = torch.tensor([[[0, 1], [2, 0]]])
    weights = object_weights(seg, 3.0)
    assert weights.tolist() == [[[[1.0, 3.0], [3.0, 1.0]]]]
    assert object_weights(seg, 1.0) is None
    loss_map = torch.tensor([[[[1.0, 2.0], [2.0, 1.0]]]])
    torch.testing.assert_close(weighted_mean(loss_map, weights), torch.tensor(14 / 8))
    torch.testing.assert_close(weighted_mean(loss_map, None), torch.tensor(1.5))


def test_face_aware_loss_uses_crops_of_the_face_class():
    images = torch.zeros(2, 3, 8, 8)
    images[0, :, 2:4, 3:6] = 1.0
    seg = torch.zeros(2, 8, 8, dtype=torch.long)
    seg[0, 2:4, 3:6] = 9
    crops, owners = face_crops(images, seg, face_class=9, size=4)
    assert owners.tolist() == [0] and crops.shape == (1, 3, 4, 4)
    assert torch.allclose(crops, torch.ones_like(crops))  # the crop is the face only

    calls = []

    class FaceNet(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return x.mean((2, 3))

    config = VQGANConfig(**TINY, disc_weight=0.0, perceptual="none", face_class=9, face_crop=4)
    task = VQGANTask(config, DataConfig())
    task.face_net = FaceNet()  # what face_net="PATH.pt" loads with torch.jit.load
    batch = {"image": F.interpolate(images, size=16),
             "seg": F.interpolate(seg[:, None].float(), size=16).long()[:, 0]}
    (_, _, logs), = task.losses(task.modules(), batch, 0)
    assert calls == [1, 1] and "face" in logs


def test_dvae_temperature_anneals_between_its_endpoints():
    c = DVAEConfig(tau_start=1.0, tau_end=1 / 16, tau_anneal_steps=100)
    assert c.tau(0) == 1.0 and math.isclose(c.tau(100), 1 / 16) and c.tau(10 ** 6) == c.tau(100)
    assert c.tau(30) > c.tau(60)


def test_dvae_kl_to_the_uniform_prior_is_zero_for_uniform_logits():
    torch.manual_seed(0)
    task = DVAETask(DVAEConfig(**TINY, kl_warmup=1), DataConfig())
    torch.nn.init.zeros_(task.model.encoder.layers[-1].weight)
    torch.nn.init.zeros_(task.model.encoder.layers[-1].bias)  # uniform q
    (_, loss, logs), = task.losses(task.modules(), {"image": _images()}, 5)
    assert abs(logs["kl"]) < 1e-6 and torch.isfinite(loss)


def test_logit_laplace_nll_is_smallest_at_the_right_location():
    x = torch.tensor([0.3])
    eps = 0.1
    y = (x + 1) / 2 * (1 - 2 * eps) + eps
    best = torch.log(y / (1 - y))
    mus = best + torch.linspace(-1, 1, 21)
    nll = logit_laplace_nll(x.expand(21), mus, torch.zeros(21))
    assert int(nll.argmin()) == 10
    torch.testing.assert_close(logit_laplace_mean(best), x)


def test_vqseg_ignores_unknown_pixels_and_weighs_heavy_classes():
    torch.manual_seed(0)
    seg = torch.randint(0, 8, (2, 16, 16))
    seg[1] = -1  # a sample without a map
    light = VQSegTask(VQSegConfig(**TINY), DataConfig())
    heavy = VQSegTask(VQSegConfig(**TINY, heavy_classes=(3,), heavy_weight=10.0), DataConfig())
    heavy.model.load_state_dict(light.model.state_dict())
    assert light.model.one_hot(seg)[1].sum() == 0
    torch.manual_seed(1)
    (_, l_light, _), = light.losses(light.modules(), {"seg": seg}, 0)
    torch.manual_seed(1)
    (_, l_heavy, _), = heavy.losses(heavy.modules(), {"seg": seg}, 0)
    assert l_heavy > l_light
    with pytest.raises(ValueError, match="class 8 but the model has 8 classes"):
        light.model.encode(torch.full((1, 16, 16), 8))


def test_metrics_on_known_values():
    torch.testing.assert_close(psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.2)),
                               torch.tensor([20.0]))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    stats = codebook_stats(torch.tensor([0, 0, 1, 1]), num_codes=4)
    assert stats["usage"] == 0.5 and stats["dead_codes"] == 2
    assert math.isclose(stats["perplexity"], 2.0)
    pred, target = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, -1])
    assert math.isclose(pixel_accuracy(pred, target), 2 / 3)
    assert math.isclose(mean_iou(pred, target, 3), (1 + 0.5 + 0) / 3)


def test_image_grid_lays_out_rows_with_padding():
    grid = image_grid([torch.ones(3, 3, 4, 4), -torch.ones(2, 3, 4, 4)], pad=2, scale=2)
    assert grid.size == (3 * (8 + 2) + 2, 2 * (8 + 2) + 2)
    assert grid.getpixel((2, 2)) == (255, 255, 255) and grid.getpixel((2, 12)) == (0, 0, 0)
    with pytest.raises(ValueError):
        image_grid([])
