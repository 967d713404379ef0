"""Pretraining stages 1, 2 and 4 of the embedded default: evaluator, VAE, judged pipeline.

1. `train_classifier_stage`: the world evaluator (`world.classifier`),
   validated on the held-out split.
2. `train_vae_stage`: a KL-regularised autoencoder (`AutoencoderKL`, 32x32 ->
   8x8x4), loss L1 + MSE + L1 of image gradients (edges) + a small KL weight;
   its `scaling_factor` is set to 1/std of the training latents, as Stable
   Diffusion's 0.18215 was.
4. `evaluate_pipeline_stage`: the exported pipeline's prompt accuracy (DDIM,
   guidance) judged by the evaluator (`judge_generation`, also the probe of
   stage 3).

Stage 3 (UNet + text encoder) is `pretrain_diffusion`; `pretrain` runs them all.
Also here: what every stage shares, the `Log` callback type and `lr_schedule`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from unlearn_jax.models.pipeline import StableDiffusion, load_pipeline
from unlearn_jax.models.vae import AutoencoderKL
from unlearn_jax.world import classifier as world_classifier
from unlearn_jax.world import generator as world
from unlearn_jax.world.pretrain_export import save_component, vae_config

Log = Callable[[str], None]


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup, then cosine decay to 10% of the peak."""
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup_steps, cfg.steps, end_value=0.1 * cfg.lr
    )


def _world_images(seed: int, step: int, batch_size: int) -> world.WorldBatch:
    """Batch `step` of a stage's stream: fresh 'train' examples, never repeated."""
    return world.sample_world(batch_size, seed=seed, split="train", start=step * batch_size)


# ----------------------------------------------------------------------------- stage 1


def train_classifier_stage(config: ml_collections.ConfigDict, path: Path, log: Log) -> dict:
    """Trains, validates and saves the evaluator; returns held-out accuracies per head."""
    c = config.classifier
    model = world_classifier.train_world_classifier(
        steps=c.steps, batch_size=c.batch_size, lr=c.lr, seed=config.seed, log=log
    )
    held_out = world.sample_world(c.eval_examples, seed=config.seed, split="test")
    predicted = world_classifier.predict_attributes(held_out.images, model)
    truth = held_out.labels.attributes()
    accuracy = {k: float((predicted[k] == truth[k]).mean()) for k in predicted}
    log(f"classifier held-out accuracy: {accuracy}")
    world_classifier.save_world_classifier(model, path)
    return accuracy


# ----------------------------------------------------------------------------- stage 2


def _image_gradients(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Horizontal and vertical finite differences of NHWC images."""
    return x[:, :, 1:] - x[:, :, :-1], x[:, 1:] - x[:, :-1]


def _vae_loss(vae: AutoencoderKL, images: jax.Array, key: jax.Array, kl_weight: float):
    x = images * 2.0 - 1.0
    posterior = vae.encode(x)
    recon = vae.decode(posterior.sample(key))
    l1 = jnp.mean(jnp.abs(recon - x))
    # The squared term pulls hard on large (colour) errors early; the gradient
    # term on edges, which a pixel loss alone leaves blurred (a blurred small
    # square reads as a circle).
    mse = jnp.mean(jnp.square(recon - x))
    edges = sum(
        jnp.mean(jnp.abs(a - b))
        for a, b in zip(_image_gradients(recon), _image_gradients(x), strict=True)
    )
    kl = jnp.mean(posterior.kl()) / np.prod(posterior.mean.shape[1:])  # per latent element
    loss = l1 + mse + edges + kl_weight * kl
    return loss, {"l1": l1, "mse": mse, "edges": edges, "kl": kl}


@nnx.jit(static_argnums=(4,), donate_argnums=(0, 1))
def _vae_step(vae, optimizer, images, key, kl_weight):
    (loss, aux), grads = nnx.value_and_grad(_vae_loss, has_aux=True)(vae, images, key, kl_weight)
    optimizer.update(vae, grads)
    return loss, aux


@nnx.jit
def _vae_latents(vae: AutoencoderKL, images: jax.Array) -> jax.Array:
    return vae.encode(images * 2.0 - 1.0).mode()


def train_vae_stage(config: ml_collections.ConfigDict, folder: Path, log: Log) -> dict:
    """Trains the autoencoder on world images, calibrates `scaling_factor`, saves `folder`.

    Returns:
      {'l1': final reconstruction L1 on [-1, 1] images, 'scaling_factor': ...}.
    """
    c = config.vae
    vae = AutoencoderKL(vae_config(config), rngs=nnx.Rngs(config.seed))
    optimizer = nnx.Optimizer(vae, optax.adam(lr_schedule(c)), wrt=nnx.Param)
    key, seed = jax.random.key(config.seed + 1), config.seed + 2000
    start = time.time()
    for step in range(c.steps):
        images = jnp.asarray(_world_images(seed, step, c.batch_size).images)
        loss, aux = _vae_step(vae, optimizer, images, jax.random.fold_in(key, step), c.kl_weight)
        if step % c.log_every == 0 or step == c.steps - 1:
            log(
                f"vae step {step}: loss {float(loss):.4f} l1 {float(aux['l1']):.4f} "
                f"kl {float(aux['kl']):.3f} ({time.time() - start:.0f} s)"
            )
    # SD's recipe: scale latents to unit variance for the diffusion model.
    calib = jnp.asarray(_world_images(seed, c.steps, 1024).images)
    std = float(jnp.std(_vae_latents(vae, calib)))
    scaling_factor = float(f"{1.0 / std:.5g}")
    log(f"vae latent std {std:.4f} -> scaling_factor {scaling_factor}")
    save_component(vae, folder, "vae", vae_config(config, scaling_factor))
    return {"l1": float(aux["l1"]), "scaling_factor": scaling_factor}


# ----------------------------------------------------------------------------- stage 4


def judge_generation(
    pipe: StableDiffusion,
    config: ml_collections.ConfigDict,
    classifier: world_classifier.WorldClassifier,
    *,
    prompt_stride: int,
    per_prompt: int,
) -> dict[str, float]:
    """`world_classifier.generation_accuracy` on every `prompt_stride`-th world prompt."""
    e = config.eval
    return world_classifier.generation_accuracy(
        pipe,
        world.world_prompts()[::prompt_stride],
        per_prompt=per_prompt,
        classifier=classifier,
        steps=e.steps,
        guidance=e.guidance,
        seed=e.seed,
        batch_size=e.batch_size,
    )


def evaluate_pipeline_stage(
    config: ml_collections.ConfigDict, folder: Path, classifier_path: Path, log: Log
) -> dict:
    """Prompt accuracy of the exported (fp16) pipeline, as users will load it."""
    e = config.eval
    judged = judge_generation(
        load_pipeline(folder),
        config,
        world_classifier.load_world_classifier(classifier_path),
        prompt_stride=e.prompt_stride,
        per_prompt=e.per_prompt,
    )
    log(f"generation accuracy (every {e.prompt_stride}. prompt x {e.per_prompt}): {judged}")
    return judged
