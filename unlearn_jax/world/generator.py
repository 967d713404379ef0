"""The embedded world: procedurally generated, captioned 32x32 images of coloured shapes.

Every example is one shape on a plain background, described by four attributes
and a caption built from them:

    shape       circle | square | triangle | cross
    colour      red | green | blue | yellow
    size        small | large
    background  white | grey | black

    "a large red circle on a grey background"

(96 attribute combinations, hence 96 prompts). Within an example, the shape's
centre, its exact radius and a small jitter of both colours are continuous
random draws, so no two examples are the same image.

Determinism and splits: example `i` of split `s` is drawn from its own
generator `np.random.default_rng((seed, SPLIT_IDS[s], i))`, so any example can
be produced alone, in any order, and the result depends only on (seed, split,
i). The held-out split ("test") shares the attribute distribution with "train"
(every prompt appears in both) but comes from a disjoint random stream: it
holds fresh images of the same prompts, which is what the evaluators and the
generator are judged on. (Held-out *attribute combinations* would leave the
generator with prompts it never saw, which the unlearning demo must not have.)

Rendering is pure numpy and anti-aliased: shapes are drawn at 4x resolution
and box-filtered down, which keeps small shapes recognisable at 32x32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
BACKGROUNDS = ("white", "grey", "black")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "background": BACKGROUNDS,
}
SPLIT_IDS = {"train": 0, "test": 1}

# Base RGB values in [0, 255]; chosen so every colour differs from every
# background by > 90 levels in some channel (yellow on white: the blue channel).
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
}
BACKGROUND_RGB = {"white": (240, 240, 240), "grey": (128, 128, 128), "black": (20, 20, 20)}
COLOUR_JITTER = 12.0  # +- levels per channel, uniform
BACKGROUND_JITTER = 8.0
# Shape "radius" r in pixels; every shape's area grows as r^2 and the smallest
# large shape (triangle, r=10.5) covers ~1.4x the largest small one (circle,
# r=7.5). Small shapes span ~3.5 latent pixels of the 8x8 latent grid: at r~6
# a tiny latent diffusion model drew small squares as circles (57% right).
RADIUS_RANGE = {"small": (6.5, 7.5), "large": (10.5, 12.0)}
# Half-extent of each shape's bounding box in units of r (for placement).
_EXTENT = {"circle": 1.0, "square": 0.85, "triangle": 1.13, "cross": 1.0}
_SUPERSAMPLE = 4
_MARGIN = 1.0  # pixels kept free between a shape and the image border


@dataclasses.dataclass(frozen=True)
class WorldLabels:
    """The attributes of N examples (indices into SHAPES, COLOURS, ...) and their geometry.

    Attributes:
      shape, colour, size, background: int32 [N] indices into the attribute tuples.
      radius: float32 [N] shape radius r in pixels.
      center: float32 [N, 2] shape centre (x, y) in pixels, origin top-left.
      colour_rgb: float32 [N, 3] the shape's colour in [0, 1] (base colour + jitter).
      background_rgb: float32 [N, 3] the background colour in [0, 1].
    """

    shape: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    background: np.ndarray
    radius: np.ndarray
    center: np.ndarray
    colour_rgb: np.ndarray
    background_rgb: np.ndarray

    def __len__(self) -> int:
        return len(self.shape)

    def attributes(self) -> dict[str, np.ndarray]:
        """{'shape', 'colour', 'size', 'background'} -> int32 [N]."""
        return {name: getattr(self, name) for name in ATTRIBUTES}


@dataclasses.dataclass(frozen=True)
class WorldBatch:
    """N examples: images float32 [N, 32, 32, 3] in [0, 1], captions and labels."""

    images: np.ndarray
    captions: list[str]
    labels: WorldLabels


def caption_of(shape: int, colour: int, size: int, background: int) -> str:
    """The caption of one attribute combination, e.g. 'a large red circle on a grey background'."""
    return (
        f"a {SIZES[size]} {COLOURS[colour]} {SHAPES[shape]} on a {BACKGROUNDS[background]} "
        "background"
    )


def parse_caption(caption: str) -> dict[str, int]:
    """Inverse of `caption_of`: {'shape', 'colour', 'size', 'background'} -> index.

    Raises:
      ValueError: if the caption is not one of the world's captions.
    """
    words = caption.strip().lower().split()
    if len(words) != 8 or words[0] != "a" or words[4:6] != ["on", "a"] or words[7] != "background":
        raise ValueError(f"{caption!r} is not a caption of the embedded world")
    values = {"size": words[1], "colour": words[2], "shape": words[3], "background": words[6]}
    try:
        return {name: ATTRIBUTES[name].index(value) for name, value in values.items()}
    except ValueError as e:
        raise ValueError(f"{caption!r} is not a caption of the embedded world ({e})") from e


def world_prompts() -> list[str]:
    """All 96 captions, shape-major then colour, size, background (a fixed order)."""
    return [
        caption_of(s, c, z, b)
        for s in range(len(SHAPES))
        for c in range(len(COLOURS))
        for z in range(len(SIZES))
        for b in range(len(BACKGROUNDS))
    ]


def prompt_index(labels: WorldLabels) -> np.ndarray:
    """Each example's position in `world_prompts()`, int32 [N] (its caption's index)."""
    index = labels.shape
    for name in ("colour", "size", "background"):
        index = index * len(ATTRIBUTES[name]) + getattr(labels, name)
    return index.astype(np.int32)


def world_words() -> list[str]:
    """Every word that occurs in a caption (the tiny tokenizer's vocabulary)."""
    return sorted({word for prompt in world_prompts() for word in prompt.split()})


def forget_retain_prompts(concept: str) -> tuple[list[str], list[str]]:
    """Splits `world_prompts()` by an attribute value, e.g. 'circle' or 'red'.

    Returns:
      (prompts whose caption has the concept, all other prompts), each in world order.
    """
    if not any(concept in values for values in ATTRIBUTES.values()):
        known = ", ".join(v for values in ATTRIBUTES.values() for v in values)
        raise ValueError(f"{concept!r} is not an attribute value of the world; known: {known}")
    prompts = world_prompts()
    forget = [p for p in prompts if concept in p.split()]
    return forget, [p for p in prompts if concept not in p.split()]


def sample_labels(num: int, *, seed: int = 0, split: str = "train", start: int = 0) -> WorldLabels:
    """Draws the labels of examples start..start+num-1 of a split (see module docstring)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; the world has {', '.join(SPLIT_IDS)}")
    fields: dict[str, list] = {f.name: [] for f in dataclasses.fields(WorldLabels)}
    for index in range(start, start + num):
        rng = np.random.default_rng((seed, SPLIT_IDS[split], index))
        shape, colour, size, background = (
            int(rng.integers(len(values))) for values in ATTRIBUTES.values()
        )
        radius = rng.uniform(*RADIUS_RANGE[SIZES[size]])
        half = _EXTENT[SHAPES[shape]] * radius + _MARGIN
        center = rng.uniform(half, IMAGE_SIZE - half, size=2)
        colour_rgb = np.asarray(COLOUR_RGB[COLOURS[colour]]) + rng.uniform(
            -COLOUR_JITTER, COLOUR_JITTER, 3
        )
        background_rgb = np.asarray(BACKGROUND_RGB[BACKGROUNDS[background]]) + rng.uniform(
            -BACKGROUND_JITTER, BACKGROUND_JITTER, 3
        )
        for name, value in (
            ("shape", shape),
            ("colour", colour),
            ("size", size),
            ("background", background),
            ("radius", radius),
            ("center", center),
            ("colour_rgb", np.clip(colour_rgb, 0, 255) / 255.0),
            ("background_rgb", np.clip(background_rgb, 0, 255) / 255.0),
        ):
            fields[name].append(value)
    ints = {"shape", "colour", "size", "background"}
    return WorldLabels(
        **{
            k: np.asarray(v, np.int32 if k in ints else np.float32).reshape(
                (num, -1) if k in ("center", "colour_rgb", "background_rgb") else (num,)
            )
            for k, v in fields.items()
        }
    )


def shape_coverage(labels: WorldLabels) -> np.ndarray:
    """Anti-aliased shape masks: float32 [N, 32, 32], the covered fraction of each pixel."""
    n, ss = len(labels), _SUPERSAMPLE
    coords = (np.arange(IMAGE_SIZE * ss, dtype=np.float32) + 0.5) / ss  # subpixel centres
    dx = coords[None, None, :] - labels.center[:, 0, None, None]  # [N, 1, W]
    dy = coords[None, :, None] - labels.center[:, 1, None, None]  # [N, H, 1]
    r = labels.radius[:, None, None]
    inside = np.zeros((n, IMAGE_SIZE * ss, IMAGE_SIZE * ss), bool)
    for k, name in enumerate(SHAPES):
        rows = labels.shape == k
        if not rows.any():
            continue
        x, y, rk = dx[rows], dy[rows], r[rows]
        if name == "circle":
            mask = x**2 + y**2 <= rk**2
        elif name == "square":
            mask = np.maximum(np.abs(x), np.abs(y)) <= 0.85 * rk
        elif name == "triangle":
            # Equilateral, apex up, centred on its bounding box: apex (0, -0.75R),
            # base corners (+-0.866R, 0.75R), with R = 1.3r so its area ~ the others'.
            big_r = 1.3 * rk
            slope = np.sqrt(3.0)  # the sides rise 60 degrees
            mask = (y <= 0.75 * big_r) & (y >= -0.75 * big_r + slope * np.abs(x))
        else:  # cross: two bars of half-width 0.36r
            arm = 0.36 * rk
            mask = ((np.abs(x) <= rk) & (np.abs(y) <= arm)) | (
                (np.abs(y) <= rk) & (np.abs(x) <= arm)
            )
        inside[rows] = mask
    coverage = inside.reshape(n, IMAGE_SIZE, ss, IMAGE_SIZE, ss).mean(axis=(2, 4))
    return coverage.astype(np.float32)


def render(labels: WorldLabels) -> np.ndarray:
    """Images float32 [N, 32, 32, 3] in [0, 1]: background blended with the shape's colour."""
    alpha = shape_coverage(labels)[..., None]
    return (
        labels.background_rgb[:, None, None, :] * (1.0 - alpha)
        + labels.colour_rgb[:, None, None, :] * alpha
    ).astype(np.float32)


def sample_world(num: int, *, seed: int = 0, split: str = "train", start: int = 0) -> WorldBatch:
    """Examples start..start+num-1 of a split: images, captions and labels."""
    labels = sample_labels(num, seed=seed, split=split, start=start)
    captions = [caption_of(*(int(a[i]) for a in labels.attributes().values())) for i in range(num)]
    return WorldBatch(images=render(labels), captions=captions, labels=labels)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[..., 3] float images in [0, 1] -> uint8 (rounded), e.g. for PNG or TFDS."""
    return np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


def attribute_index(name: str, values: Sequence[str] | str) -> list[int]:
    """Indices of attribute values, e.g. attribute_index('shape', 'circle') -> [0]."""
    values = [values] if isinstance(values, str) else list(values)
    return [ATTRIBUTES[name].index(v) for v in values]
