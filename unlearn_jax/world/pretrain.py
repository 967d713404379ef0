"""Pretraining of the embedded default: world evaluator, VAE, then UNet + CLIP text encoder.

    python -m unlearn_jax.world.pretrain --config configs/pretrain_world.py \
        --workdir /tmp/pretrain_world [--install]

Stages (each writes its result into the workdir; a rerun skips stages whose
result is already there, so an interrupted run continues at its stage):

1. `classifier.safetensors`: the world evaluator (`world.classifier`),
   validated on the held-out split.
2. `vae/`: a KL-regularised autoencoder (`AutoencoderKL`, 32x32 -> 8x8x4),
   loss L1 + MSE + L1 of image gradients (edges) + a small KL weight; its
   `scaling_factor` is set to 1/std of the training latents, as Stable
   Diffusion's 0.18215 was.
3. `unet/` + `text_encoder/`: the UNet and a 2-layer CLIP text encoder trained
   jointly with the epsilon-prediction denoising loss (`diffusion.forward`,
   Min-SNR-weighted) on SD's scaled-linear 1000-step schedule, on a bank of
   VAE posteriors of fresh world images, with 10% of captions dropped to the
   empty prompt so that classifier-free guidance works; EMA weights exported,
   a quick generation probe logged every `train.probe_every` steps.
4. `tiny_world/`: the diffusers folder (fp16 safetensors), then its prompt
   accuracy (DDIM, guidance) judged by the evaluator, in `metrics.json`.

Stages 1, 2 and 4 are in `pretrain_stages`, stage 3 in `pretrain_diffusion`;
this module runs them in order (`run`) and is the command line.

`--install` copies the classifier and `tiny_world/` into `unlearn_jax/world/assets/`.
Everything is seeded from `config.seed`: the same config gives the same files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import ml_collections
import numpy as np

from unlearn_jax.atomic_files import write_json
from unlearn_jax.data.tokenizer import write_clip_tokenizer
from unlearn_jax.models.clip import CLIPTextModel
from unlearn_jax.models.pipeline import StableDiffusion
from unlearn_jax.models.unet import UNet2DConditionModel
from unlearn_jax.models.vae import AutoencoderKL
from unlearn_jax.world import classifier as world_classifier
from unlearn_jax.world import generator as world
from unlearn_jax.world.pretrain_diffusion import train_unet_stage
from unlearn_jax.world.pretrain_export import (
    load_component,
    scheduler_config,
    text_encoder_config,
    unet_config,
    write_pipeline,
)
from unlearn_jax.world.pretrain_stages import (
    Log,
    evaluate_pipeline_stage,
    judge_generation,
    train_classifier_stage,
    train_vae_stage,
)


def _log(message: str) -> None:
    print(message, flush=True)


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
        write_json(metrics_path, metrics)

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
            return judge_generation(
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
    from unlearn_jax.world import embedded

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
    from unlearn_jax.world.pretrain_export import load_config

    config = load_config(args.config)
    start = time.time()
    metrics = run(config, args.workdir)
    _log(f"done in {time.time() - start:.0f} s: {json.dumps(metrics)}")
    if args.install:
        install(args.workdir)


if __name__ == "__main__":
    main()
