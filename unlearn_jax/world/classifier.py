"""The embedded world's evaluator: a small CNN that reads shape, colour, size and background.

One Flax NNX network with a shared trunk and one linear head per attribute of
`unlearn_jax.world.generator`. It serves two metrics on the world:

- forget rates: `world_classifier(head)` is a `metrics.forget_rate.Classifier`
  (images [N,32,32,3] in [0,1] -> probabilities [N,K]);
- FID: `world_feature_fn()` returns the 128-d penultimate features, a feature
  extractor for `metrics.fid.fid_between_image_sets` on this world.

It is trained on fresh world images with light augmentation (blur, noise,
brightness) so that the slightly soft, slightly off-colour images a small
latent diffusion model decodes are judged like real ones. Shipped weights:
`embedded.classifier_weights_path()` (safetensors, PyTorch-style names via
`models.convert`, ~0.6 MB), produced by `python -m unlearn_jax.world.pretrain`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import load_file, save_file

from unlearn_jax.atomic_files import atomic_path
from unlearn_jax.diffusion.chunks import map_in_chunks
from unlearn_jax.models import convert
from unlearn_jax.models.abstract import abstract_module
from unlearn_jax.world import generator as world

HEADS: dict[str, int] = {name: len(values) for name, values in world.ATTRIBUTES.items()}
FEATURE_DIM = 128


class WorldClassifier(nnx.Module):
    """Conv trunk (32x32 -> 8x8), mean+max pooling, a 128-d embedding and 4 heads."""

    def __init__(self, *, rngs: nnx.Rngs, widths: Sequence[int] = (32, 64, 128)):
        w0, w1, w2 = widths
        conv = functools.partial(nnx.Conv, kernel_size=(3, 3), padding=1, rngs=rngs)
        self.conv0 = conv(3, w0)
        self.conv1 = conv(w0, w0, strides=2)  # 16x16
        self.conv2 = conv(w0, w1)
        self.conv3 = conv(w1, w1, strides=2)  # 8x8
        self.conv4 = conv(w1, w2)
        self.norms = nnx.List(
            [nnx.GroupNorm(c, num_groups=8, rngs=rngs) for c in (w0, w0, w1, w1, w2)]
        )
        self.embed = nnx.Linear(2 * w2, FEATURE_DIM, rngs=rngs)
        self.heads = nnx.Dict({k: nnx.Linear(FEATURE_DIM, n, rngs=rngs) for k, n in HEADS.items()})

    def features(self, images: jax.Array) -> jax.Array:
        """Images [N,32,32,3] in [0,1] -> penultimate features [N,128] (post-ReLU)."""
        x = images.astype(jnp.float32) * 2.0 - 1.0
        for conv, norm in zip(
            (self.conv0, self.conv1, self.conv2, self.conv3, self.conv4), self.norms
        ):
            x = jax.nn.relu(norm(conv(x)))
        # Max pooling as well as mean: a small shape barely moves the mean over a
        # large background, but it sets the max.
        pooled = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        return jax.nn.relu(self.embed(pooled))

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Images [N,32,32,3] in [0,1] -> {'shape': [N,4], 'colour': [N,4], ...} logits."""
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}


# ----------------------------------------------------------------------------- training


def _blur(images: jax.Array) -> jax.Array:
    """Separable [1, 2, 1] / 4 blur with edge padding, [N,H,W,C] -> same."""
    kernel = (0.25, 0.5, 0.25)
    h, w = images.shape[1:3]
    x = jnp.pad(images, ((0, 0), (1, 1), (0, 0), (0, 0)), mode="edge")
    x = sum(k * x[:, i : i + h] for i, k in enumerate(kernel))
    x = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)), mode="edge")
    return sum(k * x[:, :, i : i + w] for i, k in enumerate(kernel))


def augment(images: jax.Array, key: jax.Array) -> jax.Array:
    """Random blur (up to two passes), brightness/colour shift and noise; [N,H,W,3] -> same.

    Generated images are softer than the rendered ones (a small VAE decodes
    them): the blur teaches the evaluator that a softened square is still a
    square rather than its nearest blob, a circle.
    """
    n = images.shape[0]
    k_blur1, k_blur2, k_gain, k_bias, k_noise, k_sigma = jax.random.split(key, 6)
    x = images
    for k in (k_blur1, k_blur2):
        mix = jax.random.uniform(k, (n, 1, 1, 1))
        x = (1 - mix) * x + mix * _blur(x)
    gain = jax.random.uniform(k_gain, (n, 1, 1, 1), minval=0.9, maxval=1.1)
    bias = jax.random.uniform(k_bias, (n, 1, 1, 3), minval=-0.04, maxval=0.04)
    sigma = jax.random.uniform(k_sigma, (n, 1, 1, 1), maxval=0.04)
    x = gain * x + bias + sigma * jax.random.normal(k_noise, x.shape)
    return jnp.clip(x, 0.0, 1.0)


def _loss(model: WorldClassifier, images: jax.Array, labels: dict[str, jax.Array]):
    logits = model(images)
    losses = {
        k: optax.softmax_cross_entropy_with_integer_labels(logits[k], labels[k]).mean()
        for k in HEADS
    }
    return sum(losses.values()), losses


@nnx.jit(donate_argnums=(0, 1))
def _train_step(model, optimizer, images, labels, key):
    grads_fn = nnx.value_and_grad(_loss, has_aux=True)
    (loss, losses), grads = grads_fn(model, augment(images, key), labels)
    optimizer.update(model, grads)
    return loss, losses


def train_world_classifier(
    *,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 200,
    log: Callable[[str], None] = print,
) -> WorldClassifier:
    """Trains the evaluator on fresh 'train' examples (world seed `seed + 1000`).

    Adam with linear warmup and cosine decay; every step sees new images, so
    there is nothing to overfit to. Returns the trained module.
    """
    model = WorldClassifier(rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps)
    optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
    key = jax.random.key(seed)
    start = time.time()
    for step in range(steps):
        batch = world.sample_world(
            batch_size, seed=seed + 1000, split="train", start=step * batch_size
        )
        labels = {k: jnp.asarray(v) for k, v in batch.labels.attributes().items()}
        loss, _ = _train_step(
            model, optimizer, jnp.asarray(batch.images), labels, jax.random.fold_in(key, step)
        )
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"classifier step {step}: loss {float(loss):.4f} ({time.time() - start:.0f} s)")
    return model


# ----------------------------------------------------------------------------- inference


@nnx.jit
def _predict(model: WorldClassifier, images: jax.Array) -> dict[str, jax.Array]:
    return {k: jax.nn.softmax(v, axis=-1) for k, v in model(images).items()}


@nnx.jit
def _features(model: WorldClassifier, images: jax.Array) -> jax.Array:
    return model.features(images)


def _batched(fn: Callable, images: np.ndarray, batch_size: int):
    """Runs `fn` over fixed-size chunks (the last padded), so jit compiles once.

    Fewer images than `batch_size` make one chunk of their own size: padding 18
    evaluation images to 256 cost more than the classifier itself.
    """
    return map_in_chunks(fn, np.asarray(images, np.float32), size=batch_size)


def predict_probabilities(
    images: np.ndarray, model: WorldClassifier | None = None, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Images [N,32,32,3] in [0,1] -> {'shape': [N,4], 'colour': [N,4], 'size': [N,2], ...}."""
    model = load_world_classifier() if model is None else model
    return _batched(lambda x: _predict(model, jnp.asarray(x)), images, batch_size)


def predict_attributes(
    images: np.ndarray, model: WorldClassifier | None = None, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Images [N,32,32,3] -> {'shape', 'colour', 'size', 'background'} -> int [N] (argmax)."""
    probs = predict_probabilities(images, model, batch_size)
    return {k: np.argmax(v, axis=-1) for k, v in probs.items()}


def world_classifier(
    head: str = "shape", model: WorldClassifier | None = None, batch_size: int = 256
) -> Callable[[np.ndarray], np.ndarray]:
    """A `forget_rate.Classifier` for one attribute: images [N,32,32,3] -> probs [N,K]."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; the world classifier has {', '.join(HEADS)}")
    model = load_world_classifier() if model is None else model
    return lambda images: predict_probabilities(images, model, batch_size)[head]


def world_feature_fn(
    model: WorldClassifier | None = None, batch_size: int = 256
) -> Callable[[np.ndarray], np.ndarray]:
    """FID feature extractor of the world: images [N,32,32,3] in [0,1] -> [N,128] float32."""
    model = load_world_classifier() if model is None else model
    return lambda images: _batched(lambda x: _features(model, jnp.asarray(x)), images, batch_size)


def prompt_accuracy(
    images: np.ndarray,
    prompts: Sequence[str],
    model: WorldClassifier | None = None,
    attributes: Sequence[str] = ("shape", "colour"),
) -> dict[str, float]:
    """How often generations show what their world prompt asked for.

    Args:
      images: [N,32,32,3] in [0,1], generated from `prompts` (one prompt per image).
      prompts: N world captions (see `world.parse_caption`).
      attributes: those that must all match for 'accuracy'.
    Returns:
      {'accuracy': share with all `attributes` right, '<attribute>': share per attribute}.
    """
    predicted = predict_attributes(images, model)
    wanted = [world.parse_caption(p) for p in prompts]
    hits = {k: np.array([w[k] for w in wanted]) == predicted[k] for k in HEADS}
    out = {k: float(v.mean()) for k, v in hits.items()}
    out["accuracy"] = float(np.logical_and.reduce([hits[k] for k in attributes]).mean())
    return out


def generation_accuracy(
    pipe: Any,
    prompts: Sequence[str],
    *,
    per_prompt: int = 8,
    classifier: WorldClassifier | None = None,
    steps: int = 25,
    guidance: float = 4.0,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Generates `per_prompt` images per world prompt and judges them (`prompt_accuracy`).

    Args:
      pipe: a loaded `models.pipeline.StableDiffusion` of the world (e.g. the
        embedded model); DDIM with `steps` and `guidance`, noise from `seed`.
    Returns:
      `prompt_accuracy`'s shares (4 decimals), plus 'images' and 'seconds'.
    """
    from unlearn_jax.diffusion.text_to_image import generate

    start = time.time()
    images = generate(
        pipe,
        list(prompts),
        num_images_per_prompt=per_prompt,
        steps=steps,
        guidance=guidance,
        seed=seed,
        batch_size=batch_size,
        progress=False,
    )
    repeated = [p for p in prompts for _ in range(per_prompt)]
    judged = {k: round(v, 4) for k, v in prompt_accuracy(images, repeated, classifier).items()}
    return {**judged, "images": len(images), "seconds": round(time.time() - start, 1)}


# ----------------------------------------------------------------------------- weights


def save_world_classifier(model: WorldClassifier, path: str | Path) -> Path:
    """Writes the parameters as float32 safetensors (PyTorch-style key names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(convert.to_torch_state(model, np.float32), str(tmp), metadata={"format": "pt"})
    return path


def load_world_classifier(path: str | Path | None = None) -> WorldClassifier:
    """The evaluator with weights from `path` (default: the ones shipped with the package)."""
    if path is None:
        from unlearn_jax.world.embedded import classifier_weights_path

        path = classifier_weights_path()
    return _load_cached(str(Path(path).resolve()))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> WorldClassifier:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"world classifier weights {path} are missing. Fix: reinstall unlearn_jax, or "
            "train them with `python -m unlearn_jax.world.pretrain "
            "--config configs/pretrain_world.py`."
        )
    model = abstract_module(lambda rngs: WorldClassifier(rngs=rngs))
    convert.load_torch_state(model, load_file(path), source=f"weights in {path}")
    return model
