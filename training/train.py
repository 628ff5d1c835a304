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
layout model too) trains that one first when it is missing or unfinished (its export is of
an earlier step: it was interrupted), and so on down. One it trains without (a painter's
layout model: it is needed only for the sample grids and the export) trains beside it
instead in a run of one CPU process: in a child process on half the threads, its log in its
run directory's train.log; the run exports it once both are done.
"""

import argparse
import logging
import os
import subprocess
import sys

import deepspeed
import torch
import torch.distributed as dist

from t2i.models import get_family
from t2i.training.config import ConfigError, load_config
from t2i.training.loop import Trainer, env_without_group
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


def train_missing(config, ds_config: str, beside_ok: bool = True):
    """Train what the stage `config` describes needs and has not finished yet (e.g. the
    image tokenizer a transformer is trained on) on the same data (its data.path), each
    one's own needs first. Returns the `Beside` run of the last one when it trains beside
    this stage (`beside_ok` and `can_train_beside()`), else None."""
    model, done = config.model, set()
    while (before := get_family(model["family"]).STAGES.get(
            model["stage"], Task).prerequisite(model)) is not None:
        path, overrides, beside = before
        overrides = [*overrides, f"data.path={config.data.path}"]
        first, _ = load_config(path, overrides)
        if first.run.out in done:  # trained, and still missing: it exported elsewhere
            raise ConfigError(f"{first.run.out}: trained from {path} but no exported "
                              f"model appeared there")
        done.add(first.run.out)
        train_missing(first, ds_config, beside_ok=False)
        if beside and beside_ok and can_train_beside() and os.path.exists(config.data.path):
            # (with the data in place: two runs would write it at once)
            return Beside(path, overrides, first.run.out, ds_config)
        log.info("%s has no finished export yet: training it first (%s, on %s)",
                 first.run.out, path, config.data.path)
        Trainer(first, ds_config).train()
    return None


def can_train_beside() -> bool:
    """A run of one process on a CPU with threads to share: a second process uses the
    cores better than two stages in turn (a step on one thread takes 1.4-1.7x its time on
    two, not 2x)."""
    return (os.environ.get("WORLD_SIZE", "1") == "1" and not torch.cuda.is_available()
            and torch.get_num_threads() >= 2)


class Beside:
    """A prerequisite training in a child process (train.py on its config) beside this
    run, on half the threads; the other half stay here until it ends (`check`)."""

    def __init__(self, path: str, overrides: list[str], out: str, ds_config: str):
        self.out, self.threads = out, torch.get_num_threads()
        theirs = self.threads // 2
        os.makedirs(out, exist_ok=True)  # a run in progress: the stage waits for its export
        self.log_path = os.path.join(out, "train.log")
        env = {**env_without_group(), "OMP_NUM_THREADS": str(theirs)}  # its own group of one
        with open(self.log_path, "a", encoding="utf-8") as f:
            self.process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--config", path,
                 "--deepspeed_config", ds_config, *overrides, "run.progress=false"],
                stdout=f, stderr=subprocess.STDOUT, env=env)
        torch.set_num_threads(self.threads - theirs)
        log.info("%s has no finished export yet: training it beside this run (%s, process "
                 "%d on %d of %d threads; log: %s)", out, path, self.process.pid, theirs,
                 self.threads, self.log_path)

    def check(self) -> None:
        """Once the child has ended, this run takes all the threads back."""
        if torch.get_num_threads() != self.threads and self.process.poll() is not None:
            torch.set_num_threads(self.threads)
            log.info("%s ended (exit %d): this run goes on on %d threads", self.out,
                     self.process.returncode, self.threads)

    def wait(self) -> int:
        """Its exit status, once it has ended."""
        code = self.process.wait()
        self.check()
        return code

    def stop(self) -> None:
        """SIGTERM (it checkpoints at the end of its step and exits) and wait."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    beside = None
    try:
        try:
            config, _ = load_config(args.config, args.overrides)
            ds_config = args.deepspeed_config or DEFAULT_DS_CONFIG
            if not os.path.exists(ds_config):
                raise ConfigError(f"--deepspeed_config {ds_config}: no such file")
            if args.resume is False and os.path.isdir(os.path.join(config.run.out,
                                                                   "checkpoints")):
                raise ConfigError(f"--no-resume: {config.run.out} already has checkpoints; "
                                  f"choose another run.out or delete them")
            beside = train_missing(config, ds_config)
            trainer = Trainer(config, ds_config, resume=args.resume)
        except (ConfigError, ValueError) as e:
            print(f"train.py: config error: {e}", file=sys.stderr)
            return 2
        try:
            metrics = trainer.train(on_step=beside.check if beside is not None else None)
        except FloatingPointError as e:
            print(f"train.py: {e}", file=sys.stderr)
            return 1
        if beside is not None:
            if beside.wait() != 0:
                print(f"train.py: {beside.out}, trained beside this run, failed (exit "
                      f"{beside.process.returncode}; its log: {beside.log_path}). This run "
                      f"is complete but its export lacks that model: the same command again "
                      f"resumes it", file=sys.stderr)
                return 1
            trainer.refresh_outputs()  # with the model it has just exported
    finally:
        if beside is not None:
            beside.stop()  # an early exit (an error, a signal) stops it checkpointed
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
