"""Pretraining of the embedded default: world evaluator, VAE, then UNet + CLIP text encoder.

    python -m unlearn_jax.pretrain --config configs/pretrain_world.py \
        --workdir /tmp/pretrain_world [--install]

Stages (each writes its result into the workdir; a rerun skips stages whose
result is already there, so an interrupted run continues at its stage):

1. `classifier.safetensors`: the world evaluator (`metrics.world_classifier`),
   validated on the held-out split.
2. `vae/`: a KL-regularised autoencoder (`AutoencoderKL`, 32x32 -> 8x8x4),
   loss L1 + MSE + L1 of image gradients (edges) + a small KL weight; its
   `scaling_factor` is set to 1/std of the training latents, as Stable
   Diffusion's 0.18215 was.
3. `unet/` + `text_encoder/`: the UNet and a 2-layer CLIP text encoder trained
   jointly with the epsilon-prediction denoising loss (`unlearn.denoising`,
   Min-SNR-weighted) on SD's scaled-linear 1000-step schedule, on a bank of
   VAE posteriors of fresh world images, with 10% of captions dropped to the
   empty prompt so that classifier-free guidance works; EMA weights exported,
   a quick generation probe logged every `train.probe_every` steps.
4. `tiny_world/`: the diffusers folder (fp16 safetensors), then its prompt
   accuracy (DDIM, guidance) judged by the evaluator, in `metrics.json`.

`--install` copies the classifier and `tiny_world/` into `unlearn_jax/assets/`.
Everything is seeded from `config.seed`: the same config gives the same files.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from unlearn_jax.data import world
from unlearn_jax.data.tokenizer import write_clip_tokenizer
from unlearn_jax.diffusion.schedule import schedule_from_config
from unlearn_jax.metrics import world_classifier
from unlearn_jax.models.clip import CLIPTextModel
from unlearn_jax.models.pipeline import StableDiffusion, load_pipeline
from unlearn_jax.models.unet import UNet2DConditionModel
from unlearn_jax.models.vae import AutoencoderKL
from unlearn_jax.pretrain_export import (
    load_component,
    save_component,
    scheduler_config,
    text_encoder_config,
    unet_config,
    vae_config,
    write_pipeline,
)
from unlearn_jax.unlearn.denoising import (
    DiffusionModel,
    add_noise,
    prediction_target,
    sample_timesteps_and_noise,
)

Log = Callable[[str], None]


def _log(message: str) -> None:
    print(message, flush=True)


def _schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
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
    optimizer = nnx.Optimizer(vae, optax.adam(_schedule(c)), wrt=nnx.Param)
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


# ----------------------------------------------------------------------------- stage 3


def min_snr_denoising_loss(
    model: DiffusionModel,
    params,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    min_snr_gamma: float,
) -> jax.Array:
    """`unlearn.denoising.denoising_loss` with Min-SNR-gamma weights (Hang et al., 2023).

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
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip), optax.adam(_schedule(c)))
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


# ----------------------------------------------------------------------------- stage 4


def _judge(pipe: StableDiffusion, config, classifier, *, prompt_stride: int, per_prompt: int):
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
    judged = _judge(
        load_pipeline(folder),
        config,
        world_classifier.load_world_classifier(classifier_path),
        prompt_stride=e.prompt_stride,
        per_prompt=e.per_prompt,
    )
    log(f"generation accuracy (every {e.prompt_stride}. prompt x {e.per_prompt}): {judged}")
    return judged


def run(config: ml_collections.ConfigDict, workdir: str | Path, log: Log = _log) -> dict:
    """All stages into `workdir`, skipping those already done; returns the metrics."""
    from transformers import CLIPTokenizer

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_path = workdir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    timings = metrics.setdefault("seconds", {})

    def stage(name: str, fn: Callable[[], dict]) -> None:
        start = time.time()
        metrics[name] = fn()
        timings[name] = round(time.time() - start, 1)
        metrics_path.write_text(json.dumps(metrics, indent=2))

    clf_path = workdir / "classifier.safetensors"
    if not clf_path.is_file():
        stage("classifier", lambda: train_classifier_stage(config, clf_path, log))
    vae_dir = workdir / "vae"
    if not (vae_dir / "config.json").is_file():
        stage("vae", lambda: train_vae_stage(config, vae_dir, log))

    tokenizer_dir = write_clip_tokenizer(
        workdir / "tokenizer", world.world_words(), model_max_length=config.text_encoder.max_length
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    configs = {
        "unet": unet_config(config),
        "vae": json.loads((vae_dir / "config.json").read_text()),
        "text_encoder": text_encoder_config(config, tokenizer),
        "scheduler": scheduler_config(),
    }
    vae = load_component(AutoencoderKL, configs["vae"], vae_dir, "vae")
    if not (workdir / "unet" / "config.json").is_file():
        prompts = world.world_prompts() + [""]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length)
        prompt_ids = np.asarray(ids["input_ids"], np.int32)
        classifier = world_classifier.load_world_classifier(clf_path)

        def probe(unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> dict:
            pipe = StableDiffusion(
                unet=unet,
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                scheduler_config=configs["scheduler"],
                source=workdir,
                file_dtypes={},
                buffers={},
            )
            e = config.eval
            return _judge(
                pipe,
                config,
                classifier,
                prompt_stride=e.probe_prompt_stride,
                per_prompt=e.probe_per_prompt,
            )

        stage(
            "unet",
            lambda: train_unet_stage(config, configs, vae, prompt_ids, workdir, log, probe),
        )

    unet = load_component(UNet2DConditionModel, configs["unet"], workdir / "unet", "unet")
    text = load_component(
        CLIPTextModel, configs["text_encoder"], workdir / "text_encoder", "text_encoder"
    )
    out = write_pipeline(
        workdir / "tiny_world",
        configs,
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer_dir=tokenizer_dir,
    )
    stage("generation", lambda: evaluate_pipeline_stage(config, out, clf_path, log))
    return metrics


def install(workdir: str | Path) -> None:
    """Copies the trained classifier and pipeline into the package's assets folder."""
    from unlearn_jax import embedded

    assets = embedded.assets_path()
    assets.mkdir(exist_ok=True)
    target = assets / embedded.EMBEDDED_MODEL
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(Path(workdir) / "tiny_world", target)
    shutil.copy(Path(workdir) / "classifier.safetensors", assets / embedded.CLASSIFIER_WEIGHTS)
    # safetensors writes 0600 files; package data must be readable by every user.
    for path in [assets / embedded.CLASSIFIER_WEIGHTS, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/pretrain_world.py[:runlocal]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--install", action="store_true", help="copy results into assets/")
    args = parser.parse_args(argv)
    from unlearn_jax.pretrain_export import load_config

    config = load_config(args.config)
    start = time.time()
    metrics = run(config, args.workdir)
    _log(f"done in {time.time() - start:.0f} s: {json.dumps(metrics)}")
    if args.install:
        install(args.workdir)


if __name__ == "__main__":
    main()
