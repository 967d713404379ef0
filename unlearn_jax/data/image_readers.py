"""Readers of user-given images: a folder of image files or a prepared TFDS split.

Both give RGB images that `fit_image` center-crops to the target aspect ratio
and resizes, as float32 [H, W, 3] in [-1, 1]; `sources.folder_latents` encodes
them with the VAE. TFDS datasets are only read, never downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TFDS_PREFIX = "tfds:"


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of a folder (not recursive), sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist. Fix: point forget.images / retain.images "
            "to a folder of .png/.jpg files, or leave it empty to use θ0's generations."
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"image folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def fit_image(image, height: int, width: int) -> np.ndarray:
    """A PIL image as RGB [H, W, 3] float32 in [-1, 1]: center crop to the aspect ratio, resize."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = min(w / width, h / height)
    cw, ch = round(width * scale), round(height * scale)
    left, top = (w - cw) // 2, (h - ch) // 2
    image = image.crop((left, top, left + cw, top + ch)).resize((width, height), Image.BICUBIC)
    return np.asarray(image, np.float32) / 127.5 - 1.0


def load_image(path: Path, height: int, width: int) -> np.ndarray:
    """An image file as RGB [H, W, 3] float32 in [-1, 1] (see `fit_image`)."""
    from PIL import Image

    with Image.open(path) as image:
        return fit_image(image, height, width)


def tfds_images(spec: str, count: int, image_key: str = "image") -> tuple[list[np.ndarray], dict]:
    """The first `count` images of a prepared TFDS split, in record order (never downloads).

    Args:
      spec: 'tfds:NAME[/CONFIG][:SPLIT]' (a dataset prepared under the TFDS data dir,
        `TFDS_DATA_DIR` or ~/tensorflow_datasets) or 'tfds:DIR[:SPLIT]' (a prepared
        dataset's version folder, e.g. .../unlearn_jax_world/small/1.0.0). SPLIT
        defaults to 'train'.
      count: how many examples; fewer in the split is an error.
    Returns:
      (uint8 [H, W, 3] arrays, what identifies them for the cache).
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"{spec!r} needs tensorflow-datasets: pip install 'unlearn_jax[tfds]', or give a "
            "folder of image files instead."
        ) from e
    name, _, split = spec[len(TFDS_PREFIX) :].partition(":")
    split = split or "train"
    if name.startswith("unlearn_jax_world"):
        from unlearn_jax.world.tfds_builder import builder_class

        builder_class()  # registers the embedded world's builder with TFDS
    try:
        if Path(name).expanduser().is_dir():
            builder = tfds.builder_from_directory(str(Path(name).expanduser()))
        else:
            builder = tfds.builder(name)
        if split not in builder.info.splits:
            known = ", ".join(builder.info.splits)
            raise ValueError(f"{spec!r}: no split {split!r}; the dataset has {known}")
        available = builder.info.splits[split].num_examples
        if available < count:
            raise ValueError(
                f"{spec!r} holds {available} examples in {split!r}, {count} are needed "
                "(prompts x images_per_prompt). Fix: lower images_per_prompt or use a bigger split."
            )
        if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:  # random access
            source = builder.as_data_source(split=split)
            images = [np.asarray(source[k][image_key]) for k in range(count)]
        else:  # tfrecord: read in order
            dataset = builder.as_dataset(split=f"{split}[:{count}]", shuffle_files=False)
            images = [np.asarray(example[image_key]) for example in tfds.as_numpy(dataset)]
    except (tfds.core.registered.DatasetNotFoundError, AssertionError) as e:
        raise FileNotFoundError(
            f"{spec!r} is not a prepared TFDS dataset ({e}). Fix: prepare it first "
            "(builder.download_and_prepare() on a machine that can), or give its version folder "
            "as tfds:DIR[:SPLIT]."
        ) from e
    identity = {"dataset": builder.info.full_name, "split": split, "count": count}
    return images, identity
