"""Synthetic scenes: the vocabulary, the renderer and the caption grammar.

A scene holds 1 to 3 objects, each a (shape, colour, size) placed in one of five position
slots, drawn in order (later objects occlude earlier ones) on a plain or textured
background. Everything a caption says is exact: positions are slots, relations follow from
the slots, and the segmentation map is drawn with the very masks that paint the image.

Object colours are saturated and background colours nearly grey, so no background pixel
ever has an object's colour: a pixel's class can be read back from its colour.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Seg class of a shape = its index here + 1 (0 is background).
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "bar")
SHAPE_WORDS = {
    "circle": ("circle", "disk"),
    "square": ("square", "block"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus"),
    "ring": ("ring", "donut"),
    "bar": ("bar", "rectangle"),
}
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 210),
    "blue": (40, 70, 225),
    "purple": (140, 50, 190),
    "pink": (245, 120, 185),
}
SIZES = {"small": 0.11, "large": 0.18}  # radius as a fraction of the image side
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITIONS = {  # slot centres (x, y) as fractions of the side; y grows downwards
    "centre": (0.5, 0.5),
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
}
POSITION_WORDS = {
    "centre": ("in the centre", "in the middle", "in the center"),
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
}
RELATIONS = ("left of", "right of", "above", "below")
RELATION_WORDS = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# Near-grey, so that no background pixel can take an object colour (noise and stripes
# add the same offset to every channel, which keeps them near-grey).
BACKGROUND_COLOURS = (
    (128, 128, 128), (92, 92, 96), (170, 170, 168), (205, 200, 190),
    (112, 118, 128), (150, 142, 128), (64, 64, 70), (214, 214, 214),
)
BACKGROUNDS = ("plain", "stripes", "checks", "noise")
# (colour, shape) pairs that never appear in training scenes; every validation scene
# has at least one, so validation tests composition rather than memorisation.
HELD_OUT = (("red", "triangle"), ("blue", "ring"), ("green", "diamond"), ("yellow", "cross"))
MAX_OBJECTS = 3
JITTER = 0.03  # largest shift of an object centre from its slot centre

COLOUR_NAMES = tuple(COLOURS)
SIZE_NAMES = tuple(SIZES)
POSITION_NAMES = tuple(POSITIONS)
_COLOUR_RGB = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.uint8)
_BG_RGB = np.array(BACKGROUND_COLOURS, dtype=np.int16)
_HELD_OUT = frozenset(HELD_OUT)


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    x: float  # centre, fraction of the side
    y: float
    radius: float  # fraction of the side

    @property
    def seg_class(self) -> int:
        return SHAPES.index(self.shape) + 1


def slot_relations(a: str, b: str) -> list[str]:
    """Every relation that holds from slot `a` to slot `b` ("left of" means a is left of b)."""
    (ax, ay), (bx, by) = POSITIONS[a], POSITIONS[b]
    out = []
    if ax < bx:
        out.append("left of")
    if ax > bx:
        out.append("right of")
    if ay < by:
        out.append("above")
    if ay > by:
        out.append("below")
    return out


# ----------------------------------------------------------------------------- sampling


class Draws:
    """Uniform draws made in one numpy call and consumed in Python.

    A scene needs ~30 small random choices; one `rng.random` call per scene and plain
    float arithmetic is ~10x cheaper than one Generator call per choice.
    """

    def __init__(self, rng: np.random.Generator, n: int = 64):
        self._rng = rng
        self._u = rng.random(n).tolist()
        self._i = 0

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        if self._i == len(self._u):  # rare: long rejection loops
            self._u += self._rng.random(32).tolist()
        u = self._u[self._i]
        self._i += 1
        return lo + (hi - lo) * u

    def index(self, n: int) -> int:
        return min(int(self.uniform() * n), n - 1)

    def choice(self, options):
        return options[self.index(len(options))] if len(options) > 1 else options[0]

    def sample(self, n: int, k: int) -> list[int]:
        """k distinct integers from range(n), in random order."""
        pool = list(range(n))
        return [pool.pop(self.index(len(pool))) for _ in range(k)]


def sample_objects(d: Draws, held_out: bool) -> list[SceneObject]:
    """1..3 objects in distinct slots. `held_out`: the first object takes a held-out
    (colour, shape) pair; otherwise no object does."""
    n = 1 + d.index(MAX_OBJECTS)
    objects = []
    for i, slot in enumerate(d.sample(len(POSITION_NAMES), n)):
        if held_out and i == 0:
            colour, shape = d.choice(HELD_OUT)
        else:
            while True:  # rejection keeps the other pairs uniform
                colour, shape = d.choice(COLOUR_NAMES), d.choice(SHAPES)
                if held_out or (colour, shape) not in _HELD_OUT:
                    break
        size = d.choice(SIZE_NAMES)
        position = POSITION_NAMES[slot]
        cx, cy = POSITIONS[position]
        objects.append(SceneObject(
            shape, colour, size, position,
            round(cx + d.uniform(-JITTER, JITTER), 4), round(cy + d.uniform(-JITTER, JITTER), 4),
            SIZES[size]))
    return objects


def sample_background(d: Draws) -> dict:
    kind = d.choice(BACKGROUNDS)
    a, b = d.sample(len(BACKGROUND_COLOURS), 2)
    bg = {"kind": kind, "colour": a}
    if kind in ("stripes", "checks"):
        bg["colour2"] = b
        bg["period"] = d.choice((0.125, 0.25))  # fraction of the side
    if kind == "stripes":
        bg["orientation"] = d.choice(("horizontal", "vertical", "diagonal"))
    if kind == "noise":
        bg["amplitude"] = 8 + d.index(17)
        bg["offset"] = [d.uniform(), d.uniform()]  # window into the renderer's noise tile
    return bg


# ----------------------------------------------------------------------------- rendering


class Renderer:
    """Draws scenes at one resolution; holds the pixel grids so each draw only masks."""

    def __init__(self, size: int):
        self.size = size
        centres = (np.arange(size, dtype=np.float32) + 0.5) / size
        self._x = centres[None, :]  # [1, S]
        self._y = centres[:, None]  # [S, 1]
        self._rows, self._cols = np.indices((size, size))
        # One fixed noise field, twice the image side; a scene's noise is a window of it.
        self._noise = np.random.default_rng(0).uniform(-1, 1, (2 * size, 2 * size, 1))

    def background(self, bg: dict) -> np.ndarray:
        s = self.size
        base = _BG_RGB[bg["colour"]]
        kind = bg["kind"]
        if kind == "plain":
            return np.broadcast_to(base.astype(np.uint8), (s, s, 3)).copy()
        if kind == "noise":
            oy, ox = (int(o * s) for o in bg["offset"])
            noise = self._noise[oy:oy + s, ox:ox + s] * bg["amplitude"]
            return np.clip(base + noise.round(), 0, 255).astype(np.uint8)
        half = max(1, round(bg["period"] * s) // 2)  # width of one band or check
        if kind == "checks":
            on = (self._rows // half + self._cols // half) % 2
        else:
            coord = {"horizontal": self._rows, "vertical": self._cols,
                     "diagonal": self._rows + self._cols}[bg["orientation"]]
            on = (coord // half) % 2
        out = np.where(on[..., None].astype(bool), _BG_RGB[bg["colour2"]], base)
        return out.astype(np.uint8)

    def shape_mask(self, obj: SceneObject) -> tuple[slice, slice, np.ndarray]:
        """The object's pixels as (rows, cols, bool mask) inside its bounding box."""
        s = self.size
        r = obj.radius
        y0, y1 = max(0, int((obj.y - r) * s)), min(s, int((obj.y + r) * s) + 1)
        x0, x1 = max(0, int((obj.x - r) * s)), min(s, int((obj.x + r) * s) + 1)
        u = (self._x[:, x0:x1] - obj.x) / r  # [1, w]
        v = (self._y[y0:y1, :] - obj.y) / r  # [h, 1]
        au, av = np.abs(u), np.abs(v)
        shape = obj.shape
        if shape == "circle":
            m = u * u + v * v <= 1.0
        elif shape == "ring":
            d = u * u + v * v
            m = (d <= 1.0) & (d >= 0.3)
        elif shape == "square":
            m = (au <= 0.8) & (av <= 0.8)
        elif shape == "diamond":
            m = au + av <= 1.0
        elif shape == "triangle":  # apex up at v=-0.9, base at v=0.7, half-width 0.95
            m = (v <= 0.7) & (au <= (v + 0.9) * (0.95 / 1.6))
        elif shape == "cross":
            m = ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
        elif shape == "bar":
            m = (au <= 0.95) & (av <= 0.4)
        else:
            raise ValueError(f"unknown shape {shape!r}")
        return slice(y0, y1), slice(x0, x1), m  # every shape combines u and v: m is [h, w]

    def render(self, objects: list[SceneObject], bg: dict) -> tuple[np.ndarray, np.ndarray]:
        """-> (image uint8 [S, S, 3], seg uint8 [S, S]); later objects occlude earlier."""
        image = self.background(bg)
        seg = np.zeros((self.size, self.size), dtype=np.uint8)
        for obj in objects:
            rows, cols, m = self.shape_mask(obj)
            image[rows, cols][m] = _COLOUR_RGB[COLOUR_NAMES.index(obj.colour)]
            seg[rows, cols][m] = obj.seg_class
        return image, seg


# ----------------------------------------------------------------------------- captions


def _noun_phrase(d: Draws, obj: SceneObject, article: str) -> str:
    size, shape = d.choice(SIZE_WORDS[obj.size]), d.choice(SHAPE_WORDS[obj.shape])
    return f"{article} {size} {obj.colour} {shape}"


def make_caption(d: Draws, objects: list[SceneObject]) -> tuple[str, dict | None]:
    """A caption true of the scene: every object's size, colour, shape and position, in a
    random order and phrasing, and sometimes one relation between two objects.
    -> (caption, the relation it states or None)."""
    clauses = []
    for i in d.sample(len(objects), len(objects)):
        obj = objects[i]
        np_ = _noun_phrase(d, obj, d.choice(("a", "one")))
        pos = d.choice(POSITION_WORDS[obj.position])
        form = d.index(3)
        clauses.append(f"{np_} {pos}" if form == 0 else
                       f"{pos} is {np_}" if form == 1 else f"there is {np_} {pos}")
    if len(clauses) == 1:
        text = clauses[0]
    else:
        last = d.choice((" and ", ", and ", ", ") if len(clauses) == 3 else (" and ", ", "))
        text = ", ".join(clauses[:-1]) + last + clauses[-1]

    relation = None
    if len(objects) > 1 and d.uniform() < 0.6:
        i, j = d.sample(len(objects), 2)
        a, b = objects[i], objects[j]
        ident = [(o.size, o.colour, o.shape) for o in objects]
        if ident.count(ident[i]) == 1 and ident.count(ident[j]) == 1:  # unambiguous referents
            rel = d.choice(slot_relations(a.position, b.position))
            relation = {"subject": i, "relation": rel, "object": j}
            text += (f". {_noun_phrase(d, a, 'the')} is {d.choice(RELATION_WORDS[rel])} "
                     f"{_noun_phrase(d, b, 'the')}")
    return text, relation


def swap_shape(text: str, shape: str, new: str) -> str:
    """The caption with every word for `shape` (SHAPE_WORDS) replaced by `new`'s first
    word: the same scene text but another shape, e.g. to measure what the shape word is
    worth to a model. Other words are kept as written."""
    pattern = rf"\b(?:{_alternation({shape: SHAPE_WORDS[shape]})})\b"
    return re.sub(pattern, SHAPE_WORDS[new][0], text)


def permute_colours(text: str, perm: Sequence[int]) -> str:
    """The caption with each colour word COLOUR_NAMES[i] replaced by COLOUR_NAMES[perm[i]]
    (all at once: red -> blue and blue -> red swap). Other words are kept as written."""
    return _COLOUR_WORD.sub(lambda m: COLOUR_NAMES[perm[COLOUR_NAMES.index(m[1])]], text)


_COLOUR_WORD = re.compile(rf"\b({'|'.join(COLOUR_NAMES)})\b")


def _alternation(table: dict) -> str:
    words = sorted({w for ws in table.values() for w in ws}, key=len, reverse=True)
    return "|".join(re.escape(w) for w in words)


def _inverse(table: dict) -> dict:
    return {w: name for name, ws in table.items() for w in ws}


_NP = (rf"(?:a|one|the) ({_alternation(SIZE_WORDS)}) ({'|'.join(COLOUR_NAMES)}) "
       rf"({_alternation(SHAPE_WORDS)})")
_POS = rf"({_alternation(POSITION_WORDS)})"
_CLAUSE = re.compile(rf"^(?:{_NP} {_POS}|{_POS} is {_NP}|there is {_NP} {_POS})$")
_RELATION = re.compile(rf"^{_NP} is ({_alternation(RELATION_WORDS)}) {_NP}$")
_SIZE_OF, _SHAPE_OF = _inverse(SIZE_WORDS), _inverse(SHAPE_WORDS)
_POSITION_OF, _RELATION_OF = _inverse(POSITION_WORDS), _inverse(RELATION_WORDS)


def parse_caption(text: str) -> dict:
    """Invert the caption grammar: -> {"objects": [{shape, colour, size, position}, ...]
    in the order mentioned, "relation": {subject, relation, object} (indices into objects)
    or None}. Raises ValueError on text the grammar cannot produce."""
    main, _, rel_text = text.strip().lower().partition(". ")
    objects = []
    for clause in re.split(r", and |, | and ", main):
        m = _CLAUSE.match(clause)
        if not m:
            raise ValueError(f"not a scene clause: {clause!r}")
        g = [x for x in m.groups() if x is not None]  # size, colour, shape, position in order
        if g[0] in _POSITION_OF:  # "<pos> is <np>"
            g = g[1:] + g[:1]
        objects.append({"shape": _SHAPE_OF[g[2]], "colour": g[1], "size": _SIZE_OF[g[0]],
                        "position": _POSITION_OF[g[3]]})
    relation = None
    if rel_text:
        m = _RELATION.match(rel_text)
        if not m:
            raise ValueError(f"not a relation: {rel_text!r}")
        s1, c1, h1, rel, s2, c2, h2 = m.groups()

        def find(size, colour, shape):
            key = (_SIZE_OF[size], colour, _SHAPE_OF[shape])
            hits = [k for k, o in enumerate(objects)
                    if (o["size"], o["colour"], o["shape"]) == key]
            if len(hits) != 1:
                raise ValueError(f"relation refers to {' '.join(key)!r}, "
                                 f"which the caption names {len(hits)} times")
            return hits[0]

        relation = {"subject": find(s1, c1, h1), "relation": _RELATION_OF[rel],
                    "object": find(s2, c2, h2)}
    return {"objects": objects, "relation": relation}


# ----------------------------------------------------------------------------- whole scenes


def scene_record(objects: list[SceneObject], bg: dict, relation: dict | None) -> dict:
    """The json stored beside each image: exact attributes, relations and background."""
    return {
        "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position,
                     "x": o.x, "y": o.y, "radius": o.radius, "seg_class": o.seg_class}
                    for o in objects],
        "relations": [
            {"subject": i, "object": j, "relations": slot_relations(a.position, b.position)}
            for i, a in enumerate(objects) for j, b in enumerate(objects) if i < j
        ],
        "caption_relation": relation,
        "background": bg,
    }


def slot_layout(record: dict, renderer: Renderer) -> tuple[np.ndarray, np.ndarray]:
    """A scene record's objects drawn at their slots' centres, without the jitter that placed
    them in the image: -> (seg uint8 [S, S], colour uint8 [S, S]: 0 on the background, else
    1 + the index in COLOUR_NAMES). Later objects occlude earlier, as in `render`."""
    s = renderer.size
    seg, colour = np.zeros((s, s), np.uint8), np.zeros((s, s), np.uint8)
    for o in record["objects"]:
        cx, cy = POSITIONS[o["position"]]
        obj = SceneObject(o["shape"], o["colour"], o["size"], o["position"], cx, cy,
                          o["radius"])
        rows, cols, m = renderer.shape_mask(obj)
        seg[rows, cols][m] = obj.seg_class
        colour[rows, cols][m] = 1 + COLOUR_NAMES.index(obj.colour)
    return seg, colour


def sample_scene(rng: np.random.Generator, renderer: Renderer, held_out: bool):
    """-> (image uint8 [S,S,3], seg uint8 [S,S], caption str, record dict)."""
    d = Draws(rng)
    objects = sample_objects(d, held_out)
    bg = sample_background(d)
    image, seg = renderer.render(objects, bg)
    caption, relation = make_caption(d, objects)
    return image, seg, caption, scene_record(objects, bg, relation)
