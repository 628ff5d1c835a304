"""The Muse family through the training system: its VQGAN trained first by train.py when
missing, two ranks under the DeepSpeed launcher with ZeRO-3, a BPE caption tokenizer kept
in the run directory, an export that `t2i.pipelines`, `t2i generate` and `t2i eval` load."""

import json
import math
import os
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from t2i.cli import main
from t2i.models import finished_export
from t2i.models.muse import MuseTask
from t2i.pipelines import load, load_layouts
from t2i.training.config import ConfigError, apply_override, load_config
from t2i.training.loop import Trainer
from tests.training.conftest import (
    REPO,
    TINY_MODEL,
    clean_env,
    tiny_config,
    tiny_overrides,
    train_command,
)

TINY_MUSE = ["model.dim=32", "model.depth=2", "model.heads=4", "model.text_dim=32",
             "model.text_depth=1", "data.tokenizer=bpe", "data.bpe_vocab=300",
             "data.text_length=64"]


def _muse_overrides(data, out, tokenizer, steps=4):
    run = {"out": out, "steps": steps, "warmup": 2, "log_every": 2, "sample_every": steps,
           "ckpt_every": 2, "progress": False}
    return (TINY_MUSE + [f"model.tokenizer={tokenizer}", "model.layout=", f"data.path={data}",
                         "data.image_size=16", "data.workers=0", "data.val_batches=2"]
            + [f"run.{k}={v}" for k, v in run.items()])


def _muse_config(data, out, tokenizer, *extra, steps=4, config="muse_shapes.yaml"):
    """A training config from training/configs/`config` with the tiny Muse overrides."""
    path = os.path.join(REPO, "training", "configs", config)
    return load_config(path, _muse_overrides(data, out, tokenizer, steps) + list(extra))[0]


@pytest.fixture(scope="module")
def tiny_vqgan(synth_dir, tmp_path_factory, ds_config):
    out = str(tmp_path_factory.mktemp("muse") / "vqgan")
    Trainer(tiny_config("vqgan", synth_dir, out, steps=2), ds_config(2)).train()
    return out


@pytest.mark.slow
def test_a_tiny_muse_run_exports_a_generator(tiny_vqgan, synth_dir, ds_config, tmp_path):
    out = str(tmp_path / "muse")
    config = _muse_config(synth_dir, out, tiny_vqgan)
    metrics = Trainer(config, ds_config(2)).train()
    assert {"val_ce", "val_accuracy"} <= set(metrics) and metrics["val_ce"] > 0
    assert 0 <= metrics["val_object_accuracy"] <= 1  # the synthetic scenes have seg maps
    assert math.isfinite(metrics["val_shape_word_gain"])  # and single-object captions
    assert os.path.exists(os.path.join(out, "t2i_tokenizer.json"))  # BPE kept for resume
    assert os.path.exists(os.path.join(out, "samples", "step_000004.png"))
    pipe = load(out)
    images = pipe(["a large red circle on the left"], seed=0, steps=3, cfg_scale=2.0).images
    assert images.shape == (1, 3, 16, 16)
    again = pipe(["a large red circle on the left"], seed=0, steps=3, cfg_scale=2.0).images
    assert torch.equal(images, again)

    grid = tmp_path / "grid.png"
    assert main(["generate", "--model", out, "--prompt", "a red circle on the left",
                 "--prompt", "a blue ring at the top", "--num", "3", "--steps", "3",
                 "--out", str(grid)]) == 0
    assert grid.exists()
    assert main(["generate", "--model", out, "--prompt", "a red circle", "--layouts", "--out",
                 str(grid)]) == 2  # a plain model has no layouts to show
    report = tmp_path / "report.json"
    probe = str(tmp_path / "probe")
    Trainer(tiny_config("probe", synth_dir, probe, steps=2), ds_config(2)).train()
    assert main(["eval", "--model", out, "--probe", probe, "--num", "12", "--steps", "3",
                 "--cfg", "2", "--out", str(report)]) == 0
    scored = json.loads(report.read_text())
    assert scored["kind"] == "generator" and scored["num"] == 12
    assert scored["generate"] == {"steps": 3, "cfg_scale": 2.0}
    assert 0 <= scored["caption_accuracy"]["whole"] <= 1 and scored["fd_probe"] >= 0
    assert main(["eval", "--model", out, "--num", "4", "--out", str(report)]) == 2  # no probe

    # a token critic for this generator, then generation re-masking by it
    critic = str(tmp_path / "critic")
    config = _muse_config(synth_dir, critic, tiny_vqgan, "model.stage=critic",
                          f"model.base={out}", f"data.tokenizer={out}/export")
    assert "val_accuracy" in Trainer(config, ds_config(2)).train()
    judged = load(out, critic=critic)
    first = judged(["a red circle"], steps=3, critic="critic", seed=0).tokens
    assert torch.equal(first, judged(["a red circle"], steps=3, critic="critic", seed=0).tokens)
    assert main(["generate", "--model", out, "--critic", critic, "--prompt", "a red circle",
                 "--num", "2", "--steps", "3", "--out", str(grid)]) == 0
    with pytest.raises(ValueError, match="token critic"):
        load(critic)


@pytest.mark.slow
def test_a_super_resolution_stage_trains_on_the_base_tokens_and_chains(
        tiny_vqgan, synth_dir, ds_config, tmp_path):
    base = str(tmp_path / "base")
    config = _muse_config(synth_dir, base, tiny_vqgan, "data.image_size=8",  # 8 px images
                          steps=2)
    Trainer(config, ds_config(2)).train()
    sr = str(tmp_path / "sr")
    # 16 px images over the tiny VQGAN's 8 x 8 tokens, conditioned on its 4 x 4 tokens of
    # the same images shrunk to 8 px (the real configs: 64 px over 32 px)
    config = _muse_config(synth_dir, sr, tiny_vqgan, f"model.low_res_tokenizer={tiny_vqgan}",
                          "model.low_res_size=8", f"data.tokenizer={base}/export", steps=2)
    metrics = Trainer(config, ds_config(2)).train()
    assert "val_ce" in metrics and "val_shape_word_gain" not in metrics  # sees the shapes
    chain = load(sr, base=base)
    out = chain(["a red circle on the left", "a blue ring"], steps=3, seed=0)
    assert out.images.shape == (2, 3, 16, 16)
    assert chain.low.grid == 4 and chain.base is not None
    with pytest.raises(ValueError, match="low_res"):
        load(sr)(["a red circle"], steps=2)


def _write_config(path, config: str, overrides: list[str], **model) -> str:
    """training/configs/`config` with `overrides` and `model` written into a YAML at `path`
    (train.py reads a prerequisite's settings from its file)."""
    raw = yaml.safe_load(open(os.path.join(REPO, "training", "configs", config)))
    for override in overrides:
        apply_override(raw, override)
    raw["model"].update(model)
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.slow
def test_train_py_trains_the_missing_tokenizer_and_layout_model_first_then_the_painter(
        synth_dir, ds_config, tmp_path):
    # the prerequisites' files name data that is not there: they train on the painter's
    elsewhere = [f"data.path={tmp_path / 'elsewhere'}", "data.synth_if_missing=0"]
    vq_config = _write_config(  # as vqgan16_shapes.yaml: ZeRO-3 ok
        tmp_path / "vqgan_tiny.yaml", "vqgan_shapes.yaml",
        tiny_overrides("vqgan", synth_dir, "unused", steps=2) + elsewhere, disc_weight=0.0,
        perceptual="none")
    out, tokenizer = str(tmp_path / "muse"), str(tmp_path / "muse" / "vqgan")
    layout, layout_config = str(tmp_path / "muse" / "layout"), _write_config(
        tmp_path / "layout_tiny.yaml", "muse_layout_shapes.yaml",
        _muse_overrides(synth_dir, "unused", "unused", steps=2) + elsewhere
        + ["model.grid=0"])  # on the tokenizer's grid: the painter's layout_detail passed on
    args = ["--config", os.path.join(REPO, "training", "configs", "muse_shapes.yaml"),
            "--deepspeed_config", ds_config(3), *_muse_overrides(synth_dir, out, tokenizer),
            f"model.tokenizer_config={vq_config}", f"model.layout={layout}",
            f"model.layout_config={layout_config}", "model.layout_detail=2",  # passed on
            "model.layout_colour=true",  # passed on too
            "model.coverage_weight=0.5"]  # its head too is partitioned by ZeRO-3
    result = subprocess.run(train_command(*args, processes=2), cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=clean_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for run in (tokenizer, layout):
        assert os.path.exists(os.path.join(run, "export", "model.safetensors"))
    meta = json.load(open(os.path.join(layout, "export", "config.json")))
    assert meta["stage"] == "layout" and meta["model"]["layout_detail"] == 2
    assert meta["model"]["layout_colour"] is True
    for part in ("vqgan", "layout"):
        assert os.path.exists(os.path.join(out, "export", part, "model.safetensors"))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[-1]["step"] == 4 and "val/val_ce" in rows[-1]
    assert load(out)(["a red circle"], steps=2).images.shape == (1, 3, 16, 16)


@pytest.mark.slow
def test_a_painter_starts_from_the_same_weights_with_or_without_its_layout_model_yet(
        tiny_vqgan, synth_dir, ds_config, tmp_path):
    layout = str(tmp_path / "layout")
    Trainer(_muse_config(synth_dir, layout, tiny_vqgan, "model.grid=0", "model.layout_detail=1",
                         steps=1,
                         config="muse_layout_shapes.yaml"), ds_config(2)).train()
    (tmp_path / "pending").mkdir()  # a layout run beside it, not exported yet
    weights = []
    for source in (layout, str(tmp_path / "pending")):
        trainer = Trainer(_muse_config(synth_dir, str(tmp_path / f"p{len(weights)}"),
                                       tiny_vqgan, f"model.layout={source}"), ds_config(2))
        assert (trainer.task.layouts is None) == source.endswith("pending")
        weights.append(trainer.task.model.state_dict())
    for name, w in weights[0].items():
        assert torch.equal(w, weights[1][name]), name


@pytest.mark.slow
def test_only_a_layout_runs_last_step_counts_as_its_layout_model(tiny_vqgan, synth_dir,
                                                                 ds_config, tmp_path):
    """A run exports at every checkpoint: an interrupted one (or one still training beside
    the painter) holds an earlier step's model, which train.py must finish first and a
    painter must not take for its layout model."""
    layout = str(tmp_path / "layout")
    config = _muse_config(synth_dir, layout, tiny_vqgan, "model.grid=0", "model.layout_detail=1",
                          steps=4, config="muse_layout_shapes.yaml")
    Trainer(config, ds_config(2)).train(stop_at=2)
    assert os.path.exists(os.path.join(layout, "export", "model.safetensors"))
    assert not finished_export(layout)
    painter = _muse_config(synth_dir, str(tmp_path / "p"), tiny_vqgan, f"model.layout={layout}",
                           "model.layout_detail=1")
    assert MuseTask.prerequisite(painter.model)[0].endswith("muse_layout_shapes.yaml")
    trainer = Trainer(painter, ds_config(2))
    assert trainer.task.layout_drawer() is None
    Trainer(config, ds_config(2)).train()  # resumed to its last step
    assert finished_export(layout) and MuseTask.prerequisite(painter.model) is None
    assert trainer.task.layout_drawer() is not None


def _beside_run(tiny_vqgan, synth_dir, ds_config, tmp_path, *layout_overrides):
    """train.py, one process on two threads, for a painter whose layout model is missing:
    -> (the finished process, painter run, layout run)."""
    out = tmp_path / "muse"
    layout = out / "layout"
    layout_config = _write_config(  # more steps than the painter's 4: it ends later
        tmp_path / "layout_tiny.yaml", "muse_layout_shapes.yaml",
        _muse_overrides(synth_dir, "unused", "unused", steps=20) + ["model.grid=0",
                                                                    *layout_overrides])
    args = ["--config", os.path.join(REPO, "training", "configs", "muse_shapes.yaml"),
            "--deepspeed_config", ds_config(2), *_muse_overrides(synth_dir, str(out),
                                                                  tiny_vqgan),
            f"model.layout={layout}", f"model.layout_config={layout_config}"]
    result = subprocess.run(train_command(*args), cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**clean_env(), "OMP_NUM_THREADS": "2"})
    return result, out, layout


@pytest.mark.slow
def test_one_cpu_process_trains_the_layout_model_beside_the_painter(
        tiny_vqgan, synth_dir, ds_config, tmp_path):
    result, out, layout = _beside_run(tiny_vqgan, synth_dir, ds_config, tmp_path)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed[-3000:]
    assert "training it beside this run" in printed and "on 1 of 2 threads" in printed
    assert "ended (exit 0): this run goes on on 2 threads" in printed
    assert "done: " in (layout / "train.log").read_text()  # its own output
    assert (layout / "export" / "model.safetensors").exists()
    # the painter's last export came before the layout model's: written again with it, the
    # last step's (not the export of an earlier checkpoint)
    theirs = load_file(layout / "export" / "model.safetensors")
    ours = load_file(out / "export" / "layout" / "model.safetensors")
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert load(str(out))(["a red circle"], steps=2).images.shape == (1, 3, 16, 16)


@pytest.mark.slow
def test_a_layout_model_failing_beside_the_painter_fails_the_run_with_its_log(
        tiny_vqgan, synth_dir, ds_config, tmp_path):
    result, out, layout = _beside_run(tiny_vqgan, synth_dir, ds_config, tmp_path,
                                      "model.schedule=bogus")
    assert result.returncode == 1
    assert f"{layout}, trained beside this run, failed (exit 2" in result.stderr
    assert "model.schedule must be one of" in (layout / "train.log").read_text()
    assert (out / "export" / "model.safetensors").exists()  # the painter itself is done
    assert not (out / "export" / "layout").exists()


@pytest.mark.slow
@pytest.mark.parametrize("detail,colour,own", [(1, "false", None), (2, "true", None),
                                               (1, "true", (4, 2))])
def test_a_layout_model_then_a_painter_on_its_layouts_train_export_and_generate(
        tiny_vqgan, synth_dir, ds_config, tmp_path, capsys, detail, colour, own):
    layout_out, out = str(tmp_path / "layout"), str(tmp_path / "painter")
    cells = [f"model.layout_detail={detail}", f"model.layout_colour={colour}"]
    # the layout model on the tokenizer's 8 x 8 grid, or `own` (grid, detail): its own
    # cells, as many as the painter's (4 x 4 cells of 2 x 2 each for 8 x 8 tokens)
    grid, layout_detail = own or (0, detail)
    config = _muse_config(synth_dir, layout_out, tiny_vqgan, *cells, f"model.grid={grid}",
                          f"model.layout_detail={layout_detail}", steps=2,
                          config="muse_layout_shapes.yaml")
    assert config.model["grid"] == grid
    metrics = Trainer(config, ds_config(2)).train()
    assert metrics["val_ce"] > 0 and 0 <= metrics["val_object_accuracy"] <= 1
    assert ("val_colour_accuracy" in metrics) == (colour == "true")
    meta = json.load(open(os.path.join(layout_out, "export", "config.json")))
    assert (meta["model"]["grid"], meta["model"]["layout_detail"]) == (grid or 8, layout_detail)
    assert os.path.exists(os.path.join(layout_out, "samples", "step_000002.png"))
    with pytest.raises(ValueError, match="holds a layout model"):
        load(layout_out)
    trainer = Trainer(_muse_config(synth_dir, out, tiny_vqgan, f"model.layout={layout_out}",
                                   *cells, steps=2), ds_config(2))
    metrics = trainer.train()
    assert metrics["val_ce"] > 0 and 0 <= metrics["val_object_accuracy"] <= 1
    assert "val_shape_word_gain" not in metrics  # tokens follow the layout, not the words
    for name in ("model.safetensors", "t2i_tokenizer.json"):
        assert os.path.exists(os.path.join(out, "export", "layout", name))
    pipe = load(out)
    prompts = ["a large red circle on the left", "a small blue ring"]
    generated = pipe(prompts, seed=0, steps=3)
    assert generated.images.shape == (2, 3, 16, 16)
    assert torch.equal(generated.layout, load_layouts(layout_out)(prompts))
    grid = tmp_path / "grid.png"
    assert main(["generate", "--model", out, "--prompt", prompts[0], "--num", "2", "--steps",
                 "2", "--layouts", "--out", str(grid)]) == 0
    printed = capsys.readouterr().out
    assert "cfg off" in printed and "2 row(s)" in printed  # no guidance; images and layouts
    assert grid.exists()
    critic = str(tmp_path / "critic")  # a token critic for a painter: on the true layouts
    config = _muse_config(synth_dir, critic, tiny_vqgan, "model.stage=critic",
                          f"model.base={out}", f"data.tokenizer={out}/export", steps=2)
    assert "val_accuracy" in Trainer(config, ds_config(2)).train()  # base on its own cells
    judged = load(out, critic=critic)(prompts, steps=3, critic="critic", seed=0)
    assert judged.images.shape == (2, 3, 16, 16) and judged.layout is not None
    assert os.path.exists(os.path.join(out, "samples", "step_000002.png"))
    batch = {"image": torch.zeros(1, 3, 16, 16), "seg": torch.full((1, 16, 16), -1)}
    with pytest.raises(ValueError, match="segmentation maps"):
        trainer.task._layout(batch)
    with pytest.raises(ValueError, match="no exported layout model"):
        Trainer(_muse_config(synth_dir, str(tmp_path / "p2"), tiny_vqgan,
                             f"model.layout={tmp_path / 'nothing'}", steps=2), ds_config(2))


def test_muse_without_its_tokenizer_is_a_clear_error(synth_dir, ds_config, tmp_path):
    config = _muse_config(synth_dir, str(tmp_path / "m"), str(tmp_path / "nothing"))
    with pytest.raises((ConfigError, ValueError), match="no exported VQGAN"):
        Trainer(config, ds_config(2))
    with pytest.raises(FileNotFoundError, match="no exported model"):
        load(str(tmp_path))
    assert "muse" not in TINY_MODEL  # muse runs need a tokenizer run: see _muse_overrides


@pytest.mark.slow
def test_a_class_conditional_run_reads_its_classes_from_the_scene_records(
        tiny_vqgan, synth_dir, ds_config, tmp_path):
    out = str(tmp_path / "class")
    config = _muse_config(synth_dir, out, tiny_vqgan, steps=2, config="muse_class_shapes.yaml")
    assert "val_ce" in Trainer(config, ds_config(2)).train()
    pipe = load(out)
    assert pipe(class_ids=[0, 6], steps=2, cfg_scale=2.0).images.shape == (2, 3, 16, 16)
    grid = tmp_path / "classes.png"
    assert main(["generate", "--model", out, "--class-id", "1", "--num", "2", "--steps", "2",
                 "--out", str(grid)]) == 0
    assert main(["generate", "--model", out, "--prompt", "a red circle", "--out",
                 str(grid)]) == 2  # a class model takes --class-id
