"""`t2i data import`: a folder of captioned images -> webdataset shards.

Captions come from a same-stem `.txt` beside each image (`cat.jpg` + `cat.txt`), or from
`captions.jsonl` (`{"file": "cat.jpg", "caption": "..."}` per line) or `captions.csv`
(columns `file,caption`) at the top of the folder; a `.txt` wins where both exist.
PNG, JPEG and WebP bytes are stored as they are; other formats are converted to PNG.
Every image that is skipped (does not decode, no caption, empty caption) is counted and
listed with its reason in `import_report.json`: nothing is dropped silently.
"""

import csv
import io
import json
import logging
import os

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from t2i.data.shards import ShardWriter

log = logging.getLogger("t2i.data")

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp",
                  ".bmp": None, ".gif": None, ".tif": None, ".tiff": None}  # None: to PNG
CAPTION_FIELDS = ("caption", "text")
FILE_FIELDS = ("file", "image", "filename")


def _read_caption_table(root: str) -> dict[str, str]:
    """Relative image path -> caption, from captions.jsonl / captions.csv if present."""
    table: dict[str, str] = {}

    def add(row: dict, where: str):
        file = next((row[k] for k in FILE_FIELDS if k in row), None)
        caption = next((row[k] for k in CAPTION_FIELDS if k in row), None)
        if file is None or caption is None:
            raise ValueError(f"{where}: each row needs one of {FILE_FIELDS} and one of "
                             f"{CAPTION_FIELDS}; got {sorted(row)}")
        table[os.path.normpath(file)] = caption

    path = os.path.join(root, "captions.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        add(json.loads(line), f"{path}:{n}")
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not JSON ({e})") from e
    path = os.path.join(root, "captions.csv")
    if os.path.exists(path):
        with open(path, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                add(row, f"{path}:{n}")
    return table


def _find_images(root: str) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.append(os.path.relpath(os.path.join(folder, name), root))
    return found


def _key_for(rel: str, taken: set[str]) -> str:
    key = os.path.splitext(rel)[0].replace(os.sep, "__").replace(".", "_")
    unique, n = key, 1
    while unique in taken:
        unique, n = f"{key}_{n}", n + 1
    taken.add(unique)
    return unique


def _load(root: str, rel: str, table: dict[str, str]):
    """-> (caption, image bytes, decoded image), or the reason to skip it (a str)."""
    path = os.path.join(root, rel)
    txt = os.path.splitext(path)[0] + ".txt"
    if os.path.exists(txt):
        with open(txt, encoding="utf-8", errors="replace") as f:
            caption = f.read()
    else:
        caption = table.get(os.path.normpath(rel))
    if caption is None:
        return "no caption"
    if not caption.strip():
        return "empty caption"
    with open(path, "rb") as f:
        data = f.read()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"image does not decode ({type(e).__name__})"
    return caption.strip(), data, image


def import_images(images: str, out: str, *, shard_size: int = 1000, prefix: str = "data",
                  progress: bool = True) -> dict:
    """Write every captioned, decodable image under `images` into shards in `out`.
    -> the report also written to out/import_report.json."""
    if not os.path.isdir(images):
        raise FileNotFoundError(f"no such image folder: {images}")
    files = _find_images(images)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {images}")
    table = _read_caption_table(images)
    os.makedirs(out, exist_ok=True)

    skipped: list[dict] = []
    shards: list[str] = []
    taken: set[str] = set()
    writer = None
    try:
        for rel in tqdm(files, unit="img", desc="import", disable=not progress):
            loaded = _load(images, rel, table)
            if isinstance(loaded, str):
                if len(skipped) < 3:
                    log.warning("skipping %s: %s", os.path.join(images, rel), loaded)
                skipped.append({"file": rel, "reason": loaded})
                continue
            caption, data, image = loaded
            ext = IMAGE_SUFFIXES[os.path.splitext(rel)[1].lower()]
            if ext is None:  # a format webdataset readers may not decode: store as PNG
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data, ext = buffer.getvalue(), "png"
            if writer is None or writer.count == shard_size:
                if writer is not None:
                    writer.close()
                shards.append(f"{prefix}-{len(shards):06d}.tar")
                writer = ShardWriter(os.path.join(out, shards[-1]))
            meta = {"source_file": rel, "width": image.width, "height": image.height,
                    "mode": image.mode}
            writer.write(_key_for(rel, taken), {
                ext: data, "txt": caption.encode(),
                "json": json.dumps(meta, sort_keys=True).encode()})
    except BaseException:
        if writer is not None:
            writer.abort()  # no half-written shard is left behind
        raise
    if writer is not None:
        writer.close()

    report = {"images_found": len(files), "imported": len(files) - len(skipped),
              "skipped": skipped, "shards": shards}
    with open(os.path.join(out, "import_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    if skipped:
        log.warning("skipped %d of %d images; reasons in %s", len(skipped), len(files),
                    os.path.join(out, "import_report.json"))
    if not shards:
        raise ValueError(f"none of the {len(files)} images under {images} could be imported; "
                         f"see {os.path.join(out, 'import_report.json')}")
    return report
