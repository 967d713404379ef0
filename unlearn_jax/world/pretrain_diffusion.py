"""Pretraining stage 3 of the embedded default: the UNet and CLIP text encoder, jointly.

`train_unet_stage` trains a UNet and a 2-layer CLIP text encoder with the
epsilon-prediction denoising loss (`diffusion.forward`, Min-SNR-weighted:
`min_snr_denoising_loss`) on SD's scaled-linear 1000-step schedule, on a bank
of VAE posteriors of fresh world images (`encode_latent_bank`), with a share
of captions (`train.caption_dropout`) dropped to the empty prompt so that
classifier-free guidance works.
EMA weights are saved; an optional probe (a quick generation accuracy) is
logged every `train.probe_every` steps.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from unlearn_jax.diffusion.forward import (
    DiffusionModel,
    add_noise,
    prediction_target,
    sample_timesteps_and_noise,
)
from unlearn_jax.diffusion.schedule import schedule_from_config
from unlearn_jax.models.clip import CLIPTextModel
from unlearn_jax.models.unet import UNet2DConditionModel
from unlearn_jax.models.vae import AutoencoderKL
from unlearn_jax.world import generator as world
from unlearn_jax.world.pretrain_export import save_component
from unlearn_jax.world.pretrain_stages import Log, lr_schedule


def min_snr_denoising_loss(
    model: DiffusionModel,
    params,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    min_snr_gamma: float,
) -> jax.Array:
    """`diffusion.forward.denoising_loss` with Min-SNR-gamma weights (Hang et al., 2023).

    Each example's squared error (mean over its elements) is weighted by
    min(SNR_t, gamma) / SNR_t for epsilon targets: the many nearly-clean
    timesteps, whose targets are easy and whose gradients fight the noisy ones,
    count less, which converges several times faster. gamma <= 0: plain loss.

    Args:
      batch: 'x0' [B,h,w,C] clean latents, 'context' [B,L,D] text embeddings.
    Returns:
      The scalar loss (same timesteps and noise as `denoising_loss` for this rng).
    """
    x0 = batch["x0"]
    t, eps = sample_timesteps_and_noise(rng, x0, model.num_timesteps)
    prediction = model.apply_fn(params, add_noise(model, x0, eps, t), t, batch["context"])
    target = prediction_target(model, x0, eps, t)
    per_example = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=(1, 2, 3))
    if min_snr_gamma <= 0:
        return jnp.mean(per_example)
    acp = model.alphas_cumprod[t]
    snr = acp / (1.0 - acp)
    weight = jnp.minimum(snr, min_snr_gamma) / snr
    if model.prediction_type == "v_prediction":
        weight = jnp.minimum(snr, min_snr_gamma) / (snr + 1.0)
    return jnp.mean(weight * per_example)


def _unet_apply(graphdef: nnx.GraphDef):
    def apply(params, x_t, t, context):
        return nnx.merge(graphdef, params)(x_t, t, context)

    return apply


@nnx.jit
def _vae_posterior(vae: AutoencoderKL, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    posterior = vae.encode(images * 2.0 - 1.0)
    return posterior.mean, posterior.std


def encode_latent_bank(
    config: ml_collections.ConfigDict, vae: AutoencoderKL, log: Log
) -> dict[str, np.ndarray]:
    """Encodes `train.latent_bank` fresh world examples once.

    The encoder at 32x32 costs more than a UNet step at 8x8, so the UNet trains
    on a fixed bank of posteriors (a fresh latent draw from each every time).

    Returns:
      'mean', 'std': float32 [N, h, w, C] unscaled posteriors; 'prompt': int32 [N]
      index into `world.world_prompts()`.
    """
    chunk, total, seed = 256, config.train.latent_bank, config.seed + 3000
    means, stds, prompts = [], [], []
    start = time.time()
    for offset in range(0, total, chunk):
        batch = world.sample_world(min(chunk, total - offset), seed=seed, start=offset)
        mean, std = _vae_posterior(vae, jnp.asarray(batch.images))
        means.append(np.asarray(mean))
        stds.append(np.asarray(std))
        prompts.append(world.prompt_index(batch.labels))
    log(f"encoded {total} world examples in {time.time() - start:.0f} s")
    return {
        "mean": np.concatenate(means),
        "std": np.concatenate(stds),
        "prompt": np.concatenate(prompts),
    }


def train_unet_stage(
    config: ml_collections.ConfigDict,
    configs: dict[str, dict],
    vae: AutoencoderKL,
    prompt_ids: np.ndarray,
    workdir: Path,
    log: Log,
    probe: Callable[[UNet2DConditionModel, CLIPTextModel], dict] | None = None,
) -> dict:
    """Trains UNet and text encoder jointly on VAE latents; saves them into `workdir`.

    Args:
      configs: component configs ('unet', 'text_encoder', 'scheduler').
      vae: the trained, calibrated autoencoder (frozen here).
      prompt_ids: [P+1, L] token ids of `world.world_prompts()` and, last, the empty prompt.
      probe: called every `train.probe_every` steps with the EMA modules (e.g. a
        quick generation accuracy); its result is logged.
    Returns:
      {'loss': mean denoising loss of the last logging window, 'probes': {step: ...}}.
      The saved modules hold the EMA parameters (the raw ones if ema_decay == 0).
    """
    c = config.train
    bank = encode_latent_bank(config, vae, log)
    unet = UNet2DConditionModel(configs["unet"], rngs=nnx.Rngs(config.seed + 3))
    text_encoder = CLIPTextModel(configs["text_encoder"], rngs=nnx.Rngs(config.seed + 4))
    unet_gd, unet_params = nnx.split(unet, nnx.Param)
    text_gd, text_params = nnx.split(text_encoder, nnx.Param)
    schedule = schedule_from_config(configs["scheduler"])
    model = DiffusionModel(_unet_apply(unet_gd), jnp.asarray(schedule.alphas_cumprod))
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip), optax.adam(lr_schedule(c)))
    params = {"unet": unet_params, "text_encoder": text_params}
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)  # its own buffers: both are donated
    scale = vae.scaling_factor

    def loss_fn(params, latents, ids, key):
        context = nnx.merge(text_gd, params["text_encoder"])(ids)[0]
        batch = {"x0": latents, "context": context}
        return min_snr_denoising_loss(model, params["unet"], batch, key, c.min_snr_gamma)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(params, opt_state, ema, mean, std, ids, key, step):
        noise = jax.random.normal(jax.random.fold_in(key, 0), mean.shape)
        latents = (mean + std * noise) * scale
        loss, grads = jax.value_and_grad(loss_fn)(params, latents, ids, jax.random.fold_in(key, 1))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # Warmed-up decay: a fixed 0.999 would still hold 0.999^2000 = 14% of the
        # random initialisation after 2000 steps.
        decay = jnp.minimum(c.ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        return params, opt_state, ema, loss

    key = jax.random.key(config.seed + 5)
    order_rng = np.random.default_rng((config.seed, 5))
    order = np.zeros((0,), np.int64)
    empty = len(prompt_ids) - 1
    start, losses, mean, probes = time.time(), [], float("nan"), {}
    for step in range(c.steps):
        if len(order) < c.batch_size:  # a new epoch over the bank
            order = np.concatenate([order, order_rng.permutation(len(bank["prompt"]))])
        rows, order = order[: c.batch_size], order[c.batch_size :]
        # Caption dropout: the unconditional branch that guidance needs.
        dropped = order_rng.random(len(rows)) < c.caption_dropout
        index = np.where(dropped, empty, bank["prompt"][rows])
        params, opt_state, ema, loss = train_step(
            params,
            opt_state,
            ema,
            bank["mean"][rows],
            bank["std"][rows],
            prompt_ids[index],
            jax.random.fold_in(key, step),
            jnp.float32(step),
        )
        losses.append(loss)
        if step % c.log_every == 0 or step == c.steps - 1:
            mean = float(jnp.mean(jnp.stack(losses)))
            losses = []
            if not np.isfinite(mean):
                raise FloatingPointError(f"denoising loss is {mean} at step {step}")
            log(f"unet step {step}: loss {mean:.4f} ({time.time() - start:.0f} s)")
        if probe is not None and c.probe_every and (step + 1) % c.probe_every == 0:
            for name, state in (("ema", ema), ("raw", params)):
                nnx.update(unet, state["unet"])
                nnx.update(text_encoder, state["text_encoder"])
                probes[f"{step + 1}_{name}"] = probe(unet, text_encoder)
                log(f"unet step {step + 1}: {name} probe {probes[f'{step + 1}_{name}']}")
    final = ema if c.ema_decay > 0 else params
    nnx.update(unet, final["unet"])
    nnx.update(text_encoder, final["text_encoder"])
    save_component(unet, workdir / "unet", "unet", configs["unet"])
    save_component(text_encoder, workdir / "text_encoder", "text_encoder", configs["text_encoder"])
    return {"loss": mean, "probes": probes}
