"""The `t2i` command.

    t2i data synth --out DIR --num N --size {32,64,128} --seed S
    t2i data import --images DIR --out DIR
    t2i eval --model RUN_DIR [--probe RUN_DIR --num 1000 --seed 0 --inception PATH] --out F
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
