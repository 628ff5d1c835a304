import io
import logging
import os
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from t2i.data.pipeline import ImageTextPipeline, ShardDataset
from t2i.data.shards import ShardWriter, encode_png, iter_shard, resolve_shards
from t2i.data.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer(max_length=224)  # longer than any synthetic caption


def _keys(dataset, num_workers):
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [sample["key"] for sample in loader]


def test_a_batch_has_the_documented_fields(synth_dir):
    pipe = ImageTextPipeline(synth_dir, tokenizer=TOKENIZER, image_size=32, batch_size=8)
    batch = next(iter(pipe.epoch(0)))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["text"].shape == (8, 224) and batch["text"].dtype == torch.long
    assert batch["text_mask"].dtype == torch.bool
    assert (batch["text_mask"] == (batch["text"] != 0)).all()
    assert batch["seg"].shape == (8, 32, 32) and batch["seg"].dtype == torch.long
    assert 0 <= batch["seg"].min() and batch["seg"].max() <= 7
    assert [TOKENIZER.decode(t) for t in batch["text"]] == batch["caption"]
    assert len(set(batch["key"])) == 8
    assert [r["key"] for r in batch["record"]] == batch["key"]  # the json member, parsed


def test_resize_and_centre_crop(synth_dir):
    pipe = ImageTextPipeline(synth_dir, tokenizer=TOKENIZER, image_size=16, batch_size=4)
    batch = next(iter(pipe.epoch(0)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["seg"].shape == (4, 16, 16)


def test_two_ranks_with_two_workers_read_every_sample_once(synth_dir):
    all_keys = [key for p in resolve_shards(synth_dir) for key, _ in iter_shard(p)]
    per_rank = []
    for rank in (0, 1):
        ds = ShardDataset(synth_dir, tokenizer=TOKENIZER, image_size=32, seed=3, rank=rank,
                          world_size=2)
        ds.set_epoch(1)
        per_rank.append(_keys(ds, num_workers=2))
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen)) == len(all_keys) == 216
    assert set(seen) == set(all_keys)
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


def test_order_is_fixed_by_seed_and_epoch_and_independent_of_the_reader_split(synth_dir):
    def order(epoch, world, workers):
        out = []
        for rank in range(world):
            ds = ShardDataset(synth_dir, tokenizer=TOKENIZER, image_size=32, seed=3,
                              rank=rank, world_size=world)
            ds.set_epoch(epoch)
            out.append(_keys(ds, workers))
        return out

    one = order(0, 1, 0)[0]
    assert one == order(0, 1, 0)[0]
    assert one != order(1, 1, 0)[0] and sorted(one) == sorted(order(1, 1, 0)[0])
    # readers take turns along the one epoch sequence: rank r of 2 takes positions r, r+2...
    split = order(0, 2, 0)
    assert split[0] == one[0::2] and split[1] == one[1::2]


def test_unshuffled_order_is_file_order(synth_dir):
    ds = ShardDataset(synth_dir, tokenizer=TOKENIZER, image_size=32, shuffle=False)
    assert _keys(ds, 0) == [k for p in resolve_shards(synth_dir) for k, _ in iter_shard(p)]


def test_the_webdataset_library_reads_our_shards_with_two_workers(synth_dir):
    shards = resolve_shards(synth_dir)
    ds = wds.WebDataset(shards, shardshuffle=False, nodesplitter=wds.split_by_node,
                        workersplitter=wds.split_by_worker, empty_check=False).decode("pil")
    samples = list(DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda x: x))
    assert len(samples) == len({s["__key__"] for s in samples}) == 216
    assert samples[0]["png"].size == (32, 32) and isinstance(samples[0]["txt"], str)


# ----------------------------------------------------------------------------- bad input


def _png(mode, size=(20, 12)):
    buffer = io.BytesIO()
    colour = {"L": 128, "LA": (128, 100), "RGBA": (255, 0, 0, 0), "P": 3, "RGB": (1, 2, 3)}
    Image.new(mode, size, colour[mode]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def bad_shards(tmp_path):
    """Good and bad samples; the expected outcome of each is in its key."""
    good = {"png": _png("RGB"), "txt": b"fine"}
    with ShardWriter(str(tmp_path / "a.tar")) as w:
        w.write("ok0", good)
        for i in range(5):
            w.write(f"badimage{i}", {"png": b"\x89PNG not really", "txt": b"x"})
        w.write("nocaption", {"png": _png("RGB")})
        w.write("noimage", {"txt": b"caption without image"})
        w.write("emptycaption", {"png": _png("RGB"), "txt": b"  \n"})
        w.write("grey", {"png": _png("L"), "txt": b"grey"})
        w.write("rgba", {"png": _png("RGBA"), "txt": b"transparent red"})
        w.write("palette", {"png": _png("P"), "txt": b"palette"})
        w.write("long", {"png": _png("RGB"), "txt": b"word " * 40})
        w.write("badseg", {"png": _png("RGB"), "txt": b"x", "seg.png": b"junk"})
        w.write("segsize", {"png": _png("RGB"), "txt": b"x",
                            "seg.png": encode_png(np.zeros((3, 3), np.uint8))})
        w.write("ok1", dict(good, **{"seg.png": encode_png(np.ones((12, 20), np.uint8))}))
    with ShardWriter(str(tmp_path / "b.tar")) as w:
        for i in range(4):
            w.write(f"tail{i}", good)
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    (tmp_path / "c.tar").write_bytes(b"this is not a tar file at all" * 40)
    return tmp_path


def test_bad_input_is_handled_or_skipped_and_counted(bad_shards, caplog):
    pipe = ImageTextPipeline(str(bad_shards), tokenizer=ByteTokenizer(24), image_size=8,
                             batch_size=4, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="t2i.data"):
        keys = [k for batch in pipe.epoch(0) for k in batch["key"]]
    assert keys == ["ok0", "grey", "rgba", "palette", "long", "ok1", "tail0", "tail1"]
    assert pipe.last_issues == {
        "unreadable_shard": 1, "truncated_shard": 1, "truncated_sample": 1,
        "missing_image": 1, "bad_image": 5, "missing_caption": 1, "empty_caption": 1,
        "bad_seg": 2, "converted_image": 3, "long_caption": 1}
    bad_image_warnings = [r for r in caplog.records if ": bad_image:" in r.getMessage()]
    assert len(bad_image_warnings) == 3  # rate-limited: the other two are only counted
    assert "further ones are counted" in bad_image_warnings[-1].getMessage()
    assert any(r.getMessage().startswith("epoch 0 data:") for r in caplog.records)


def test_converted_images_are_rgb_and_transparency_becomes_white(bad_shards):
    ds = ShardDataset(str(bad_shards), tokenizer=TOKENIZER, image_size=8, shuffle=False)
    samples = {s["key"]: s for s in DataLoader(ds, batch_size=None)}
    assert samples["grey"]["image"].shape == (3, 8, 8)
    assert torch.allclose(samples["rgba"]["image"], torch.ones(3, 8, 8))  # white
    assert "seg" in samples["ok1"] and (samples["ok1"]["seg"] == 1).all()
    assert len(samples["long"]["ids"]) == len("word " * 40) - 1 + 2  # stripped, <bos>, <eos>


def test_bad_input_counts_add_up_across_workers(bad_shards):
    pipe = ImageTextPipeline(str(bad_shards), tokenizer=ByteTokenizer(24), image_size=8,
                             batch_size=2, num_workers=2, shuffle=False)
    keys = Counter(k for batch in pipe.epoch(0) for k in batch["key"])
    assert sum(keys.values()) == 8 and max(keys.values()) == 1
    assert pipe.last_issues["bad_image"] == 5 and pipe.last_issues["converted_image"] == 3
    # damage to a shard is counted once, not once per reader
    assert pipe.last_issues["truncated_shard"] == pipe.last_issues["unreadable_shard"] == 1


def test_a_batch_mixing_samples_with_and_without_seg_marks_missing_maps(bad_shards):
    pipe = ImageTextPipeline(str(bad_shards), tokenizer=TOKENIZER, image_size=8, batch_size=8,
                             shuffle=False)
    batch = next(iter(pipe.epoch(0)))
    has_seg = [k == "ok1" for k in batch["key"]]
    assert (batch["seg"][torch.tensor(has_seg)] == 1).all()
    assert (batch["seg"][~torch.tensor(has_seg)] == -1).all()


@pytest.mark.parametrize("make, source, message", [
    (lambda p: os.mkdir(p / "empty"), "empty", "no .tar shards in directory"),
    (lambda p: None, "nothing-*.tar", "no shards match"),
    (lambda p: None, "missing.tar", "no such shard or directory"),
    (lambda p: None, "s-{000..002}.tar", "3 of 3 shards"),
], ids=["empty-dir", "glob", "file", "braces"])
def test_a_source_with_no_shards_is_an_error_naming_it(tmp_path, make, source, message):
    make(tmp_path)
    with pytest.raises(FileNotFoundError, match=message) as info:
        resolve_shards(str(tmp_path / source))
    assert str(tmp_path) in str(info.value)


def test_a_split_that_does_not_exist_is_an_error(synth_dir):
    with pytest.raises(ValueError, match="no split 'test'"):
        resolve_shards(synth_dir, split="test")


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_after", [1, 3, 4])
def test_resuming_from_a_position_continues_the_epoch_exactly(synth_dir, num_workers,
                                                              stop_after):
    def pipe():
        return ImageTextPipeline(synth_dir, tokenizer=TOKENIZER, image_size=32, batch_size=8,
                                 num_workers=num_workers, seed=3)

    whole = [batch["key"] for batch in pipe().epoch(1)]
    first = pipe()
    head = []
    for batch in first.epoch(1):
        head.append(batch["key"])
        if len(head) == stop_after:
            break
    position = first.position()
    assert position["batches"] == stop_after
    tail = [batch["key"] for batch in pipe().epoch(1, resume=position)]
    assert head + tail == whole
    with pytest.raises(ValueError, match="epoch 1, not 2"):
        next(iter(pipe().epoch(2, resume=position)))


def test_bad_samples_do_not_shift_a_resumed_position(bad_shards):
    def pipe():
        return ImageTextPipeline(str(bad_shards), tokenizer=ByteTokenizer(24), image_size=8,
                                 batch_size=3, shuffle=False)

    first = pipe()
    head = next(iter(first.epoch(0)))["key"]
    tail = [k for batch in pipe().epoch(0, resume=first.position()) for k in batch["key"]]
    assert head + tail == ["ok0", "grey", "rgba", "palette", "long", "ok1", "tail0", "tail1"]
