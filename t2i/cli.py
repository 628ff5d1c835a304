"""The `t2i` command.

    t2i data synth --out DIR --num N --size {32,64,128} --seed S
    t2i data import --images DIR --out DIR
"""

import argparse
import logging
import sys


def _data_synth(args) -> None:
    from t2i.data.synth import synthesize

    info = synthesize(args.out, args.num, size=args.size, seed=args.seed,
                      val_fraction=args.val_fraction, shard_size=args.shard_size,
                      workers=args.workers)
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
    synth.set_defaults(run=_data_synth)

    imp = data.add_parser("import", help="a folder of captioned images into shards")
    imp.add_argument("--images", required=True,
                     help="folder of images with same-stem .txt captions, or a "
                          "captions.jsonl / captions.csv at its top")
    imp.add_argument("--out", required=True, help="output directory")
    imp.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    imp.set_defaults(run=_data_import)
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
