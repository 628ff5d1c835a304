import io
import json

import pytest
import torch
from PIL import Image

from t2i.cli import main
from t2i.data.importer import import_images
from t2i.data.pipeline import ImageTextPipeline
from t2i.data.tokenizer import ByteTokenizer


def _save(path, colour, fmt, size=(10, 6)):
    Image.new("RGB", size, colour).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    _save(root / "a.png", (255, 0, 0), "PNG")
    (root / "a.txt").write_text("a red picture")
    _save(root / "b.jpg", (0, 255, 0), "JPEG")
    _save(root / "c.bmp", (0, 0, 255), "BMP")
    _save(root / "sub" / "d.png", (9, 9, 9), "PNG")
    (root / "sub" / "d.txt").write_text("nested one")
    _save(root / "nocap.png", (1, 1, 1), "PNG")
    _save(root / "empty.png", (1, 1, 1), "PNG")
    (root / "empty.txt").write_text("   ")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "broken.txt").write_text("will not decode")
    (root / "captions.jsonl").write_text(json.dumps({"file": "b.jpg", "caption": "green"})
                                         + "\n")
    (root / "captions.csv").write_text('file,caption\nc.bmp,"blue, from csv"\n')
    return root


def test_import_keeps_captioned_images_and_reports_the_rest(folder, tmp_path):
    out = tmp_path / "shards"
    report = import_images(str(folder), str(out), progress=False)
    assert report["imported"] == 4 and report["images_found"] == 7
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert reasons.pop("broken.png").startswith("image does not decode")
    assert reasons == {"empty.png": "empty caption", "nocap.png": "no caption"}
    assert json.loads((out / "import_report.json").read_text()) == report

    pipe = ImageTextPipeline(str(out), tokenizer=ByteTokenizer(32), image_size=6,
                             batch_size=8, shuffle=False)
    batch = next(iter(pipe.epoch(0)))
    assert batch["key"] == ["a", "b", "c", "sub__d"]
    assert batch["caption"] == ["a red picture", "green", "blue, from csv", "nested one"]
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 6, 6)
    assert torch.allclose(batch["image"][0], red)
    assert batch["image"][2, 2].mean() > 0.9  # blue, converted from BMP
    assert pipe.last_issues == {}


def test_original_bytes_are_kept_and_other_formats_become_png(folder, tmp_path):
    import_images(str(folder), str(tmp_path / "o"), progress=False)
    from t2i.data.shards import iter_shard

    fields = dict(iter_shard(str(tmp_path / "o" / "data-000000.tar")))
    assert fields["b"]["jpg"] == (folder / "b.jpg").read_bytes()
    assert Image.open(io.BytesIO(fields["c"]["png"])).format == "PNG"
    assert json.loads(fields["c"]["json"])["source_file"] == "c.bmp"


def test_shard_size_splits_the_output(folder, tmp_path):
    report = import_images(str(folder), str(tmp_path / "o"), shard_size=3, progress=False)
    assert report["shards"] == ["data-000000.tar", "data-000001.tar"]


def test_cli_import_and_clear_errors(folder, tmp_path, capsys):
    assert main(["data", "import", "--images", str(folder), "--out", str(tmp_path / "o")]) == 0
    assert "imported 4 of 7 images" in capsys.readouterr().out
    assert main(["data", "import", "--images", str(tmp_path / "nope"), "--out", "x"]) == 2
    assert "no such image folder" in capsys.readouterr().err
    (tmp_path / "blank").mkdir()
    assert main(["data", "import", "--images", str(tmp_path / "blank"), "--out", "x"]) == 2
    assert "no images" in capsys.readouterr().err
