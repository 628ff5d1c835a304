"""Caption scoring: scene tables, per-attribute and whole-caption accuracy, relations."""

import numpy as np
import pytest
import torch

from t2i.data import scenes
from t2i.eval.attributes import (
    HEADS,
    SLOTS,
    caption_accuracy,
    caption_scores,
    describe,
    scene_table,
    summarize,
)


def _scenes(n, seed=0, held_out=False):
    rng = np.random.default_rng(seed)
    renderer = scenes.Renderer(32)
    return [scenes.sample_scene(rng, renderer, held_out) for _ in range(n)]


def test_the_table_of_a_scene_record_and_of_its_caption_agree():
    for _, _, caption, record in _scenes(200):
        from_caption = scene_table(scenes.parse_caption(caption)["objects"])
        assert torch.equal(scene_table(record["objects"]), from_caption)


def test_true_tables_score_every_caption_right_and_shuffled_ones_score_near_chance():
    data = _scenes(400, seed=1)
    tables = torch.stack([scene_table(r["objects"]) for *_, r in data])
    captions = [c for _, _, c, _ in data]
    right = summarize(caption_scores(tables, captions))
    assert right["whole"] == 1.0 and right["relation"] == 1.0
    assert all(right[a] == 1.0 for a in ("shape", "colour", "size", "position"))

    shuffled = summarize(caption_scores(tables[torch.randperm(len(tables),
                                        generator=torch.Generator().manual_seed(0))], captions))
    assert shuffled["whole"] < 0.05
    assert shuffled["shape"] < 0.25 and shuffled["colour"] < 0.25  # chance: about 1/10
    assert shuffled["position"] < 0.7  # 2 of 5 slots filled on average


def test_each_wrong_attribute_is_counted_where_it_is_wrong():
    caption = "a large red circle on the left. the large red circle is left of the small blue ring"
    with pytest.raises(ValueError):  # the ring is not in the scene's clauses
        caption_scores(torch.zeros(1, len(SLOTS), len(HEADS), dtype=torch.long), [caption])
    caption = ("a large red circle on the left and a small blue ring on the right. "
               "the large red circle is left of the small blue ring")
    truth = scene_table(scenes.parse_caption(caption)["objects"])
    assert describe(truth) == "large red circle @left; small blue ring @right"

    wrong_colour = truth.clone()
    wrong_colour[SLOTS.index("right"), 1] = HEADS["colour"].index("green") + 1
    (s,) = caption_scores(wrong_colour[None], [caption])
    assert s["colour"] == 0.5 and s["shape"] == 1.0 and not s["whole"]
    assert s["relation"] is False  # the blue ring is nowhere to be seen

    swapped = truth.clone()[[SLOTS.index(p) for p in ("centre", "right", "left", "top", "bottom")]]
    (s,) = caption_scores(swapped[None], [caption])
    assert s["position"] == 1.0 and s["shape"] == 0.0 and s["relation"] is False

    extra = truth.clone()
    extra[SLOTS.index("top")] = torch.tensor([1, 1, 1])
    (s,) = caption_scores(extra[None], [caption])
    assert s["extra"] == 1 and not s["whole"] and s["relation"] is True

    # the relation holds wherever the two objects are, as long as it holds
    moved = torch.zeros_like(truth)
    moved[SLOTS.index("centre")] = truth[SLOTS.index("left")]
    moved[SLOTS.index("right")] = truth[SLOTS.index("right")]
    (s,) = caption_scores(moved[None], [caption])
    assert s["relation"] is True and s["position"] == 0.5


def test_summary_splits_by_the_number_of_objects():
    data = _scenes(300, seed=2)
    tables = torch.stack([scene_table(r["objects"]) for *_, r in data])
    tables[:, :, 1] = 0  # every colour unread
    summary = summarize(caption_scores(tables, [r for *_, r in data]))
    assert summary["colour"] == 0.0 and summary["whole"] == 0.0 and summary["shape"] == 1.0
    counts = {n: g["count"] for n, g in summary["by_objects"].items()}
    assert set(counts) == {"1", "2", "3"} and sum(counts.values()) == 300


class _TableProbe:
    """Stands in for the trained probe: reads the table from a lookup by image identity."""

    def __init__(self, tables):
        self.tables = tables

    def predict(self, images):
        return self.tables[images[:, 0, 0, 0].long()]


def test_caption_accuracy_checks_its_inputs_and_batches():
    data = _scenes(10, seed=3)
    tables = torch.stack([scene_table(r["objects"]) for *_, r in data])
    images = torch.arange(10).float().view(10, 1, 1, 1).expand(10, 3, 4, 4)
    acc = caption_accuracy(_TableProbe(tables), images, [c for _, _, c, _ in data], batch_size=3)
    assert acc["whole"] == 1.0 and len(acc["scores"]) == 10 and acc["predicted"].shape == (10, 5, 3)
    with pytest.raises(ValueError, match="10 images for 9 captions"):
        caption_accuracy(_TableProbe(tables), images, [c for _, _, c, _ in data][:9])
    with pytest.raises(ValueError, match="no images"):
        caption_accuracy(_TableProbe(tables), images[:0], [])
    with pytest.raises(ValueError, match="not a scene clause"):
        caption_accuracy(_TableProbe(tables), images[:1], ["a photo of a cat"])
