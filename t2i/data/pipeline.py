"""From shards to batches: decode, convert to RGB, resize / centre-crop, tokenize, batch.

A batch is a dict:
    image      float [B, 3, H, W] in [-1, 1]
    text       long  [B, L]      caption ids (see t2i.data.tokenizer)
    text_mask  bool  [B, L]      True at real tokens
    seg        long  [B, H, W]   class map, where the samples have one (-1 where one lacks it)
    record     list[dict|None]   the samples' json member (the synthetic scenes' exact
                                 attributes), where any sample has one
    caption    list[str], key list[str]

Splitting. One epoch is one fixed sequence of samples: the shards in an order drawn from
(seed, epoch), each shard's samples in an order drawn from (seed, epoch, shard). The
readers (every DataLoader worker of every rank) take turns along that sequence: reader g of
G takes positions g, g+G, g+2G, ... So no sample is read twice in an epoch, every reader
gets the same number of samples to within one, and the whole order is fixed by seed and
epoch alone. Readers index every shard from its tar headers (cheap: data is skipped by
seeking) and read the bytes of their own samples only.

Resuming. Each batch carries its reader and the epoch position of its last sample; the
pipeline keeps, per reader, the last position handed out (`position()`). Given that back
(`epoch(e, resume=...)`), every reader starts after it, and the DataLoader's round-robin
over workers is rotated so that the batches come in the order the interrupted epoch would
have produced them (exact while every worker still has data; in an epoch's last few
batches it can only reorder, never repeat or drop, samples).

Bad input never stops a run. Each case is handled (converted, truncated) or the sample is
skipped; either way it is counted in shared memory across workers, warned about a few times
per reader, and summarised at the end of the epoch (`ImageTextPipeline.epoch`).
"""

import io
import json
import logging
import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from t2i.data.shards import ShardIndex, TarFormatError, iter_shard, read_members, resolve_shards
from t2i.data.tokenizer import Tokenizer

log = logging.getLogger("t2i.data")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
CAPTION_EXTS = ("txt", "caption", "text")
# What can go wrong, and what is done about it.
ISSUES = {
    "unreadable_shard": "skipped: the shard could not be opened as a tar",
    "truncated_shard": "kept the samples before the damage in a truncated or corrupt tar",
    "truncated_sample": "skipped: the sample's bytes are cut short",
    "missing_image": "skipped: no image member",
    "bad_image": "skipped: the image does not decode",
    "missing_caption": "skipped: no caption member",
    "empty_caption": "skipped: the caption is empty",
    "bad_seg": "skipped: the segmentation map does not decode or has another size",
    "converted_image": "converted to RGB (grey, alpha, palette or other mode)",
    "long_caption": "truncated to the tokenizer's max_length",
}
_KINDS = tuple(ISSUES)
WARNINGS_PER_KIND = 3  # per reader; the rest are only counted
MAX_READERS = 64  # DataLoader workers per process


class DataIssues:
    """Counts of bad input, in shared memory so that DataLoader workers can add to them."""

    def __init__(self):
        self.counts = torch.zeros(MAX_READERS, len(_KINDS), dtype=torch.long).share_memory_()
        self._warned = [0] * len(_KINDS)  # per process: each worker has its own copy

    def add(self, kind: str, where: str) -> None:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        if slot >= MAX_READERS:
            raise ValueError(f"at most {MAX_READERS} DataLoader workers are supported")
        k = _KINDS.index(kind)
        self.counts[slot, k] += 1
        if self._warned[k] < WARNINGS_PER_KIND:
            self._warned[k] += 1
            more = " (further ones are counted, not shown)" if self._warned[
                k] == WARNINGS_PER_KIND else ""
            log.warning("%s: %s: %s%s", where, kind, ISSUES[kind], more)

    def totals(self) -> dict[str, int]:
        return {k: int(n) for k, n in zip(_KINDS, self.counts.sum(0).tolist(), strict=True) if n}

    def reset(self) -> None:
        self.counts.zero_()

    def summary(self) -> str:
        totals = self.totals()
        if not totals:
            return "no bad input"
        return "; ".join(f"{n} {k} ({ISSUES[k]})" for k, n in totals.items())


def _to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """-> (RGB image, whether it needed converting). Transparency is composited on white."""
    if image.mode == "RGB":
        return image, False
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), True
    return image.convert("RGB"), True


def _resize_crop(image: Image.Image, size: int, resample) -> Image.Image:
    """Scale the shorter side to `size`, then take the centre square."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def decode_sample(key: str, fields: dict[str, bytes], *, image_size: int,
                  tokenizer: Tokenizer, issues: DataIssues) -> dict | None:
    """One sample's bytes -> tensors, or None (counted) when it must be skipped."""
    image_ext = next((e for e in IMAGE_EXTS if e in fields), None)
    if image_ext is None:
        return issues.add("missing_image", key)
    caption_ext = next((e for e in CAPTION_EXTS if e in fields), None)
    if caption_ext is None:
        return issues.add("missing_caption", key)
    caption = fields[caption_ext].decode("utf-8", errors="replace").strip()
    if not caption:
        return issues.add("empty_caption", key)
    try:
        image = Image.open(io.BytesIO(fields[image_ext]))
        image.load()
        original_size = image.size
        image, converted = _to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return issues.add("bad_image", key)
    if converted:
        issues.add("converted_image", key)
    pixels = np.asarray(_resize_crop(image, image_size, Image.BICUBIC), dtype=np.float32)
    sample = {
        "key": key,
        "caption": caption,
        "image": torch.from_numpy(pixels).permute(2, 0, 1).div_(127.5).sub_(1.0),
    }
    if "seg.png" in fields:
        try:
            seg = Image.open(io.BytesIO(fields["seg.png"]))
            seg.load()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return issues.add("bad_seg", key)
        if seg.size != original_size or seg.mode not in ("L", "P"):
            return issues.add("bad_seg", key)
        seg = np.asarray(_resize_crop(seg, image_size, Image.NEAREST), dtype=np.int64)
        sample["seg"] = torch.from_numpy(seg.copy())
    if "json" in fields:  # attributes and provenance; a bad one is dropped, not fatal
        try:
            sample["record"] = json.loads(fields["json"])
        except (UnicodeDecodeError, ValueError):
            pass
    ids, truncated = tokenizer.encode(caption)
    if truncated:
        issues.add("long_caption", key)
    sample["ids"] = ids
    return sample


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardDataset(IterableDataset):
    """Decoded samples of one epoch, this reader's share (see the module docstring).

    rank / world_size default to torch.distributed's, else RANK / WORLD_SIZE, else 0 / 1.
    """

    def __init__(self, source, *, tokenizer: Tokenizer, image_size: int, split: str = "train",
                 seed: int = 0, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None):
        self.shards = resolve_shards(source, split)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.seed = seed
        self.shuffle = shuffle
        default_rank, default_world = _dist_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.epoch = 0
        self.resume: dict[int, int] = {}  # reader -> last position already consumed
        self.worker_shift = 0  # rotates worker ids, to continue a DataLoader's round-robin
        self.issues = DataIssues()
        self._indices: dict[str, ShardIndex] = {}  # per reader process, kept across epochs

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _index(self, path: str, report: bool) -> ShardIndex:
        """`report`: count the shard's damage (one reader does, or every reader would)."""
        if path not in self._indices:
            self._indices[path] = ShardIndex(path)
        index = self._indices[path]
        if report and index.error is not None:
            self.issues.add("truncated_shard" if len(index) or index.dropped
                            else "unreadable_shard", f"{path} ({index.error})")
            if index.dropped is not None:
                self.issues.add("truncated_sample", f"{path}:{index.dropped}")
        return index

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        worker = (worker + self.worker_shift) % workers
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[dict]:
        reader, readers = self._reader()
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.shards)) if self.shuffle else range(len(self.shards))
        position = 0
        for s in order:
            path = self.shards[s]
            index = self._index(path, report=reader == 0)
            n = len(index)
            if self.shuffle:
                within = np.random.default_rng([self.seed, self.epoch, int(s)]).permutation(n)
            else:
                within = range(n)
            # positions position..position+n-1 belong to this shard; ours are ≡ reader mod readers
            first = (reader - position) % readers
            done = self.resume.get(reader, -1) - position  # already consumed before a resume
            if done >= first:
                first += (done - first) // readers * readers + readers
            mine = [(j, int(within[j])) for j in range(first, n, readers)]
            position += n
            if not mine:
                continue
            with open(path, "rb") as f:
                for j, k in mine:
                    key, members = index.samples[k]
                    try:
                        fields = read_members(f, members)
                    except (TarFormatError, OSError):
                        self.issues.add("truncated_sample", f"{path}:{key}")
                        continue
                    sample = decode_sample(key, fields, image_size=self.image_size,
                                           tokenizer=self.tokenizer, issues=self.issues)
                    if sample is not None:
                        sample["reader"], sample["position"] = reader, position - n + j
                        yield sample


def collate(samples: list[dict], tokenizer: Tokenizer) -> dict:
    ids, mask = tokenizer.pad(s["ids"] for s in samples)
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "text": ids,
        "text_mask": mask,
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        # a reader batches its own samples only: one reader, positions increasing
        "reader": samples[0]["reader"],
        "position": samples[-1]["position"],
    }
    if any("seg" in s for s in samples):
        size = samples[0]["image"].shape[-2:]
        batch["seg"] = torch.stack([s.get("seg", torch.full(size, -1, dtype=torch.long))
                                    for s in samples])
    if any("record" in s for s in samples):
        batch["record"] = [s.get("record") for s in samples]
    return batch


class _Collate:  # a class, not a lambda, so that spawned workers can pickle it
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        return collate(samples, self.tokenizer)


class ImageTextPipeline:
    """Shards -> batches, one epoch at a time.

    >>> pipe = ImageTextPipeline("data/synth", tokenizer=ByteTokenizer(64), image_size=32,
    ...                          batch_size=64, num_workers=2)
    >>> for batch in pipe.epoch(0):
    ...     batch["image"].shape   # [64, 3, 32, 32]
    """

    def __init__(self, source, *, tokenizer: Tokenizer, image_size: int, batch_size: int,
                 num_workers: int = 0, split: str = "train", seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, rank: int | None = None,
                 world_size: int | None = None):
        self.dataset = ShardDataset(source, tokenizer=tokenizer, image_size=image_size,
                                    split=split, seed=seed, shuffle=shuffle, rank=rank,
                                    world_size=world_size)
        self.loader = DataLoader(self.dataset, batch_size=batch_size, num_workers=num_workers,
                                 collate_fn=_Collate(tokenizer), drop_last=drop_last,
                                 # its own generator: starting an epoch must not draw from
                                 # the global RNG, or a resumed run would diverge
                                 generator=torch.Generator().manual_seed(seed))
        self.last_issues: dict[str, int] = {}
        self._state = {"epoch": 0, "batches": 0, "readers": {}}

    def position(self) -> dict:
        """Where the batches handed out so far end: give it to `epoch(resume=...)`."""
        return {"epoch": self._state["epoch"], "batches": self._state["batches"],
                "readers": dict(self._state["readers"])}

    def epoch(self, epoch: int, resume: dict | None = None) -> Iterator[dict]:
        """The batches of one epoch; bad input is summarised in the log at its end.

        `resume`: a `position()` taken in this epoch; the epoch continues after it."""
        if resume is not None and resume["epoch"] != epoch:
            raise ValueError(f"resume position is in epoch {resume['epoch']}, not {epoch}")
        state = resume or {"epoch": epoch, "batches": 0, "readers": {}}
        self._state = {"epoch": epoch, "batches": state["batches"],
                       "readers": {int(r): p for r, p in state["readers"].items()}}
        self.dataset.set_epoch(epoch)  # workers are made per epoch and copy the dataset
        self.dataset.resume = dict(self._state["readers"])
        self.dataset.worker_shift = self._state["batches"] % max(1, self.loader.num_workers)
        self.dataset.issues.reset()
        for batch in self.loader:
            self._state["batches"] += 1
            self._state["readers"][batch["reader"]] = batch["position"]
            yield batch
        self.last_issues = self.dataset.issues.totals()
        if self.last_issues:
            log.warning("epoch %d data: %s", epoch, self.dataset.issues.summary())


def captions(source, split: str = "train") -> Iterator[str]:
    """Every caption of a split, in file order, without decoding images (to train a BPE
    tokenizer on them)."""
    for path in resolve_shards(source, split):
        for _, fields in iter_shard(path):
            ext = next((e for e in CAPTION_EXTS if e in fields), None)
            if ext is not None:
                text = fields[ext].decode("utf-8", errors="replace").strip()
                if text:
                    yield text
