"""`t2i eval` on tiny runs: a probe (the ceiling), a VQGAN scored with that probe, bad input."""

import json
import os

import pytest

from t2i.cli import main
from t2i.training.loop import Trainer
from tests.training.conftest import tiny_config


@pytest.fixture(scope="module")
def runs(synth_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_runs")
    ds = root / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4,
                              "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}))
    out = {}
    for family in ("probe", "vqgan"):
        out[family] = str(root / family)
        Trainer(tiny_config(family, synth_dir, out[family], steps=2), str(ds)).train()
    return out


@pytest.mark.slow
def test_eval_of_a_probe_reports_its_ceiling(runs, tmp_path, capsys):
    out = tmp_path / "probe" / "report.json"
    assert main(["eval", "--model", runs["probe"], "--num", "20", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "probe" and report["num"] == 20
    assert report["caption_accuracy"] == report["ceiling"]
    assert set(report["ceiling"]) >= {"shape", "colour", "size", "position", "whole", "by_objects"}
    assert "FD-probe" in capsys.readouterr().out
    assert "## Attribute probe" in (tmp_path / "probe" / "report.md").read_text()


@pytest.mark.slow
def test_eval_of_a_tokenizer_with_a_probe(runs, tmp_path):
    out = tmp_path / "report.json"
    assert main(["eval", "--model", runs["vqgan"], "--probe", runs["probe"], "--num", "24",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "image_tokenizer"
    assert set(report["reconstruction"]) >= {"psnr", "ssim", "usage", "perplexity"}
    assert report["fd_probe"] >= 0 and 0 <= report["precision"] <= 1
    assert report["fid"] is None and "no Inception-v3 weights" in report["skipped"]
    assert len(report["samples"]["best"]) == 8 and os.path.exists(tmp_path / "report.png")
    md = (tmp_path / "report.md").read_text()
    assert "## Reconstruction" in md and "report.png" in md and "probe saw" in md


@pytest.mark.slow
def test_bad_eval_input_is_a_clear_error(runs, tmp_path, capsys):
    out = str(tmp_path / "r.json")
    assert main(["eval", "--model", str(tmp_path), "--out", out]) == 2
    assert "no exported model" in capsys.readouterr().err
    assert main(["eval", "--model", runs["vqgan"], "--probe", runs["vqgan"], "--out", out]) == 2
    assert "not an attribute probe" in capsys.readouterr().err
    assert main(["eval", "--model", runs["probe"], "--num", "0", "--out", out]) == 2
    assert "--num" in capsys.readouterr().err
    assert not os.path.exists(out)
