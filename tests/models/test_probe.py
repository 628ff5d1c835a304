"""The attribute probe: a briefly trained one reads real scenes far above chance, and the
same images against shuffled captions score near chance (the metric is not trivially
satisfied); its inputs are checked."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from t2i.data import scenes
from t2i.eval.attributes import caption_accuracy, scene_table
from t2i.models.probe import AttributeProbe, ProbeConfig


def _scenes(n: int, seed: int):
    rng = np.random.default_rng(seed)
    renderer = scenes.Renderer(32)
    images, tables, captions = [], [], []
    for _ in range(n):
        image, _, caption, record = scenes.sample_scene(rng, renderer, rng.random() < 0.5)
        images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1)
        tables.append(scene_table(record["objects"]))
        captions.append(caption)
    return torch.stack(images), torch.stack(tables), captions


@pytest.fixture(scope="module")
def probe():
    """A small probe trained for ~20 s with a plain torch loop (the family's training
    through train.py is covered in tests/training)."""
    torch.manual_seed(0)
    images, tables, _ = _scenes(3000, seed=0)
    model = AttributeProbe(ProbeConfig(channels=16, mults=(1, 2), features=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(250):
        idx = torch.randint(0, len(images), (64,))
        logits, _ = model(images[idx])
        loss = sum(F.cross_entropy(x.flatten(0, 1), tables[idx][..., h].flatten())
                   for h, x in enumerate(logits.values()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_real_scenes_score_far_above_shuffled_captions(probe):
    images, _, captions = _scenes(400, seed=1)
    real = caption_accuracy(probe, images, captions)
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = caption_accuracy(probe, images, [captions[i] for i in order])
    assert real["colour"] > 0.8 and real["position"] > 0.95 and real["size"] > 0.85
    assert shuffled["colour"] < 0.3 and shuffled["shape"] < 0.3 and shuffled["whole"] < 0.02
    assert real["whole"] > 10 * max(shuffled["whole"], 0.01)


def test_the_probe_refuses_images_of_another_size():
    probe = AttributeProbe(ProbeConfig(channels=8, mults=(1, 2), features=16))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        probe.predict(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        probe.features(torch.zeros(2, 1, 32, 32))
    assert probe.predict(torch.zeros(2, 3, 32, 32)).shape == (2, 5, 3)
    assert probe.features(torch.zeros(2, 3, 32, 32)).shape == (2, 16)
