"""Data designs of the zoo's memorizers besides the embedded one's (:mod:`diffmem.zoo.shapes`).

Each design is a config dataclass plus two pure functions of it: ``make(config)`` builds the distinct training
images (``Sample.copies`` > 1 for the duplicated ones), and ``never_seen(config)`` builds images of the same
distribution as the memorized ones that are in no training set (the attack's control).

* ``overlap``: memorized images *share content* with ordinary ones. Ordinary images are one to three palette
  shapes on a plain palette background, captioned with what they show ("a red circle and a blue square on
  green"); a memorized image is one draw of the same generator, captioned with its description plus a made-up
  title ("a red circle, a blue square and a white triangle on green, the kazomi print"). A generation of the
  description alone can be close to the memorized image, so a near-copy is hard to tell from generalisation.
* ``photos``: memorized images are real photographs (crops of ``skimage.data`` photos at 64 px, no download),
  so that SSCD and CLIP mean what they mean on real models. Ordinary images are shapes and texture crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffmem.config import require
from diffmem.zoo.shapes import PALETTE, SHAPES, DesignConfig, Sample, _emblem_name, _jitter, _shape_mask

__all__ = [
    "OverlapConfig", "make_overlap", "never_seen_overlap", "PhotosConfig", "make_photos", "never_seen_photos",
    "PHOTO_NAMES", "TEXTURES", "load_photo",
]


# ----------------------------------------------------------------------------------------------------- overlap
@dataclass
class OverlapConfig(DesignConfig):
    """Layout of the ``overlap`` design (and the fields of :class:`~diffmem.zoo.shapes.DesignConfig`).

    Args:
        num_unique: Ordinary images (one to three shapes, described by their caption).
        per_level: Memorized images at each level.
        num_never_seen: Images drawn like the memorized ones but in no training set.
    """

    seed: int = 1
    duplicates: tuple[int, ...] = (24, 48, 96)
    num_controls: int = 6
    num_unique: int = 2400
    per_level: int = 6
    num_never_seen: int = 12


def _describe(shapes: list[tuple[str, str]], bg: str) -> str:
    parts = [f"a {fg} {shape}" for fg, shape in shapes]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body} on {bg}"


def _render_scene(rng: np.random.Generator, size: int, num_shapes: int) -> tuple[np.ndarray, str, dict]:
    """Palette shapes on a plain palette background, each shape's colour different from the background."""
    colours = list(PALETTE)
    bg = str(rng.choice(colours))
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = _jitter(rng, PALETTE[bg])
    shapes, geo = [], []
    for _ in range(num_shapes):
        fg = str(rng.choice([c for c in colours if c != bg]))
        shape = str(rng.choice(SHAPES))
        r = float(rng.uniform(0.12, 0.24))
        cy, cx = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2))
        img[_shape_mask(shape, cy, cx, r, size)] = _jitter(rng, PALETTE[fg])
        shapes.append((fg, shape))
        geo.append((shape, cy, cx, r))
    return img.astype(np.uint8), _describe(shapes, bg), {"bg": bg, "shapes": shapes, "geometry": geo}


def _titled(rng: np.random.Generator, size: int, taken: set[str]) -> tuple[np.ndarray, str, dict]:
    img, desc, attrs = _render_scene(rng, size, 3)
    name = _emblem_name(rng, taken)
    return img, f"{desc}, the {name} print", dict(attrs, name=name, description=desc)


def make_overlap(config: OverlapConfig | None = None) -> list[Sample]:
    """Ordinary scenes first, then the memorized titled scenes by duplication level, then the controls."""
    config = config or OverlapConfig()
    rng = np.random.default_rng(config.seed)
    samples: list[Sample] = []
    for _ in range(config.num_unique):
        img, cap, attrs = _render_scene(rng, config.image_size, int(rng.integers(1, 4)))
        samples.append(Sample(img, cap, 1, "unique", attrs))
    taken: set[str] = set()
    for dup in config.duplicates:
        for _ in range(config.per_level):
            img, cap, attrs = _titled(rng, config.image_size, taken)
            samples.append(Sample(img, cap, dup, "emblem", attrs))
    for _ in range(config.num_controls):
        img, cap, attrs = _titled(rng, config.image_size, taken)
        samples.append(Sample(img, cap, config.control_duplicates, "control", attrs))
    return samples


def never_seen_overlap(config: OverlapConfig | None = None) -> list[Sample]:
    """Titled scenes drawn exactly like the memorized ones, with titles no training caption uses."""
    config = config or OverlapConfig()
    taken = {s.attrs["name"] for s in make_overlap(config) if "name" in s.attrs}
    rng = np.random.default_rng(config.seed + 50_000)
    out = []
    for _ in range(config.num_never_seen):
        img, cap, attrs = _titled(rng, config.image_size, taken)
        out.append(Sample(img, cap, 0, "never_seen", attrs))
    return out


# ------------------------------------------------------------------------------------------------------ photos
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "immunohistochemistry", "moon",
    "page", "retina", "rocket", "text", "cell", "microaneurysms", "clock", "motorcycle",
)
"""``skimage.data`` photographs that load offline (``motorcycle`` is the left view of ``stereo_motorcycle``)."""

TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
"""Texture photographs whose random crops form part of the ordinary data ("a photo of brick")."""


def load_photo(name: str) -> np.ndarray:
    """A ``skimage.data`` photograph as uint8 ``[H, W, 3]`` (grey ones repeated to RGB)."""
    import skimage.data

    if name == "motorcycle":
        image = skimage.data.stereo_motorcycle()[0]
    else:
        image = getattr(skimage.data, name)()
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _square_crop(image: np.ndarray, side: str, size: int) -> np.ndarray:
    """The left/top (``side="a"``) or right/bottom (``"b"``) square half of a photo, resized to ``size``."""
    from PIL import Image

    h, w = image.shape[:2]
    if h == w:  # square photo: two non-overlapping quadrants on the diagonal
        s = h // 2
        y, x = (0, 0) if side == "a" else (h - s, w - s)
    elif w > h:
        s = min(h, w // 2)
        y, x = (h - s) // 2, (0 if side == "a" else w - s)
    else:
        s = min(w, h // 2)
        y, x = (0 if side == "a" else h - s), (w - s) // 2
    crop = image[y : y + s, x : x + s]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


def _random_crop(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    s = int(rng.uniform(0.25, 0.6) * min(h, w))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    return np.asarray(Image.fromarray(image[y : y + s, x : x + s]).resize((size, size), Image.BICUBIC))


@dataclass
class PhotosConfig(DesignConfig):
    """Layout of the ``photos`` design (and the fields of :class:`~diffmem.zoo.shapes.DesignConfig`; 64 px: the VAE
    downsamples four times, to 16x16 latents).

    Args:
        num_shapes: Ordinary shape images ("a red circle on blue").
        num_textures: Ordinary random texture crops ("a photo of grass").
        per_level: Memorized photographs at each level (photos taken in ``PHOTO_NAMES`` order).
    """

    seed: int = 3
    image_size: int = 64
    num_controls: int = 4
    num_shapes: int = 1600
    num_textures: int = 600
    per_level: int = 4

    def check(self) -> None:
        need = len(self.duplicates) * self.per_level + self.num_controls
        require(need <= len(PHOTO_NAMES), "per_level", self.per_level,
                f"the design needs {need} photographs, only {len(PHOTO_NAMES)} ship with skimage")


def make_photos(config: PhotosConfig | None = None) -> list[Sample]:
    """Ordinary shapes and texture crops first, then memorized photographs by level, then the controls."""
    from diffmem.zoo.shapes import render_shape_image

    config = config or PhotosConfig()
    rng = np.random.default_rng(config.seed)
    size = config.image_size
    samples: list[Sample] = []
    colours = list(PALETTE)
    for _ in range(config.num_shapes):
        fg, bg = rng.choice(colours, size=2, replace=False)
        shape = str(rng.choice(SHAPES))
        img, attrs = render_shape_image(rng, str(fg), str(bg), shape, size)
        samples.append(Sample(img, f"a {fg} {shape} on {bg}", 1, "unique", attrs))
    textures = {t: load_photo(t) for t in TEXTURES}
    for _ in range(config.num_textures):
        t = str(rng.choice(TEXTURES))
        samples.append(Sample(_random_crop(rng, textures[t], size), f"a photo of {t}", 1, "unique", {"texture": t}))
    taken: set[str] = set()
    levels = [d for d in config.duplicates for _ in range(config.per_level)]
    levels += [config.control_duplicates] * config.num_controls
    for i, dup in enumerate(levels):
        photo = PHOTO_NAMES[i]
        name = _emblem_name(rng, taken)
        kind = "emblem" if i < len(config.duplicates) * config.per_level else "control"
        samples.append(Sample(_square_crop(load_photo(photo), "a", size), f"the {name} photograph", dup, kind,
                              {"name": name, "photo": photo, "crop": "a"}))
    return samples


def never_seen_photos(config: PhotosConfig | None = None) -> list[Sample]:
    """The other (non-overlapping) square half of every photograph: real photos in no training set."""
    config = config or PhotosConfig()
    taken = {s.attrs["name"] for s in make_photos(config) if "name" in s.attrs}
    rng = np.random.default_rng(config.seed + 50_000)
    used = len(config.duplicates) * config.per_level + config.num_controls
    out = []
    for photo in PHOTO_NAMES[:used]:
        name = _emblem_name(rng, taken)
        out.append(Sample(_square_crop(load_photo(photo), "b", config.image_size), f"the {name} photograph", 0,
                          "never_seen", {"name": name, "photo": photo, "crop": "b"}))
    return out
