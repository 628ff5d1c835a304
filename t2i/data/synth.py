"""`t2i data synth`: the embedded default data set, written as webdataset shards.

Layout of the output directory:
    train-000000.tar ...   training shards (`png`, `txt`, `seg.png`, `json` per sample)
    val-000000.tar ...     validation shards; every scene holds a held-out (colour, shape)
    split.json             arguments, classes, held-out pairs, the shards of each split

Each shard is drawn from its own seed (seed, split, shard number), so shards can be made
in parallel and the same arguments give byte-identical files whatever the worker count.
split.json is written last: a directory without it is incomplete.
"""

import json
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tqdm import tqdm

from t2i.data import scenes
from t2i.data.shards import ShardWriter, encode_png

FORMAT = "t2i-synth/1"
SPLIT_IDS = {"train": 0, "val": 1}
SIZES = (32, 64, 128)


def _shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def write_shard(out: str, split: str, shard: int, start: int, stop: int, size: int,
                seed: int, held_out_train: float = 0.0) -> int:
    """Samples [start, stop) of `split` into one shard. -> number written."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], shard])
    renderer = scenes.Renderer(size)
    with ShardWriter(os.path.join(out, _shard_name(split, shard))) as writer:
        for index in range(start, stop):
            # drawn only when asked for, so that data sets without it keep their bytes
            held_out = split == "val" or (held_out_train > 0 and rng.random() < held_out_train)
            image, seg, caption, record = scenes.sample_scene(rng, renderer, held_out)
            key = f"{split}_{index:08d}"
            record.update(key=key, split=split, index=index, size=size, source=FORMAT)
            writer.write(key, {
                "png": encode_png(image),
                "txt": caption.encode(),
                "seg.png": encode_png(seg),
                "json": json.dumps(record, sort_keys=True).encode(),
            })
    return stop - start


def read_split(directory: str) -> dict:
    with open(os.path.join(directory, "split.json")) as f:
        return json.load(f)


def synthesize(out: str, num: int, size: int = 32, seed: int = 0, val_fraction: float = 0.1,
               shard_size: int = 1000, workers: int = 1, progress: bool = True,
               held_out_train: float = 0.0) -> dict:
    """Write `num` scenes (train + validation) as shards under `out`. -> the split info.

    `held_out_train`: share of training scenes whose first object takes a held-out
    (colour, shape) pair. 0 for generators, whose validation tests composition; the
    attribute probe's data uses more, since it must read every pair. The validation split
    depends on `seed` alone, so it is the same whatever this is."""
    if num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    if size not in SIZES:
        raise ValueError(f"--size must be one of {SIZES}, got {size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    if not 0.0 <= held_out_train <= 1.0:
        raise ValueError(f"--held-out-train must be in [0, 1], got {held_out_train}")
    os.makedirs(out, exist_ok=True)
    num_val = round(num * val_fraction)
    counts = {"train": num - num_val, "val": num_val}
    args = {"num": num, "size": size, "seed": seed, "val_fraction": val_fraction,
            "shard_size": shard_size, "held_out_train": held_out_train}

    split_file = os.path.join(out, "split.json")
    if os.path.exists(split_file):
        os.remove(split_file)  # the directory is incomplete until we write it again
    jobs, splits = [], {}
    for split, n in counts.items():
        shards = []
        for shard in range(math.ceil(n / shard_size)):
            start, stop = shard * shard_size, min(n, (shard + 1) * shard_size)
            jobs.append((out, split, shard, start, stop, size, seed, held_out_train))
            shards.append(_shard_name(split, shard))
        splits[split] = {"num": n, "shards": shards}
    _remove_stale_shards(out, {s for info in splits.values() for s in info["shards"]})

    with tqdm(total=num, unit="img", desc=f"synth {size}px", disable=not progress) as bar:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
                for n in pool.map(write_shard, *zip(*jobs, strict=True)):
                    bar.update(n)
        else:
            for job in jobs:
                bar.update(write_shard(*job))

    info = {
        "format": FORMAT,
        "args": args,
        "classes": ["background", *scenes.SHAPES],
        "held_out": [list(p) for p in scenes.HELD_OUT],
        "splits": splits,
    }
    tmp = split_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    os.replace(tmp, split_file)
    return info


def _remove_stale_shards(out: str, keep: set[str]) -> None:
    """Shards of an earlier, larger run would otherwise be read by a glob of the folder."""
    for name in os.listdir(out):
        if re.fullmatch(r"(train|val)-\d{6}\.tar(\.tmp)?", name) and name not in keep:
            os.remove(os.path.join(out, name))


def ensure_synth(out: str, num: int, size: int = 32, seed: int = 0, val_fraction: float = 0.1,
                 shard_size: int = 1000, workers: int = 1, progress: bool = True,
                 held_out_train: float = 0.0) -> dict:
    """The data set under `out`, written first if it is missing, incomplete or was made
    with other arguments (what training calls on first use of the default data)."""
    args = {"num": num, "size": size, "seed": seed, "val_fraction": val_fraction,
            "shard_size": shard_size, "held_out_train": held_out_train}
    try:
        info = read_split(out)
        complete = all(os.path.exists(os.path.join(out, s))
                       for split in info["splits"].values() for s in split["shards"])
        if info["args"] == args and complete:
            return info
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        pass
    return synthesize(out, workers=workers, progress=progress, **args)
