"""`t2i eval`: score a run on the validation split; write JSON, markdown and a picture.

What is scored depends on what the run exported (its model's `kind`):
    generator        images generated for validation captions (fixed seed), scored by the
                     attribute probe against those captions, FD-probe and precision /
                     recall against the real validation images, FID / IS when Inception
                     weights are given
    image_tokenizer  the family's own validation metrics (PSNR, SSIM, codebook) and, with a
                     probe, the same scores on the round-tripped images
    seg_tokenizer    pixel accuracy, mean IoU, codebook
    probe            the probe on real validation images: the ceiling of every score
Beside the generated (or reconstructed) images' scores the report always gives the
probe's score on the real images of the same captions, so a figure is read against its
ceiling.
"""

import json
import math
import os
import time

import torch
from tqdm import tqdm

from t2i.data import ByteTokenizer, ImageTextPipeline
from t2i.eval.attributes import caption_scores, describe, summarize
from t2i.eval.distribution import frechet_distance, precision_recall
from t2i.eval.metrics import reconstruction_metrics
from t2i.images import save_grid
from t2i.models import get_family, load_pretrained
from t2i.training.config import DataConfig, from_dict


def _export_meta(run_dir: str) -> dict:
    path = os.path.join(run_dir, "export") if os.path.isdir(os.path.join(run_dir, "export")) \
        else run_dir
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir}: no exported model (export/config.json); a "
                                f"training run writes one at every checkpoint") from None


def validation_set(data: DataConfig, num: int, batch_size: int = 256) -> dict:
    """The first `num` validation samples (fixed order): images, captions, records, seg."""
    pipe = ImageTextPipeline(data.path, tokenizer=ByteTokenizer(data.text_length),
                             image_size=data.image_size, batch_size=batch_size,
                             split="val", shuffle=False)
    images, captions, records, segs = [], [], [], []
    for batch in pipe.epoch(0):
        images.append(batch["image"])
        captions += batch["caption"]
        records += batch.get("record", [None] * len(batch["caption"]))
        if "seg" in batch:
            segs.append(batch["seg"])
        if len(captions) >= num:
            break
    if not captions:
        raise ValueError(f"{data.path}: no validation samples")
    n = min(num, len(captions))
    return {"image": torch.cat(images)[:n], "caption": captions[:n], "record": records[:n],
            "seg": torch.cat(segs)[:n] if segs else None}


def _targets(val: dict) -> list:
    """What each image should show: the exact record where the data has one."""
    return [r if r is not None and "objects" in r else c
            for r, c in zip(val["record"], val["caption"], strict=True)]


def probe_scores(probe, images: torch.Tensor, val: dict) -> dict:
    """Caption accuracy of `images` and of the real images of the same captions (ceiling),
    FD-probe and precision / recall against the real images. Each image set goes through
    the probe once (once in all when `images` are the real ones)."""
    targets = _targets(val)
    real_tables, real_f = probe.read(val["image"])
    tables, fake_f = (real_tables, real_f) if images is val["image"] else probe.read(images)
    scores = caption_scores(tables, targets)
    out = {"caption_accuracy": summarize(scores),
           "ceiling": summarize(caption_scores(real_tables, targets)),
           "scores": scores, "predicted": tables,
           "fd_probe": frechet_distance(real_f, fake_f) if len(images) >= 2 else None}
    if len(images) >= 4:
        out.update(precision_recall(real_f, fake_f))
    return out


def inception_scores(path: str | None, images: torch.Tensor, real: torch.Tensor) -> dict:
    """FID and IS with the weights at `path`; without weights, say so and score nothing."""
    if path is None:
        return {"fid": None, "inception_score": None,
                "skipped": "no Inception-v3 weights given (--inception PATH): FID and IS "
                           "not computed"}
    from t2i.eval.inception import inception_outputs, inception_score, load_inception

    net = load_inception(path)
    fake_f, fake_logits = inception_outputs(net, images)
    real_f, _ = inception_outputs(net, real)
    splits = min(10, len(images))
    mean, std = inception_score(fake_logits, splits)
    return {"fid": frechet_distance(real_f, fake_f), "inception_score": mean,
            "inception_score_std": std, "inception_splits": splits, "weights": path}


def evaluate_run(run_dir: str, *, out: str, probe_dir: str | None = None,
                 data_path: str | None = None, num: int = 1000, seed: int = 0,
                 inception: str | None = None, generate_args: dict | None = None) -> dict:
    """Score the model exported under `run_dir`; write `out` (JSON), the same name with
    .md (summary) and .png (best and worst samples, where there are images)."""
    if num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    meta = _export_meta(run_dir)
    data = from_dict(DataConfig, meta.get("data", {}), "data")
    if data_path is not None:
        data.path = data_path
    model = load_pretrained(run_dir)
    kind = getattr(model, "kind", None)
    probe = load_pretrained(probe_dir) if probe_dir else None
    if probe is not None and getattr(probe, "kind", None) != "probe":
        raise ValueError(f"--probe {probe_dir} holds a {type(probe).__name__}, not an "
                         f"attribute probe")
    if probe is None and kind == "probe":
        probe = model
    if kind == "generator" and probe is None:
        raise ValueError("a generator is scored by the attribute probe: --probe RUN_DIR (train "
                         "one with training/configs/probe_shapes.yaml)")
    val = validation_set(data, num)
    report = {"run": run_dir, "family": meta["family"], "stage": meta["stage"],
              "step": meta.get("step"), "kind": kind, "num": len(val["caption"]),
              "data": data.path, "probe": probe_dir, "seed": seed}
    start = time.perf_counter()
    images = None
    if kind == "generator":
        args = dict(generate_args or {})
        images = _generate(run_dir, val["caption"], seed, args)
        report["generate"] = args
    elif kind == "image_tokenizer":
        batches = [{"image": val["image"][i:i + 128]} for i in range(0, report["num"], 128)]
        recon = []
        report["reconstruction"] = reconstruction_metrics(model, batches,
                                                          model.config.num_codes, recon)
        images = torch.cat(recon)
    elif kind == "seg_tokenizer":
        if val["seg"] is None:
            raise ValueError(f"{data.path}: the validation samples have no segmentation maps")
        task = get_family(meta["family"]).STAGES[meta["stage"]](model.config, data)
        batches = [{"image": val["image"][i:i + 128], "seg": val["seg"][i:i + 128]}
                   for i in range(0, report["num"], 128)]
        report["reconstruction"] = task.evaluate(model, batches)
    elif kind != "probe":
        raise ValueError(f"{run_dir}: t2i eval does not know how to score a {kind!r} model")
    report["seconds_generating"] = round(time.perf_counter() - start, 2)

    if probe is not None:
        scored = probe_scores(probe, images if images is not None else val["image"], val)
        scores, predicted = scored.pop("scores"), scored.pop("predicted")
        report.update(scored)
        if images is not None:
            report["samples"] = _best_worst(images, val, scores, predicted, out)
    if images is not None:
        report.update(inception_scores(inception, images, val["image"]))
    _write(report, out)
    return report


def _generate(run_dir: str, captions: list[str], seed: int, args: dict) -> torch.Tensor:
    from t2i.pipelines import load

    pipe = load(run_dir)
    batch = args.pop("batch_size", 64)
    images = []
    for i in tqdm(range(0, len(captions), batch), desc="generate", unit="batch"):
        # one seed per batch start: the same captions give the same images at any --num
        images.append(pipe(captions[i:i + batch], seed=seed + i, **args).images)
    return torch.cat(images)


def _best_worst(images: torch.Tensor, val: dict, scores: list[dict], predicted: torch.Tensor,
                out: str, k: int = 8) -> dict:
    """The k best- and worst-scored samples as rows of a grid (generated, then the real
    image of the same caption) in <out>.png; their captions go into the report."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i]["score"], -i))
    worst, best = order[:k], order[::-1][:k]
    path = os.path.splitext(out)[0] + ".png"
    save_grid([images[best], val["image"][best], images[worst], val["image"][worst]], path,
              scale=3)

    def entry(i):
        return {"index": i, "caption": val["caption"][i], "score": scores[i]["score"],
                "probe_saw": describe(predicted[i])}

    return {"grid": os.path.basename(path), "best": [entry(i) for i in best],
            "worst": [entry(i) for i in worst]}


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown(report: dict) -> str:
    """The report as a short markdown summary."""
    lines = [f"# t2i eval: {report['run']}", "",
             f"{report['family']} / {report['stage']} (step {report['step']}), "
             f"{report['num']} validation samples of `{report['data']}`, seed {report['seed']}.",
             ""]
    if "reconstruction" in report:
        lines += ["## Reconstruction", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in report["reconstruction"].items()]
        lines.append("")
    if "caption_accuracy" in report:
        acc, ceil = report["caption_accuracy"], report["ceiling"]
        lines += ["## Attribute probe", "",
                  "| | these images | real images (ceiling) |", "|---|---:|---:|"]
        for key in ("shape", "colour", "size", "position", "relation", "whole"):
            lines.append(f"| {key} | {_fmt(acc[key])} | {_fmt(ceil[key])} |")
        for n, group in acc["by_objects"].items():
            real = ceil["by_objects"].get(n, {})
            for key in ("colour", "shape", "whole"):
                lines.append(f"| {n} object(s) ({group['count']}): {key} | {_fmt(group[key])} "
                             f"| {_fmt(real.get(key))} |")
        lines += ["", f"FD-probe {_fmt(report.get('fd_probe'))}, precision "
                      f"{_fmt(report.get('precision'))}, recall {_fmt(report.get('recall'))}.",
                  ""]
    if "fid" in report:
        lines += ["## Inception", "", report["skipped"] if report["fid"] is None else
                  f"FID {_fmt(report['fid'])}, IS {_fmt(report['inception_score'])} ± "
                  f"{_fmt(report['inception_score_std'])} ({report['weights']}).", ""]
    if "samples" in report:
        s = report["samples"]
        lines += ["## Best and worst samples", "",
                  f"![best and worst]({s['grid']}) rows: best generated, their real images, "
                  f"worst generated, their real images.", ""]
        for name in ("best", "worst"):
            lines += [f"{name}:"] + [f"{j + 1}. ({_fmt(e['score'])}) {e['caption']} "
                                      f"— probe saw: {e['probe_saw']}"
                                      for j, e in enumerate(s[name])] + [""]
    return "\n".join(lines)


def _write(report: dict, out: str) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    os.replace(out + ".tmp", out)
    with open(os.path.splitext(out)[0] + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(report))
