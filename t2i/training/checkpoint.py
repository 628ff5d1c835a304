"""Checkpoints of a run, written so that a half-written one is never taken for the latest.

    RUN/checkpoints/step_000500/
        model/, disc/, ...        one DeepSpeed checkpoint per engine (tag = module name)
        rank00000.pt ...          per rank: RNG states and the data position
        trainer.pt                step, epoch, counters, EMA weights (rank 0)
        COMPLETE                  written last, after every rank has finished
    RUN/checkpoints/latest        name of the newest complete checkpoint (atomic rename)

Only a directory with COMPLETE is ever loaded; older complete ones beyond `keep` and
incomplete leftovers are deleted after a newer checkpoint is complete.
"""

import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _atomic_write(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, COMPLETE))


def latest(root: str) -> str | None:
    """The newest complete checkpoint directory under `root`, or None."""
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer, encoding="utf-8") as f:
            path = os.path.join(root, f.read().strip())
        if is_complete(path):
            return path
    # no pointer (or a stale one): the newest complete directory, if any
    names = sorted(n for n in os.listdir(root) if n.startswith("step_")) \
        if os.path.isdir(root) else []
    complete = [os.path.join(root, n) for n in names if is_complete(os.path.join(root, n))]
    return complete[-1] if complete else None


def save(root: str, step: int, engines: dict, rank_state: dict, trainer_state: dict,
         keep: int) -> str:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    path = os.path.join(root, step_name(step))
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        if is_complete(path):  # re-saving the same step (e.g. SIGTERM right after a save)
            os.remove(os.path.join(path, COMPLETE))
    dist.barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(path, tag=name, save_latest=False)
    _atomic_save(rank_state, os.path.join(path, f"rank{rank:05d}.pt"))
    if rank == 0:
        _atomic_save(trainer_state, os.path.join(path, "trainer.pt"))
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        _atomic_write(os.path.join(path, COMPLETE), f"{step}\n")
        _atomic_write(os.path.join(root, "latest"), step_name(step) + "\n")
        _prune(root, keep, current=path)
    dist.barrier()
    return path


def _prune(root: str, keep: int, current: str) -> None:
    names = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    complete = [n for n in names if is_complete(os.path.join(root, n))]
    for name in names:
        path = os.path.join(root, name)
        if path == current:
            continue
        if name not in complete or complete.index(name) < len(complete) - keep:
            shutil.rmtree(path, ignore_errors=True)


def load(path: str, engines: dict) -> tuple[dict, dict]:
    """Collective. Loads every engine (weights, optimiser, LR schedule) from checkpoint
    directory `path` -> (this rank's state, trainer state)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    saved_ranks = len([n for n in os.listdir(path) if n.startswith("rank")])
    if saved_ranks != world:
        raise RuntimeError(f"{path} was written by {saved_ranks} ranks; resuming it exactly "
                           f"needs the same number, got {world}")
    for name, engine in engines.items():
        loaded, _ = engine.load_checkpoint(path, tag=name, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load the '{name}' checkpoint")
    rank_state = torch.load(os.path.join(path, f"rank{rank:05d}.pt"), weights_only=False)
    trainer_state = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
    return rank_state, trainer_state
