"""The `t2i` command.

    t2i data synth --out DIR --num N --size {32,64,128} --seed S
    t2i data import --images DIR --out DIR
    t2i eval --model RUN_DIR [--probe RUN_DIR --num 1000 --seed 0 --inception PATH] --out F
    t2i generate --model RUN_DIR --prompt "..." [--num 8 --steps 12 --cfg S --seed 0] --out F
"""

import argparse
import logging
import sys


def _data_synth(args) -> None:
    from t2i.data.synth import synthesize

    info = synthesize(args.out, args.num, size=args.size, seed=args.seed,
                      val_fraction=args.val_fraction, shard_size=args.shard_size,
                      workers=args.workers, held_out_train=args.held_out_train)
    splits = info["splits"]
    print(f"wrote {splits['train']['num']} training and {splits['val']['num']} validation "
          f"scenes at {args.size}px into {len(splits['train']['shards'])} + "
          f"{len(splits['val']['shards'])} shards under {args.out} (see split.json)")


def _data_import(args) -> None:
    from t2i.data.importer import import_images

    report = import_images(args.images, args.out, shard_size=args.shard_size)
    print(f"imported {report['imported']} of {report['images_found']} images into "
          f"{len(report['shards'])} shards under {args.out}"
          + (f"; {len(report['skipped'])} skipped (see import_report.json)"
             if report["skipped"] else ""))


def _eval(args) -> None:
    from t2i.eval.report import evaluate_run

    generate = {k: v for k, v in (("steps", args.steps), ("cfg_scale", args.cfg),
                                  ("batch_size", args.batch_size)) if v is not None}
    report = evaluate_run(args.model, out=args.out, probe_dir=args.probe, data_path=args.data,
                          num=args.num, seed=args.seed, inception=args.inception,
                          generate_args=generate)
    headline = []
    if "reconstruction" in report:
        headline += [f"{k} {v:.4g}" for k, v in report["reconstruction"].items()]
    if "caption_accuracy" in report:
        acc, ceil = report["caption_accuracy"], report["ceiling"]
        headline += [f"{k} {acc[k]:.3f} (real {ceil[k]:.3f})" for k in ("colour", "shape", "whole")]
        headline.append(f"FD-probe {report['fd_probe']:.3g}")
    if report.get("fid") is not None:
        headline.append(f"FID {report['fid']:.4g}, IS {report['inception_score']:.3g}")
    elif "skipped" in report:
        headline.append("FID/IS skipped: no --inception weights")
    print(f"{report['num']} samples: " + ", ".join(headline))
    print(f"wrote {args.out} and its .md summary")


def _generate(args) -> None:
    from t2i.images import save_grid
    from t2i.pipelines import load

    critic = args.critic
    pipe = load(args.model, base=args.base,
                critic=critic if critic not in (None, "self") else None)
    critic = "critic" if critic not in (None, "self") else critic
    if args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}")
    class_mode = pipe.model.config.condition == "class"
    prompts = args.class_id if class_mode else args.prompt
    if not prompts:
        raise ValueError("this model is class-conditional: give --class-id N" if class_mode
                         else "give at least one --prompt")
    if args.layouts and pipe.layouts is None:
        raise ValueError("--layouts: this model paints on no layout (not a painter)")
    cfg = args.cfg
    if cfg is None:  # guidance blurs a painter's shapes into blobs: none for painters
        cfg = None if pipe.layouts is not None else 3.0
    rows = []
    for i, prompt in enumerate(prompts):
        cond = {"class_ids": [prompt] * args.num} if class_mode else {"texts": [prompt] * args.num}
        out = pipe(**cond, steps=args.steps, cfg_scale=cfg, seed=args.seed + 1000 * i,
                   schedule=args.schedule, temperature=args.temperature,
                   remask_temperature=args.remask_temperature, top_k=args.top_k, critic=critic,
                   layout_threshold=args.layout_threshold, layout_sharpen=args.layout_sharpen,
                   negative_texts=[args.negative] * args.num if args.negative else None)
        rows.append(out.images)
        if args.layouts:  # the drawn layout under the images painted on it
            from t2i.models.muse import layout_picture

            rows.append(layout_picture(out.layout, out.images.shape[-1], pipe.model.config))
    save_grid(rows, args.out, scale=args.scale)
    print(f"wrote {args.out}: {len(rows)} row(s) of {args.num} ({tuple(rows[0].shape[-2:])} px, "
          f"{args.steps} steps, cfg {cfg if cfg is not None else 'off'}, seed {args.seed})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="make and import data sets").add_subparsers(
        dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the synthetic scenes as webdataset shards")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--num", type=int, default=20000, help="scenes in all (train + val)")
    synth.add_argument("--size", type=int, default=32, choices=(32, 64, 128),
                       help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of scenes in the validation split")
    synth.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    synth.add_argument("--workers", type=int, default=1,
                       help="processes; the output is identical whatever the number")
    synth.add_argument("--held-out-train", type=float, default=0.0,
                       help="share of training scenes with a held-out (colour, shape) pair "
                            "(0 for generators; the attribute probe's data uses 0.5)")
    synth.set_defaults(run=_data_synth)

    imp = data.add_parser("import", help="a folder of captioned images into shards")
    imp.add_argument("--images", required=True,
                     help="folder of images with same-stem .txt captions, or a "
                          "captions.jsonl / captions.csv at its top")
    imp.add_argument("--out", required=True, help="output directory")
    imp.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    imp.set_defaults(run=_data_import)

    ev = commands.add_parser("eval", help="score a trained run on the validation split")
    ev.add_argument("--model", required=True, help="run directory (or its export/ folder)")
    ev.add_argument("--out", required=True, help="report JSON; .md and .png are written beside")
    ev.add_argument("--probe", help="attribute-probe run directory (training/configs/"
                                    "probe_shapes.yaml); required to score generators")
    ev.add_argument("--data", help="data set (default: the one the run trained on)")
    ev.add_argument("--num", type=int, default=1000, help="validation samples to score")
    ev.add_argument("--seed", type=int, default=0, help="generation seed")
    ev.add_argument("--steps", type=int, help="generators: decoding steps")
    ev.add_argument("--cfg", type=float, help="generators: classifier-free guidance scale")
    ev.add_argument("--batch-size", type=int, help="generators: images per call")
    ev.add_argument("--inception", help="Inception-v3 weights (e.g. pytorch-fid's "
                                        "pt_inception-2015-12-05-6726825d.pth) for FID and IS")
    ev.set_defaults(run=_eval)

    gen = commands.add_parser("generate", help="images from a trained generator")
    gen.add_argument("--model", required=True, help="run directory (or its export/ folder)")
    gen.add_argument("--prompt", action="append", default=[],
                     help="caption; repeat for several rows")
    gen.add_argument("--class-id", type=int, action="append", default=[],
                     help="class-conditional models: a class id per row")
    gen.add_argument("--negative", help="negative prompt (needs --cfg)")
    gen.add_argument("--base", help="super-resolution stage: the base stage's run directory")
    gen.add_argument("--num", type=int, default=8, help="images per prompt")
    gen.add_argument("--steps", type=int, default=12, help="decoding steps")
    gen.add_argument("--cfg", type=float,
                     help="guidance scale (1: conditional only, 0: unconditional; default 3, "
                          "and no guidance for a painter on layouts: it blurs their shapes)")
    gen.add_argument("--schedule", default="cosine", choices=("cosine", "arccos", "linear"))
    gen.add_argument("--temperature", type=float,
                     help="token sampling temperature (default 0.5 for a painter, else 1)")
    gen.add_argument("--remask-temperature", type=float,
                     help="Gumbel noise on the confidences that choose what is masked again, "
                          "annealed to 0 (default 0 for a painter, else 4.5)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--critic", help="what decides the re-masking instead of the tokens' "
                                      "confidence: 'self' (the model re-scores) or a "
                                      "token-critic run directory")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--scale", type=int, default=4, help="pixel enlargement in the grid")
    gen.add_argument("--layout-threshold", type=float,
                     help="painters: a drawn layout has objects where the layout model gives "
                          "the background less than this probability (default 0.4)")
    gen.add_argument("--layout-sharpen", type=float,
                     help="painters: that probability unsharp-masked by this much first "
                          "(default 8; 0: not at all)")
    gen.add_argument("--layouts", action="store_true",
                     help="painters: under each prompt's images, the layouts drawn for them")
    gen.add_argument("--out", required=True, help="PNG grid: one row per prompt")
    gen.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"t2i: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
