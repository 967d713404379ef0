"""`eval.attack` of a run config: which attack an evaluation runs, and running it.

    --config.eval.attack.method=embedding --config.eval.attack.steps=100

makes the final evaluation of `unlearn-jax unlearn` / `evaluate` attack the
evaluated model and add `forget_rate_attacked` (and, for the embedding attack,
`template_rate`, the concept rate of "a <v*>" images) to its metrics, next to
`forget_rate`. The attack learns on θ0's latents of the evaluation's forget
prompts, drawn with the run's own `sample.*` / `forget.images_per_prompt`
settings (the training data's cache, when the prompt sets agree), and is judged
on the evaluation's images: same prompts, noise, sampler, classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from unlearn_jax.attacks.evaluation import evaluate_attack, write_attack_report
from unlearn_jax.attacks.run import AttackSettings, run_attack
from unlearn_jax.metrics.forget_rate import Classifier
from unlearn_jax.metrics.integrity import IntegritySettings
from unlearn_jax.models.pipeline import StableDiffusion

PyTree = Any
ATTACK_DIR = "attack"  # <evaluation out_dir>/attack/: attack.json, grid.png, checkpoints/


def attack_settings(config: ml_collections.ConfigDict) -> AttackSettings | None:
    """The configured attack, or None when `eval.attack.method` is off (or absent).

    Raises:
      ValueError: when an attack is set without eval.classifier or forget.concept.
    """
    section = config.eval.get("attack")
    method = str(section.get("method") or "") if section is not None else ""
    if method in ("", "none"):
        return None
    if not config.eval.get("classifier"):
        raise ValueError(
            f"eval.attack.method={method!r} reports the forget rate under attack, which needs "
            "a forget classifier. Fix: --config.eval.classifier=NAME (e.g. world_shape)."
        )
    if not config.forget.get("concept"):
        raise ValueError(
            f"eval.attack.method={method!r} needs the concept's word to attack. Fix: "
            "--config.forget.concept=WORD (e.g. circle)."
        )
    return AttackSettings(
        method=method,
        steps=int(section.steps),
        tokens=int(section.tokens),
        lr=float(section.lr),
        batch_size=int(section.batch_size),
        epsilon=float(section.epsilon),
        init_word=str(section.get("init_word") or ""),
        seed=int(section.seed),
    )


def eval_sampling(config: ml_collections.ConfigDict) -> IntegritySettings:
    """The evaluation's sampler settings (so the attacked images share its noise)."""
    cfg = config.eval
    return IntegritySettings(
        seeds=int(cfg.seeds),
        steps=int(cfg.steps),
        guidance=float(cfg.guidance),
        seed=int(cfg.seed),
        batch_size=int(cfg.batch_size),
        height=config.sample.get("height"),
        width=config.sample.get("width"),
    )


def forget_latents(
    config: ml_collections.ConfigDict,
    original_pipe: StableDiffusion,
    prompts: Sequence[str],
    cache_dir: Path | None,
):
    """θ0's latents of `prompts` as the run's training data draws them (cached)."""
    from unlearn_jax.data.cache import model_key
    from unlearn_jax.trainer import experiment

    seed = experiment.derived_seed(config.seed, experiment.FORGET_X0_SEED)
    return experiment.section_latents(
        config,
        original_pipe,
        list(prompts),
        "forget",
        seed,
        cache_dir,
        model_key(config.model.path),
    )


def attack_in_evaluation(
    config: ml_collections.ConfigDict,
    settings: AttackSettings,
    original_pipe: StableDiffusion,
    pipe: StableDiffusion,
    unet_params: PyTree,
    prompts: Sequence[str],
    classifier: Classifier,
    concept_index: int | Sequence[int],
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    unattacked_images: np.ndarray | None = None,
    original_images: np.ndarray | None = None,
    mesh=None,
    write: bool = True,
) -> dict[str, Any]:
    """Attacks the evaluated model; returns attack.json's content (written to out_dir/attack).

    Args:
      config: the run config (eval.*, sample.*, forget.*).
      settings: `attack_settings(config)`.
      original_pipe: θ0's pipeline (its images are the attack's targets).
      pipe, unet_params: the evaluated model (pipe carries its text encoder).
      prompts: the evaluation's forget prompts.
      classifier, concept_index: the forget classifier.
      out_dir: the evaluation's folder; the attack's state goes to out_dir/attack.
      unattacked_images: the evaluation's forget images of `prompts` (same noise).
      original_images: θ0's forget images with that noise (the grid's first column).
    """
    x0 = forget_latents(config, original_pipe, prompts, cache_dir)
    attack_dir = Path(out_dir) / ATTACK_DIR
    outcome = run_attack(
        pipe,
        unet_params,
        prompts,
        config.forget.concept,
        x0,
        settings,
        workdir=attack_dir,
        mesh=mesh,
    )
    summary, images = evaluate_attack(
        pipe,
        unet_params,
        outcome,
        prompts,
        classifier,
        concept_index,
        eval_sampling(config),
        unattacked_images=unattacked_images,
        original_images=original_images,
        mesh=mesh,
    )
    summary.update(concept=config.forget.concept, classifier=config.eval.classifier)
    if write:
        write_attack_report(summary, images, list(prompts), attack_dir, seeds=config.eval.seeds)
    return summary


def attack_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str | Path | None,
    step: int | None,
    out_dir: str | Path,
    *,
    cache_dir: Path | None = None,
    mesh=None,
) -> dict[str, Any]:
    """Attacks checkpoint `step` of the run in `workdir` (or θ0 itself when workdir is None).

    `config` is the run's config with `eval.attack` set. The unattacked and θ0's forget
    images come from the evaluation cache in `cache_dir` when present (same noise).
    Returns attack.json's content, written to out_dir/attack.
    """
    from unlearn_jax.trainer import experiment
    from unlearn_jax.trainer.evaluation import FORGET_CLASSIFIERS, Evaluator
    from unlearn_jax.trainer.restore import restore_latest
    from unlearn_jax.trainer.text_encoder import unet_and_pipeline

    settings = attack_settings(config)
    if settings is None:
        raise ValueError("attack_checkpoint needs eval.attack.method (embedding or context)")
    spec = experiment.resolve_run(config)
    model = experiment.load_model(config, spec)
    if workdir is None:
        params = model.theta0
    else:
        _, trainable = restore_latest(model, Path(workdir), step)
        params = model.split.merge(trainable, model.theta0)
    evaluator = Evaluator(
        config,
        model.pipe,
        model.theta0,
        [],
        spec.eval_forget_prompts,
        mesh=mesh,
        cache_dir=cache_dir,
    )
    classifier, concept = FORGET_CLASSIFIERS[config.eval.classifier](config, model.pipe)
    original = evaluator.original_images("forget")
    unattacked = original if workdir is None else None
    unet, pipe = unet_and_pipeline(model.pipe, params)
    return attack_in_evaluation(
        config,
        settings,
        model.pipe,
        pipe,
        unet,
        spec.eval_forget_prompts,
        classifier,
        concept,
        Path(out_dir),
        cache_dir=cache_dir,
        unattacked_images=unattacked,
        original_images=original,
        mesh=mesh,
    )
