"""The embedded world (`world.generator`) as a TensorFlow Datasets builder.

    from unlearn_jax.world.tfds_builder import world_builder
    builder = world_builder(data_dir="/tmp/tfds", num_train=50_000, num_test=10_000)
    builder.download_and_prepare()
    source = builder.as_data_source()["train"]   # random access; or builder.as_dataset(...)

Each example: 'image' uint8 [32, 32, 3], 'caption' text, 'labels'
{'shape', 'colour', 'size', 'background'} class labels, and the continuous
geometry 'center' float32 [2] (x, y pixels) and 'radius' float32. Splits:
'train' and 'test' are `world.sample_world(n, seed=seed, split=...)`, the
held-out split coming from a disjoint random stream (see `world.generator`).

Nothing is downloaded. tensorflow-datasets (and TensorFlow, which TFDS uses
to encode images) is imported only when a builder is made, so the rest of
unlearn_jax works without either installed. The builder class is created on
first use and registered with TFDS under the name `unlearn_jax_world`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from unlearn_jax.world import generator as world

_CHUNK = 256  # examples rendered per vectorised `world.sample_world` call
DEFAULT_SIZES = {"train": 50_000, "test": 10_000}


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "the world's TFDS builder needs tensorflow-datasets and tensorflow "
            "(pip install tensorflow-datasets tensorflow-cpu); the world itself "
            "(unlearn_jax.world.generator) needs neither."
        ) from e
    return tfds


@functools.cache
def builder_class() -> type:
    """The `tfds.core.GeneratorBasedBuilder` subclass, created (and registered) once."""
    tfds = _import_tfds()

    @dataclasses.dataclass
    class WorldConfig(tfds.core.BuilderConfig):
        """How many examples each split holds, and the world seed."""

        num_train: int = DEFAULT_SIZES["train"]
        num_test: int = DEFAULT_SIZES["test"]
        seed: int = 0

    class UnlearnJaxWorld(tfds.core.GeneratorBasedBuilder):
        """Procedural 32x32 captioned shapes: the embedded world of unlearn_jax."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "4 shapes x 4 colours x 2 sizes x 3 backgrounds."}
        BUILDER_CONFIGS = [
            WorldConfig(name="default", description="50k train, 10k test examples"),
            WorldConfig(name="small", num_train=2048, num_test=512, description="for tests"),
        ]

        def _info(self) -> Any:
            labels = {
                name: tfds.features.ClassLabel(names=list(values))
                for name, values in world.ATTRIBUTES.items()
            }
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(world.IMAGE_SIZE, world.IMAGE_SIZE, 3)),
                        "caption": tfds.features.Text(),
                        "labels": tfds.features.FeaturesDict(labels),
                        "center": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                        "radius": tfds.features.Scalar(dtype=np.float32),
                    }
                ),
                supervised_keys=("image", "caption"),
                # The examples are i.i.d. already; unshuffled, record i of a split is
                # `world.sample_world(1, split=split, start=i)`, for any reader.
                disable_shuffling=True,
                homepage="https://github.com/unlearn-jax/unlearn_jax",
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            del dl_manager  # procedural: nothing to download
            sizes = {"train": self.builder_config.num_train, "test": self.builder_config.num_test}
            return {split: self._generate_examples(split, n) for split, n in sizes.items()}

        def _generate_examples(self, split: str, num: int):
            seed = self.builder_config.seed
            for start in range(0, num, _CHUNK):
                batch = world.sample_world(
                    min(_CHUNK, num - start), seed=seed, split=split, start=start
                )
                images = world.to_uint8(batch.images)
                attributes = batch.labels.attributes()
                for i, caption in enumerate(batch.captions):
                    yield (
                        start + i,
                        {
                            "image": images[i],
                            "caption": caption,
                            "labels": {k: int(v[i]) for k, v in attributes.items()},
                            "center": batch.labels.center[i],
                            "radius": batch.labels.radius[i],
                        },
                    )

    UnlearnJaxWorld.WorldConfig = WorldConfig
    return UnlearnJaxWorld


def world_builder(
    data_dir: str | None = None,
    *,
    num_train: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
    file_format: str = "array_record",
) -> Any:
    """A builder instance; default sizes 50k/10k, or custom sizes under a config of their own.

    Args:
      data_dir: where TFDS writes the prepared dataset (TFDS default if None).
      num_train, num_test: examples per split (defaults: DEFAULT_SIZES).
      seed: the world seed.
      file_format: 'array_record' (default: random access through
        `builder.as_data_source()`, e.g. for grain) or 'tfrecord' (`as_dataset`).
    """
    cls = builder_class()
    num_train = DEFAULT_SIZES["train"] if num_train is None else num_train
    num_test = DEFAULT_SIZES["test"] if num_test is None else num_test
    if (num_train, num_test, seed) == (DEFAULT_SIZES["train"], DEFAULT_SIZES["test"], 0):
        return cls(config="default", data_dir=data_dir, file_format=file_format)
    # A config named by its contents: prepared data of other sizes never collide.
    config = cls.WorldConfig(
        name=f"n{num_train}_{num_test}_seed{seed}",
        num_train=num_train,
        num_test=num_test,
        seed=seed,
    )
    return cls(config=config, data_dir=data_dir, file_format=file_format)


def __getattr__(name: str) -> Any:
    # `from unlearn_jax.world.tfds_builder import UnlearnJaxWorld` creates the class lazily.
    if name == "UnlearnJaxWorld":
        return builder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
