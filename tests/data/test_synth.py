import filecmp
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from t2i.cli import main
from t2i.data import scenes
from t2i.data.shards import iter_shard, resolve_shards
from t2i.data.synth import ensure_synth, read_split, synthesize


def _samples(directory, split):
    for path in resolve_shards(directory, split):
        yield from iter_shard(path)


def _decode(fields):
    image = np.asarray(Image.open(io.BytesIO(fields["png"])))
    seg = np.asarray(Image.open(io.BytesIO(fields["seg.png"])))
    return image, seg, fields["txt"].decode(), json.loads(fields["json"])


def test_same_arguments_give_identical_bytes_whatever_the_worker_count(tmp_path, synth_dir):
    other = tmp_path / "again"
    synthesize(str(other), 240, size=32, seed=7, shard_size=40, workers=2, progress=False)
    names = sorted(os.listdir(synth_dir))
    assert names == sorted(os.listdir(other))
    match, mismatch, errors = filecmp.cmpfiles(synth_dir, other, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names) == 8


def test_another_seed_gives_other_scenes(tmp_path, synth_dir):
    synthesize(str(tmp_path), 240, size=32, seed=8, shard_size=40, progress=False)
    assert not filecmp.cmp(os.path.join(synth_dir, "train-000000.tar"),
                           tmp_path / "train-000000.tar", shallow=False)


def test_split_file_lists_every_shard_and_count(synth_dir):
    info = read_split(synth_dir)
    assert info["splits"]["train"]["num"] == 216 and info["splits"]["val"]["num"] == 24
    assert info["splits"]["train"]["shards"] == [f"train-{i:06d}.tar" for i in range(6)]
    assert info["classes"][0] == "background" and info["classes"][1:] == list(scenes.SHAPES)
    counts = {split: sum(1 for _ in _samples(synth_dir, split)) for split in ("train", "val")}
    assert counts == {"train": 216, "val": 24}


@pytest.mark.parametrize("split", ["train", "val"])
def test_seg_map_agrees_with_the_drawn_pixels(synth_dir, split):
    object_rgb = np.array(list(scenes.COLOURS.values()))
    for _, fields in _samples(synth_dir, split):
        image, seg, _, record = _decode(fields)
        assert image.shape == (32, 32, 3) and seg.shape == (32, 32)
        # background pixels never take an object colour
        bg = image[seg == 0]
        assert not (bg[:, None, :] == object_rgb[None]).all(-1).any()
        for cls in np.unique(seg[seg > 0]):
            allowed = {tuple(scenes.COLOURS[o["colour"]])
                       for o in record["objects"] if o["seg_class"] == cls}
            pixels = {tuple(p) for p in image[seg == cls]}
            assert pixels <= allowed, (record, cls)
        # every object shows (none is wholly hidden) and the topmost one of a class keeps
        # its colour on some pixel
        for obj in record["objects"]:
            assert (seg == obj["seg_class"]).any()
        top = record["objects"][-1]
        colour = np.array(scenes.COLOURS[top["colour"]])
        assert ((image == colour).all(-1) & (seg == top["seg_class"])).any()


@pytest.mark.parametrize("split", ["train", "val"])
def test_caption_agrees_with_the_json_attributes(synth_dir, split):
    attrs = ("shape", "colour", "size", "position")
    seen_relation = False
    for _, fields in _samples(synth_dir, split):
        _, _, caption, record = _decode(fields)
        parsed = scenes.parse_caption(caption)
        said = sorted(tuple(o[a] for a in attrs) for o in parsed["objects"])
        true = sorted(tuple(o[a] for a in attrs) for o in record["objects"])
        assert said == true, caption
        if parsed["relation"] is not None:
            seen_relation = True
            subj = parsed["objects"][parsed["relation"]["subject"]]
            obj = parsed["objects"][parsed["relation"]["object"]]
            assert parsed["relation"]["relation"] in scenes.slot_relations(
                subj["position"], obj["position"]), caption
    assert seen_relation


def test_validation_holds_out_colour_shape_pairs(synth_dir):
    held = {tuple(p) for p in read_split(synth_dir)["held_out"]}
    for _, fields in _samples(synth_dir, "train"):
        record = json.loads(fields["json"])
        assert not {(o["colour"], o["shape"]) for o in record["objects"]} & held
    for _, fields in _samples(synth_dir, "val"):
        record = json.loads(fields["json"])
        assert {(o["colour"], o["shape"]) for o in record["objects"]} & held


def test_the_probe_data_shows_held_out_pairs_in_training_and_keeps_the_validation_split(
        tmp_path, synth_dir):
    probe_data = tmp_path / "probe"
    synthesize(str(probe_data), 240, size=32, seed=7, shard_size=40, progress=False,
               held_out_train=0.5)
    held = {tuple(p) for p in read_split(synth_dir)["held_out"]}
    shown = [bool({(o["colour"], o["shape"]) for o in json.loads(f["json"])["objects"]} & held)
             for _, f in _samples(probe_data, "train")]
    assert 0.35 < sum(shown) / len(shown) < 0.65
    names = [os.path.basename(p) for p in resolve_shards(synth_dir, "val")]
    match, mismatch, errors = filecmp.cmpfiles(synth_dir, probe_data, names, shallow=False)
    assert match == names and not mismatch and not errors
    with pytest.raises(ValueError, match="held-out-train"):
        synthesize(str(tmp_path / "bad"), 10, held_out_train=1.5, progress=False)


def test_scenes_cover_the_vocabulary():
    renderer = scenes.Renderer(64)
    rng = np.random.default_rng(0)
    seen = {k: set() for k in ("shape", "colour", "size", "position")}
    counts, backgrounds = set(), set()
    for _ in range(400):
        _, _, _, record = scenes.sample_scene(rng, renderer, held_out=False)
        counts.add(len(record["objects"]))
        backgrounds.add(record["background"]["kind"])
        for o in record["objects"]:
            for k in seen:
                seen[k].add(o[k])
    assert counts == {1, 2, 3} and backgrounds == set(scenes.BACKGROUNDS)
    assert seen["shape"] == set(scenes.SHAPES) and seen["colour"] == set(scenes.COLOURS)
    assert seen["size"] == set(scenes.SIZES) and seen["position"] == set(scenes.POSITIONS)


def test_parse_caption_rejects_text_outside_the_grammar():
    with pytest.raises(ValueError, match="not a scene clause"):
        scenes.parse_caption("a purple elephant on the left")
    with pytest.raises(ValueError, match="names 0 times"):
        scenes.parse_caption("a big red circle on the left and a small blue square at the top."
                             " the big red circle is above the small green square")


def test_swap_shape_renames_every_word_for_the_shape_and_nothing_else():
    text = ("a big red donut at the top, one small blue ring at the bottom. the big red donut "
            "is above the small blue ring")
    swapped = scenes.swap_shape(text, "ring", "cross")
    assert swapped == ("a big red cross at the top, one small blue cross at the bottom. the "
                       "big red cross is above the small blue cross")
    parsed = scenes.parse_caption(swapped)  # still the caption grammar
    assert [o["shape"] for o in parsed["objects"]] == ["cross", "cross"]
    # whole words only: "bar" inside another word stays
    assert scenes.swap_shape("a barred red bar", "bar", "square") == "a barred red square"


def test_permute_colours_renames_every_colour_word_at_once_and_nothing_else():
    text = ("one big red ring at the top and a small blue cross on the left. the big red "
            "ring is above the small blue cross")
    perm = list(range(8))
    red, blue = scenes.COLOUR_NAMES.index("red"), scenes.COLOUR_NAMES.index("blue")
    perm[red], perm[blue] = blue, red  # red <-> blue: a swap, not red -> blue -> red
    swapped = scenes.permute_colours(text, perm)
    assert swapped == ("one big blue ring at the top and a small red cross on the left. the "
                       "big blue ring is above the small red cross")
    parsed = scenes.parse_caption(swapped)  # still the caption grammar
    assert [o["colour"] for o in parsed["objects"]] == ["blue", "red"]
    assert scenes.permute_colours("a reddish red bar", perm) == "a reddish blue bar"


def test_ensure_synth_reuses_a_complete_directory_and_redoes_a_broken_one(tmp_path):
    out = str(tmp_path)
    ensure_synth(out, 30, size=32, seed=1, shard_size=10, progress=False)
    stamp = os.path.getmtime(tmp_path / "train-000000.tar")
    ensure_synth(out, 30, size=32, seed=1, shard_size=10, progress=False)
    assert os.path.getmtime(tmp_path / "train-000000.tar") == stamp
    os.remove(tmp_path / "train-000001.tar")
    ensure_synth(out, 30, size=32, seed=1, shard_size=10, progress=False)
    assert os.path.exists(tmp_path / "train-000001.tar")


def test_a_smaller_run_removes_the_shards_of_a_larger_one(tmp_path):
    synthesize(str(tmp_path), 50, size=32, shard_size=10, progress=False)
    synthesize(str(tmp_path), 20, size=32, shard_size=10, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["split.json", "train-000000.tar",
                                            "train-000001.tar", "val-000000.tar"]


def test_cli_writes_shards_and_rejects_bad_arguments(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--num", "12", "--size", "64",
                 "--shard-size", "5"]) == 0
    assert "11 training and 1 validation" in capsys.readouterr().out
    _, fields = next(iter_shard(str(tmp_path / "train-000000.tar")))
    assert Image.open(io.BytesIO(fields["png"])).size == (64, 64)
    assert main(["data", "synth", "--out", str(tmp_path), "--num", "0"]) == 2
    assert "--num must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "synth", "--out", str(tmp_path), "--size", "48"])


def test_slot_layout_draws_each_object_at_its_slot_centre_as_the_renderer_would():
    renderer = scenes.Renderer(32)
    rng = np.random.default_rng(3)
    for _ in range(20):
        image, seg, _, record = scenes.sample_scene(rng, renderer, held_out=False)
        centred = [scenes.SceneObject(o["shape"], o["colour"], o["size"], o["position"],
                                      *scenes.POSITIONS[o["position"]], o["radius"])
                   for o in record["objects"]]
        want_image, want_seg = renderer.render(centred, record["background"])
        got_seg, got_colour = scenes.slot_layout(record, renderer)
        np.testing.assert_array_equal(got_seg, want_seg)
        # the colour of each object pixel: the index of its object's colour, 0 elsewhere
        rgb = np.array(list(scenes.COLOURS.values()))
        want_colour = np.where(want_seg > 0, 1 + np.abs(
            want_image[..., None, :].astype(int) - rgb).sum(-1).argmin(-1), 0)
        np.testing.assert_array_equal(got_colour, want_colour)
    moved = {**record, "objects": [{**o, "x": o["x"] + 0.1} for o in record["objects"]]}
    np.testing.assert_array_equal(scenes.slot_layout(moved, renderer)[0], got_seg)
