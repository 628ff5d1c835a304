"""Train any t2i model: the one entry point.

    deepspeed training/train.py --config training/configs/muse_shapes.yaml \
        [--deepspeed_config training/configs/ds_zero2.json] [--resume] [key=value ...]
    python training/train.py --config ...              (one process, no launcher)
    deepspeed --num_gpus 2 training/train.py ...        (two local ranks; on CPU too)

The YAML holds model, data and run settings (t2i/training/config.py documents every key);
the DeepSpeed JSON holds ZeRO stage, precision, micro-batch and accumulation. Overrides
such as `run.steps=100 model.num_codes=256` change the YAML's values. A run directory with
a complete checkpoint is resumed automatically (--no-resume starts over and fails if one
exists). A stage that needs another stage's output (Muse needs its VQGAN; a painter its
layout model too) trains that one first when it is missing, and so on down.
"""

import argparse
import logging
import os
import sys

import deepspeed
import torch.distributed as dist

from t2i.models import get_family
from t2i.training.config import ConfigError, load_config
from t2i.training.loop import Trainer
from t2i.training.task import Task

log = logging.getLogger("train.py")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DS_CONFIG = os.path.join(HERE, "configs", "ds_zero2.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(HERE, "configs", "muse_shapes.yaml"),
                        help="YAML with model / data / run sections (default: the Muse base "
                             "model on the synthetic scenes, its VQGAN first)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="set by the deepspeed launcher")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", default=None,
                        help="continue from the run directory's latest checkpoint (default: "
                             "when it has one)")
    resume.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start from scratch; fails if the run directory has checkpoints")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. run.steps=100")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args(argv)


def train_missing(config, ds_config: str) -> None:
    """Train what the stage `config` describes needs and has not been exported yet (e.g. the
    image tokenizer a transformer is trained on) on the same data (its data.path), each
    one's own needs first."""
    model, done = config.model, set()
    while (before := get_family(model["family"]).STAGES.get(
            model["stage"], Task).prerequisite(model)) is not None:
        path, overrides = before
        first, _ = load_config(path, [*overrides, f"data.path={config.data.path}"])
        if first.run.out in done:  # trained, and still missing: it exported elsewhere
            raise ConfigError(f"{first.run.out}: trained from {path} but no exported "
                              f"model appeared there")
        done.add(first.run.out)
        train_missing(first, ds_config)
        log.info("%s has no exported model yet: training it first (%s, on %s)",
                 first.run.out, path, config.data.path)
        Trainer(first, ds_config).train()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config, _ = load_config(args.config, args.overrides)
        ds_config = args.deepspeed_config or DEFAULT_DS_CONFIG
        if not os.path.exists(ds_config):
            raise ConfigError(f"--deepspeed_config {ds_config}: no such file")
        if args.resume is False and os.path.isdir(os.path.join(config.run.out, "checkpoints")):
            raise ConfigError(f"--no-resume: {config.run.out} already has checkpoints; "
                              f"choose another run.out or delete them")
        train_missing(config, ds_config)
        trainer = Trainer(config, ds_config, resume=args.resume)
    except (ConfigError, ValueError) as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    try:
        metrics = trainer.train()
    except FloatingPointError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 1
    if trainer.rank == 0:
        print(f"done: {config.run.out} (step {trainer.step}); validation: "
              + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if dist.is_available() and dist.is_initialized():
        # every rank done before any tears its process group down: left to interpreter
        # exit, a rank of a two-process run could abort in its communication threads
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
