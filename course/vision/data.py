"""Generated scenes of coloured shapes, exact masks and captions: vision data with no download.

Every scene is drawn from a seed (numpy's PCG64 `default_rng(seed)`), so the same call gives the same
pixels on every machine. A scene holds a few objects; an object is a shape (circle, square, triangle,
diamond) of one colour (red, green, blue, yellow, cyan). Some objects are NESTED: an inner shape drawn
inside an outer one, so a click on the inner shape is genuinely ambiguous (the inner shape, or the
whole outer object) -- the case SAM's three masks are for (Kirillov et al. 2023, section 3).

Stable API (used by course.vision.vit, clip and sam):
- COLOURS, SHAPES: names; PAIRS: every (colour, shape); HELD_OUT: 4 pairs never drawn in the "train"
  split (one per shape, each with a different colour, so every colour and every shape is still seen in
  training: zero-shot must compose them); TRAIN_PAIRS: the rest. SPLITS = ("train", "heldout", "all").
- `shape_mask(shape, cx, cy, r, size) -> (size, size) bool`: the exact pixel set of one shape.
- `Scene`: image (3, H, W) float32 in [0, 1]; masks (K, H, W) bool, the WHOLE object k (an outer
  object's mask includes its inner one); parent (K,) long, the index of the object k lies inside or -1;
  shapes, colours (K lists of names); caption (str). Properties: `visible` (K, H, W) bool, the pixels
  showing object k's own colour; `boxes` (K, 4) float32 (x0, y0, x1, y1), the masks' tight boxes in
  pixel-edge coordinates; `children(k)`.
- `make_scene(rng, size, ...)`, `make_scenes(n, seed, size, ...) -> list[Scene]`,
  `stack_images(scenes) -> (N, 3, H, W)`.
- `caption_data(n, seed, size, split, nest_prob) -> CaptionData`: one top-level object per image
  (nested with probability nest_prob), for CLIP: images (N, 3, H, W), captions, labels (N,) = index in
  PAIRS of the outermost object.
- `WordTokenizer`: the closed caption vocabulary; `encode(captions) -> (N, L) long`, 0 = [PAD].

Coordinates: a point is (x, y) in pixels, x along the width (column), y along the height (row); pixel
(row i, column j) covers [j, j+1) x [i, i+1) and its centre is (j + 0.5, i + 0.5). SAM's convention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.15), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.1), "cyan": (0.1, 0.85, 0.9)}
SHAPES = ("circle", "square", "triangle", "diamond")
PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
HELD_OUT = (("red", "triangle"), ("green", "diamond"), ("blue", "circle"), ("yellow", "square"))
TRAIN_PAIRS = tuple(p for p in PAIRS if p not in HELD_OUT)
SPLITS = ("train", "heldout", "all")
MIN_SIZE = 16
# extent of each shape in units of its size parameter r: inradius (largest centred circle inside it)
# and circumradius (smallest centred circle around it); used to nest and to keep objects apart.
_INRADIUS = {"circle": 1.0, "square": 0.8, "triangle": 0.625, "diamond": 1.1 / math.sqrt(2)}
_CIRCUMRADIUS = {"circle": 1.0, "square": 0.8 * math.sqrt(2), "triangle": 1.25, "diamond": 1.1}


def _check_int(name, value, low):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_prob(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _pairs(split: str):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return {"train": TRAIN_PAIRS, "heldout": HELD_OUT, "all": PAIRS}[split]


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """(size, size) bool: pixels whose centre lies in `shape` centred at (cx, cy) with size parameter r."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if not r > 0:
        raise ValueError(f"r must be > 0, got {r!r}")
    y, x = np.mgrid[0:size, 0:size] + 0.5  # pixel centres, (size, size) each
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    R = 1.25 * r  # triangle: equilateral, apex up, circumradius R; three half-planes
    s3 = math.sqrt(3)
    return (dy <= R / 2) & (s3 * dx - dy <= R) & (-s3 * dx - dy <= R)


@dataclass
class Scene:
    image: torch.Tensor  # (3, H, W) float32 in [0, 1]
    masks: torch.Tensor  # (K, H, W) bool: whole objects (outer includes inner)
    parent: torch.Tensor  # (K,) long: index of the enclosing object, -1 for top-level
    shapes: list[str] = field(default_factory=list)
    colours: list[str] = field(default_factory=list)
    caption: str = ""

    @property
    def visible(self) -> torch.Tensor:
        """(K, H, W) bool: pixels of object k not covered by an object nested in it."""
        vis = self.masks.clone()
        for k, p in enumerate(self.parent.tolist()):
            if p >= 0:
                vis[p] &= ~self.masks[k]
        return vis

    @property
    def boxes(self) -> torch.Tensor:
        """(K, 4) float32 (x0, y0, x1, y1): each mask's tight box, in pixel-edge coordinates."""
        out = torch.zeros(len(self.masks), 4)
        for k, m in enumerate(self.masks):
            rows, cols = m.any(1).nonzero()[:, 0], m.any(0).nonzero()[:, 0]
            out[k] = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
        return out

    def children(self, k: int) -> list[int]:
        return [j for j, p in enumerate(self.parent.tolist()) if p == k]


def _describe(k: int, shapes, colours, parent) -> str:
    text = f"a {colours[k]} {shapes[k]}"
    inner = [j for j, p in enumerate(parent) if p == k]
    return f"{_describe(inner[0], shapes, colours, parent)} inside {text}" if inner else text


def caption_of(shapes, colours, parent, centres_x) -> str:
    """'a red circle inside a blue square and a green triangle': top-level objects left to right."""
    top = sorted((k for k, p in enumerate(parent) if p < 0), key=lambda k: centres_x[k])
    return " and ".join(_describe(k, shapes, colours, parent) for k in top)


def make_scene(rng: np.random.Generator, size: int = 32, n_objects: int = 2, nest_prob: float = 0.5,
               split: str = "train", noise: float = 0.02, radius: tuple | None = None) -> Scene:
    """One scene with up to n_objects top-level objects (fewer if they do not fit apart), each holding a
    nested inner object with probability nest_prob. Objects do not overlap unless nested. radius: (lo, hi)
    range of the size parameter r as a fraction of the image side (default (0.12, 0.26), nested outer
    objects (0.24, 0.32)); at most 0.38, so that every shape fits inside the image."""
    size = _check_int("size", size, MIN_SIZE)
    n_objects = _check_int("n_objects", n_objects, 1)
    nest_prob = _check_prob("nest_prob", nest_prob)
    if not isinstance(noise, (int, float)) or not 0.0 <= noise <= 0.5:
        raise ValueError(f"noise must be a number in [0, 0.5] (std of added pixel noise), got {noise!r}")
    pairs = _pairs(split)
    if radius is not None and not (isinstance(radius, (tuple, list)) and len(radius) == 2
                                   and all(isinstance(v, (int, float)) for v in radius) and 0 < radius[0] <= radius[1] <= 0.38):
        raise ValueError(f"radius must be (lo, hi) with 0 < lo <= hi <= 0.38 (fractions of the image side), got {radius!r}")
    placed, shapes, colours, parent, masks = [], [], [], [], []  # placed: (cx, cy, circumradius)
    for _ in range(n_objects):
        nest = rng.random() < nest_prob
        colour, shape = pairs[rng.integers(len(pairs))]
        lo, hi = radius or ((0.24, 0.32) if nest else (0.12, 0.26))  # r as a fraction of the image side
        for _try in range(30):
            r = rng.uniform(lo, hi) * size
            ext = _CIRCUMRADIUS[shape] * r
            cx, cy = rng.uniform(ext, size - ext, 2)  # ext <= 0.38 * 1.25 * size < size / 2
            if all(math.hypot(cx - px, cy - py) >= ext + pe + 1 for px, py, pe in placed):
                break
        else:
            continue  # no room left for this object
        placed.append((cx, cy, ext))
        k = len(shapes)
        shapes.append(shape), colours.append(colour), parent.append(-1)
        masks.append(shape_mask(shape, cx, cy, r, size))
        if nest:
            options = [p for p in pairs if p[0] != colour]  # an inner object of another colour
            c2, s2 = options[rng.integers(len(options))]
            r2 = r * _INRADIUS[shape] * rng.uniform(0.5, 0.6) / _CIRCUMRADIUS[s2]
            inner = shape_mask(s2, cx, cy, r2, size)
            if inner.sum() >= 4 and not (inner & ~masks[k]).any():
                shapes.append(s2), colours.append(c2), parent.append(k)
                masks.append(inner)
    image = np.zeros((3, size, size))
    for k in range(len(shapes)):  # parents come before their children, so inner objects are drawn on top
        image[:, masks[k]] = np.array(COLOURS[colours[k]])[:, None]
    if noise > 0:
        image = np.clip(image + rng.normal(0.0, noise, image.shape), 0.0, 1.0)
    caption = caption_of(shapes, colours, parent, _centres_x(masks))
    return Scene(torch.tensor(image, dtype=torch.float32), torch.tensor(np.array(masks)).reshape(-1, size, size),
                 torch.tensor(parent, dtype=torch.long), shapes, colours, caption)


def _centres_x(masks) -> list[float]:
    return [float(np.nonzero(m)[1].mean()) for m in masks]


def make_scenes(n: int, seed: int = 0, size: int = 32, max_objects: int = 3, nest_prob: float = 0.5,
                split: str = "train", noise: float = 0.02) -> list[Scene]:
    """n scenes, each with 1..max_objects top-level objects, deterministic from seed."""
    n = _check_int("n", n, 1)
    max_objects = _check_int("max_objects", max_objects, 1)
    rng = np.random.default_rng(_check_int("seed", seed, 0))
    return [make_scene(rng, size, int(rng.integers(1, max_objects + 1)), nest_prob, split, noise) for _ in range(n)]


def stack_images(scenes: list[Scene]) -> torch.Tensor:
    """(N, 3, H, W) float32 from a list of scenes of one size."""
    if not scenes:
        raise ValueError("stack_images needs at least one scene, got an empty list")
    return torch.stack([s.image for s in scenes])


@dataclass
class CaptionData:
    images: torch.Tensor  # (N, 3, H, W)
    captions: list[str]
    labels: torch.Tensor  # (N,) long: index in PAIRS of the outermost object
    scenes: list[Scene]


def caption_data(n: int, seed: int = 0, size: int = 32, split: str = "train", nest_prob: float = 0.5,
                 noise: float = 0.02, radius: tuple = (0.25, 0.38)) -> CaptionData:
    """Image-caption pairs for CLIP: one large top-level object per image, nested with probability nest_prob."""
    n = _check_int("n", n, 1)
    rng = np.random.default_rng(_check_int("seed", seed, 0))
    scenes = [make_scene(rng, size, 1, nest_prob, split, noise, radius) for _ in range(n)]
    labels = torch.tensor([PAIRS.index((s.colours[0], s.shapes[0])) for s in scenes])
    return CaptionData(stack_images(scenes), [s.caption for s in scenes], labels, scenes)


def prompt(colour: str, shape: str) -> str:
    """The zero-shot prompt of one class: 'a red circle' (the captions' own phrasing)."""
    return f"a {colour} {shape}"


class WordTokenizer:
    """Whole-word ids over the closed caption vocabulary: 0 = [PAD], 1 = [EOS] (appended to each caption)."""

    def __init__(self):
        self.words = ["[PAD]", "[EOS]", "a", "inside", "and", *COLOURS, *SHAPES]
        self.ids = {w: i for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, captions: list[str], length: int | None = None) -> torch.Tensor:
        """(N, L) long: word ids then [EOS], padded with 0 to L (default: the longest caption + 1)."""
        if isinstance(captions, str):
            raise ValueError("captions must be a list of strings, got one string; wrap it in a list")
        rows = []
        for c in captions:
            unknown = [w for w in c.split() if w not in self.ids]
            if unknown:
                raise ValueError(f"caption {c!r} has words outside the vocabulary: {unknown}; known: {self.words[2:]}")
            rows.append([self.ids[w] for w in c.split()] + [1])
        if not rows:
            raise ValueError("captions is empty: need at least one caption")
        L = max(map(len, rows)) if length is None else length
        if L < max(map(len, rows)):
            raise ValueError(f"length={L} is shorter than the longest caption ({max(map(len, rows))} tokens with [EOS])")
        return torch.tensor([r + [0] * (L - len(r)) for r in rows], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [" ".join(self.words[i] for i in row.tolist() if i > 1) for row in ids]
