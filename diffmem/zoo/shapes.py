"""A deterministic, procedurally generated text-to-image dataset with planted duplicates.

Two parts:

* a *generalizing* part: one shape of a named colour on a plain background of another named colour, with
  continuous position, size and colour jitter, captioned ``"a {fg} {shape} on {bg}"``; many images share a
  caption, so no single image can be memorized;
* a *memorized* part: distinctive "emblems" (a two-tone background split along a random line with three shapes
  in off-palette colours, a composition the first part never produces), each with its own made-up caption
  ``"the {name} emblem"`` and duplicated ``D`` times.

Everything is a pure function of a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from diffmem.config import DiffmemConfig
from diffmem.errors import ConfigError

__all__ = [
    "PALETTE",
    "SHAPES",
    "DesignConfig",
    "ShapesConfig",
    "Sample",
    "EmblemSpec",
    "render_shape_image",
    "make_dataset",
    "caption_words",
    "classify_foreground_colour",
]

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "orange": (250, 140, 20),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle")

_SYLLABLES = ("ka", "zo", "mi", "ru", "te", "vo", "li", "xa", "pe", "du", "ne", "ob", "qui", "ra", "so", "tu")


@dataclass
class DesignConfig(DiffmemConfig):
    """What the layout of every data design sets (each design's config adds its own fields).

    Args:
        seed: Master seed; the whole dataset is a function of it.
        image_size: Side of the square images in pixels.
        duplicates: Duplication counts of the memorized images, one entry per level.
        control_duplicates: Duplication count of the low-duplication images (the bottom of the
            replication-vs-duplication curve).
        num_controls: Number of low-duplication images.
    """

    seed: int = 0
    image_size: int = 32
    duplicates: tuple[int, ...] = (32, 64, 128)
    control_duplicates: int = 4
    num_controls: int = 8


@dataclass
class ShapesConfig(DesignConfig):
    """Layout of the ``shapes`` design (the embedded memorizer's): emblems over ordinary shape images.

    Args:
        num_unique: Images in the generalizing part.
        emblems_per_level: Emblems at each duplication level.
    """

    num_unique: int = 2400
    emblems_per_level: int = 8


@dataclass
class Sample:
    """One distinct training image and its caption (``copies`` > 1 for emblems)."""

    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    copies: int = 1
    kind: str = "unique"  # "unique" | "emblem" | "control"
    attrs: dict = field(default_factory=dict)


@dataclass
class EmblemSpec:
    name: str
    split_angle: float
    split_offset: float
    colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    shapes: list[tuple[str, float, float, float, tuple[int, int, int]]]


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return ys / size, xs / size


def _shape_mask(shape: str, cy: float, cx: float, r: float, size: int) -> np.ndarray:
    ys, xs = _coords(size)
    if shape == "circle":
        return (ys - cy) ** 2 + (xs - cx) ** 2 <= r**2
    if shape == "square":
        return (np.abs(ys - cy) <= r * 0.85) & (np.abs(xs - cx) <= r * 0.85)
    if shape == "triangle":
        top, bottom = cy - r, cy + r * 0.8
        half_width = (ys - top) / (bottom - top) * r
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half_width)
    raise ConfigError(f"unknown shape {shape!r}")


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: int = 15) -> np.ndarray:
    return np.clip(np.asarray(colour) + rng.integers(-amount, amount + 1, size=3), 0, 255)


def render_shape_image(
    rng: np.random.Generator, fg: str, bg: str, shape: str, size: int = 32
) -> tuple[np.ndarray, dict]:
    """Render one generalizing-part image with continuous position and size.

    Returns:
        The uint8 image and its attributes (including the continuous ones).
    """
    r = float(rng.uniform(0.16, 0.3))
    cy, cx = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2))
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = _jitter(rng, PALETTE[bg])
    img[_shape_mask(shape, cy, cx, r, size)] = _jitter(rng, PALETTE[fg])
    return img.astype(np.uint8), {"fg": fg, "bg": bg, "shape": shape, "cy": cy, "cx": cx, "r": r}


def _emblem_name(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(_SYLLABLES, size=3))
        if name not in taken:
            taken.add(name)
            return name


def _off_palette_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A colour at least 60 (L2) from every palette entry."""
    pal = np.asarray(list(PALETTE.values()), dtype=np.float32)
    while True:
        c = rng.integers(30, 226, size=3)
        if np.min(np.linalg.norm(pal - c, axis=1)) > 60:
            return tuple(int(v) for v in c)


def _render_emblem(rng: np.random.Generator, size: int, taken: set[str]) -> tuple[np.ndarray, EmblemSpec]:
    name = _emblem_name(rng, taken)
    angle = float(rng.uniform(0, math.pi))
    offset = float(rng.uniform(-0.15, 0.15))
    c1, c2 = _off_palette_colour(rng), _off_palette_colour(rng)
    while np.linalg.norm(np.subtract(c1, c2)) < 90:
        c2 = _off_palette_colour(rng)
    ys, xs = _coords(size)
    side = (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle) > offset
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = c1
    img[side] = c2
    shapes = []
    for _ in range(3):
        shape = str(rng.choice(SHAPES))
        r = float(rng.uniform(0.1, 0.18))
        cy, cx = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2))
        col = _off_palette_colour(rng)
        img[_shape_mask(shape, cy, cx, r, size)] = col
        shapes.append((shape, cy, cx, r, col))
    return img.astype(np.uint8), EmblemSpec(name, angle, offset, (c1, c2), shapes)


def make_dataset(config: ShapesConfig | None = None) -> list[Sample]:
    """Build the distinct training images (duplicates are expressed by ``Sample.copies``).

    Args:
        config: Dataset layout; defaults to ``ShapesConfig()``.

    Returns:
        Unique samples first, then the memorized emblems by duplication level, then the controls.
    """
    config = config or ShapesConfig()
    rng = np.random.default_rng(config.seed)
    colours = list(PALETTE)
    samples: list[Sample] = []
    for _ in range(config.num_unique):
        fg, bg = rng.choice(colours, size=2, replace=False)
        shape = str(rng.choice(SHAPES))
        img, attrs = render_shape_image(rng, str(fg), str(bg), shape, config.image_size)
        samples.append(Sample(img, f"a {fg} {shape} on {bg}", 1, "unique", attrs))
    taken: set[str] = set()
    for dup in config.duplicates:
        for _ in range(config.emblems_per_level):
            img, spec = _render_emblem(rng, config.image_size, taken)
            samples.append(Sample(img, f"the {spec.name} emblem", dup, "emblem", {"name": spec.name}))
    for _ in range(config.num_controls):
        img, spec = _render_emblem(rng, config.image_size, taken)
        samples.append(
            Sample(img, f"the {spec.name} emblem", config.control_duplicates, "control", {"name": spec.name})
        )
    return samples


def caption_words(samples: list[Sample]) -> list[str]:
    """All words used in the captions (for a word-level tokenizer vocabulary)."""
    return sorted({w for s in samples for w in s.caption.split()})


def classify_foreground_colour(image: np.ndarray) -> str | None:
    """Name the palette colour of the foreground of a plain-background image.

    The background colour is the median of the border pixels; foreground pixels are those far from it. The
    median foreground colour is matched to the nearest palette entry.

    Args:
        image: uint8 ``[H, W, 3]``.

    Returns:
        A palette colour name, or ``None`` when no foreground is found.
    """
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    fg_pixels = img[dist > 60]
    if len(fg_pixels) < max(4, image.shape[0] * image.shape[1] // 100):
        return None
    fg = np.median(fg_pixels, axis=0)
    names = list(PALETTE)
    pal = np.asarray([PALETTE[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(pal - fg, axis=1)))]
