"""Scoring images against what their captions say, through the attribute probe.

A synthetic scene puts at most one object in each of the five position slots, so a scene
is exactly a table: per slot, the object's shape, colour and size, or nothing. The probe
(t2i.models.probe) predicts that table from pixels; this module turns captions (or the
scenes' json records) into the same table and compares.

Per object a caption mentions, at the slot the caption puts it in:
    position  some object is there
    shape, colour, size   the one there has that attribute
A caption's relation ("the red circle is left of the blue square") is right when each of
the two objects is seen in exactly one slot (found by shape, colour and size, wherever
it is) and those slots stand in that relation. A whole caption is right when every attribute of
every object and the relation are right and no slot the caption leaves empty holds one.
"""

from collections.abc import Sequence

import torch

from t2i.data.scenes import (
    COLOUR_NAMES,
    POSITION_NAMES,
    SHAPES,
    SIZE_NAMES,
    parse_caption,
    slot_relations,
)

SLOTS = POSITION_NAMES  # one row of the table per slot
# The table's columns, each a class index with 0 meaning "no object in this slot".
HEADS = {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZE_NAMES}
HEAD_CLASSES = {name: len(values) + 1 for name, values in HEADS.items()}
ATTRIBUTES = ("shape", "colour", "size", "position")


def scene_table(objects: Sequence[dict]) -> torch.Tensor:
    """Objects ({shape, colour, size, position} dicts) -> long [slots, heads] with 0 where
    a slot is empty. Two objects in one slot is not a synthetic scene: ValueError."""
    table = torch.zeros(len(SLOTS), len(HEADS), dtype=torch.long)
    for obj in objects:
        slot = SLOTS.index(obj["position"])
        if table[slot, 0] != 0:
            raise ValueError(f"two objects at {obj['position']!r}: not a synthetic scene")
        for h, (name, values) in enumerate(HEADS.items()):
            table[slot, h] = values.index(obj[name]) + 1
    return table


def describe(table: torch.Tensor) -> str:
    """A table back to words, for reports: 'large red circle @left; small blue ring @top'."""
    parts = []
    for slot, row in zip(SLOTS, table.tolist(), strict=True):
        if row[0]:
            size = SIZE_NAMES[row[2] - 1] if row[2] else "?"
            colour = COLOUR_NAMES[row[1] - 1] if row[1] else "?"
            parts.append(f"{size} {colour} {SHAPES[row[0] - 1]} @{slot}")
    return "; ".join(parts) or "(nothing)"


def _scene(target) -> dict:
    """A caption (str) or a scene record / parse_caption dict -> {"objects", "relation"}."""
    if isinstance(target, str):
        return parse_caption(target)
    if isinstance(target, dict) and "objects" in target:
        return {"objects": target["objects"],
                "relation": target.get("relation", target.get("caption_relation"))}
    raise ValueError(f"expected a caption or a scene record with 'objects', got "
                     f"{type(target).__name__}")


def caption_scores(predicted: torch.Tensor, targets: Sequence) -> list[dict]:
    """Per caption: what the probe's table `predicted` [N, slots, heads] gets right.

    -> one dict per caption: {"objects": n, attribute: fraction of objects right (shape,
    colour, size, position), "relation": True / False / None (none stated), "extra": slots
    filled that the caption leaves empty, "whole": bool, "score": fraction of all checks
    right (for ranking samples)}."""
    if len(predicted) != len(targets):
        raise ValueError(f"{len(predicted)} predictions for {len(targets)} captions")
    out = []
    for table, target in zip(predicted.tolist(), targets, strict=True):
        scene = _scene(target)
        objects = scene["objects"]
        if not objects:
            raise ValueError(f"caption names no object: {target!r}")
        right = {a: 0 for a in ATTRIBUTES}
        for obj in objects:
            row = table[SLOTS.index(obj["position"])]
            right["position"] += row[0] != 0
            for h, (name, values) in enumerate(HEADS.items()):
                right[name] += row[h] == values.index(obj[name]) + 1
        mentioned = {obj["position"] for obj in objects}
        extra = sum(1 for slot, row in zip(SLOTS, table, strict=True)
                    if row[0] and slot not in mentioned)
        relation = None
        if scene["relation"] is not None:
            relation = _relation_right(table, objects, scene["relation"])
        checks = 4 * len(objects) + 1 + (relation is not None)
        passed = sum(right.values()) + (extra == 0) + bool(relation)
        whole = passed == checks
        out.append({"objects": len(objects), **{a: right[a] / len(objects) for a in right},
                    "relation": relation, "extra": extra, "whole": whole,
                    "score": passed / checks})
    return out


def _relation_right(table: list, objects: list[dict], relation: dict) -> bool:
    def seen_at(obj):  # the slots holding this object, wherever the caption puts it
        key = [values.index(obj[name]) + 1 for name, values in HEADS.items()]
        return [SLOTS[s] for s, row in enumerate(table) if row == key]

    subject, obj = seen_at(objects[relation["subject"]]), seen_at(objects[relation["object"]])
    if len(subject) != 1 or len(obj) != 1:
        return False
    return relation["relation"] in slot_relations(subject[0], obj[0])


def summarize(scores: Sequence[dict]) -> dict:
    """Per-caption scores -> accuracies: per attribute (over objects), relation (over
    captions stating one), whole caption, and the same split by the number of objects."""
    if not scores:
        raise ValueError("no captions to summarise")

    def group(rows):
        n_obj = sum(r["objects"] for r in rows)
        rel = [r["relation"] for r in rows if r["relation"] is not None]
        summary = {a: sum(r[a] * r["objects"] for r in rows) / n_obj for a in ATTRIBUTES}
        summary["relation"] = sum(rel) / len(rel) if rel else None
        summary["whole"] = sum(r["whole"] for r in rows) / len(rows)
        summary["count"] = len(rows)
        return summary

    out = group(scores)
    out["by_objects"] = {str(n): group([r for r in scores if r["objects"] == n])
                         for n in sorted({r["objects"] for r in scores})}
    return out


@torch.no_grad()
def caption_accuracy(probe, images: torch.Tensor, targets: Sequence,
                     batch_size: int = 256) -> dict:
    """How often `images` [N, 3, H, W] in [-1, 1] show what `targets` say (captions, or
    scene records / parse_caption dicts), judged by an AttributeProbe.

    -> summarize(...) plus "scores" (per caption, see caption_scores) and "predicted"
    (the probe's tables, long [N, slots, heads]).

    >>> acc = caption_accuracy(AttributeProbe.from_pretrained("runs/probe_shapes"),
    ...                        images, ["a large red circle on the left"])
    >>> acc["colour"], acc["whole"]
    """
    if len(images) != len(targets):
        raise ValueError(f"caption_accuracy: {len(images)} images for {len(targets)} captions")
    if len(images) == 0:
        raise ValueError("caption_accuracy: no images")
    predicted = torch.cat([probe.predict(images[i:i + batch_size]).cpu()
                           for i in range(0, len(images), batch_size)])
    scores = caption_scores(predicted, targets)
    return {**summarize(scores), "scores": scores, "predicted": predicted}
