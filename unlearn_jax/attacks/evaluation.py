"""Judging an attack: the forget rate of the attacked prompts from the same noise, and its report.

For P forget prompts and S images per prompt, image j of prompt i starts from
`text_to_image.initial_noise(seed, P, S, ...)` row i*S + j: the same noise for
θ0, for the unlearned model on the plain prompts and for the unlearned model
under attack (the forget prompts with v* in place of the concept, or their
contexts moved by δ). The embedding attack is also sampled from "a <v*>"
alone, P*S images (the same compiled sampler chunk as the forget prompts).
All sampling goes through the one jitted DDIM `lax.scan` sampler (`sample_in_chunks`).

`attack.json` holds the forget rates (`forget_rate`, `forget_rate_attacked`,
`forget_rate_original`, `template_rate`), the attack's settings, steps, time and
losses, and a per-prompt table; `grid.png` shows original | unlearned |
unlearned under attack (| "a <v*>") per prompt, same noise.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unlearn_jax import atomic_files
from unlearn_jax.attacks.objectives import clip_text_fn
from unlearn_jax.attacks.prompts import PLACEHOLDER, placeholder_ids
from unlearn_jax.attacks.run import AttackOutcome
from unlearn_jax.data.sources import encode_prompt_set
from unlearn_jax.diffusion.sampler import uses_guidance
from unlearn_jax.diffusion.text_to_image import (
    check_finite,
    decode_latents,
    denoise_contexts,
    initial_noise,
    latent_shape,
)
from unlearn_jax.metrics.forget_rate import Classifier, forget_rate
from unlearn_jax.metrics.integrity import IntegritySettings
from unlearn_jax.models.pipeline import StableDiffusion

PyTree = Any
TEMPLATE = ("a ", "")  # "a <v*>": the learned tokens with no concept word around them
GRID_ROWS = 8


@functools.cache
def _text_jit(text_graphdef: nnx.GraphDef):
    return jax.jit(clip_text_fn(text_graphdef))


def spliced_contexts(pipe: StableDiffusion, ids, mask, slot, tokens: np.ndarray) -> np.ndarray:
    """Contexts [P, L, D] of placeholder prompts with `tokens` [k, D] spliced in."""
    graphdef, state = nnx.split(pipe.text_encoder)
    out = _text_jit(graphdef)(
        state.to_pure_dict(),
        jnp.asarray(ids),
        jnp.asarray(mask),
        jnp.asarray(slot),
        jnp.asarray(tokens, jnp.float32),
    )
    return np.asarray(out, np.float32)


def attacked_contexts(pipe: StableDiffusion, outcome: AttackOutcome) -> np.ndarray:
    """The forget prompts' contexts under attack, [P, L, D]."""
    if outcome.settings.method == "context":
        return outcome.base_context + outcome.params
    p = outcome.placeholders
    return spliced_contexts(pipe, p.ids, p.mask, p.slot, outcome.params)


def template_contexts(pipe: StableDiffusion, outcome: AttackOutcome) -> np.ndarray:
    """The context of "a <v*>" [1, L, D] (embedding attack only)."""
    p = placeholder_ids(pipe.tokenizer, [TEMPLATE], outcome.settings.tokens)
    return spliced_contexts(pipe, p.ids, p.mask, p.slot, outcome.params)


def sample_contexts(
    pipe: StableDiffusion,
    unet_params: PyTree,
    contexts: np.ndarray,
    sampling: IntegritySettings,
    *,
    noise_prompts: int | None = None,
    mesh=None,
) -> np.ndarray:
    """Images [P*S, H, W, 3] in [0, 1] from contexts [P, L, D], S = sampling.seeds, prompt-major.

    The noise is `initial_noise(sampling.seed, P, S)`, as `text_to_image.generate`
    draws it for P prompts; `noise_prompts` draws it for that many prompts instead
    and repeats a single context over all of them (the "a <v*>" images).
    """
    count = contexts.shape[0] if noise_prompts is None else noise_prompts
    shape = latent_shape(pipe, sampling.height, sampling.width)
    noise = initial_noise(sampling.seed, count, sampling.seeds, shape)
    cond = np.repeat(contexts, sampling.seeds * (count // contexts.shape[0]), axis=0)
    uncond = encode_prompt_set(pipe, [""])[0] if uses_guidance(sampling.guidance) else None
    final = denoise_contexts(
        pipe,
        cond,
        uncond,
        noise,
        steps=sampling.steps,
        guidance=sampling.guidance,
        unet_params=unet_params,
        batch_size=sampling.batch_size,
        mesh=mesh,
        progress=False,
        scheduler=sampling.scheduler,
    )
    images = decode_latents(pipe, final, sampling.batch_size)
    check_finite(images, [f"prompt {i}" for i in range(count)], sampling.seeds)
    return images


def detections(
    images: np.ndarray, classifier: Classifier, concept: int | Sequence[int]
) -> np.ndarray:
    """[N] bool: the classifier's top class is the concept (the forget rate's rule)."""
    probs = np.asarray(classifier(images))
    return np.isin(np.argmax(probs, axis=1), np.atleast_1d(np.asarray(concept)))


def evaluate_attack(
    pipe: StableDiffusion,
    unet_params: PyTree,
    outcome: AttackOutcome,
    prompts: Sequence[str],
    classifier: Classifier,
    concept_index: int | Sequence[int],
    sampling: IntegritySettings,
    *,
    original_pipe: StableDiffusion | None = None,
    original_unet_params: PyTree | None = None,
    unattacked_images: np.ndarray | None = None,
    original_images: np.ndarray | None = None,
    mesh=None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(summary, images) of an attack on the unlearned model `pipe`/`unet_params`.

    Args:
      pipe, unet_params: the attacked model.
      outcome: `run_attack`'s result.
      prompts: the P forget prompts the attack learned on.
      classifier, concept_index: the forget classifier and the concept's class(es).
      sampling: how images are drawn (the same noise for every column).
      original_pipe, original_unet_params: θ0, for its forget rate and the grid.
      unattacked_images: the unlearned model's images of `prompts` with this noise,
        when already sampled (an evaluation's); else sampled here.
      original_images: θ0's images of `prompts` with this noise, when already sampled
        (instead of `original_pipe`).

    Returns:
      summary (attack.json's content) and images {'unlearned', 'attacked',
      'original' (with θ0), 'template' (embedding)}, each [P*S, H, W, 3].
    """
    started = time.time()
    images = {}
    if unattacked_images is None:
        unattacked_images = sample_contexts(
            pipe, unet_params, encode_prompt_set(pipe, prompts), sampling, mesh=mesh
        )
    images["unlearned"] = unattacked_images
    images["attacked"] = sample_contexts(
        pipe, unet_params, attacked_contexts(pipe, outcome), sampling, mesh=mesh
    )
    if outcome.settings.method == "embedding":
        images["template"] = sample_contexts(
            pipe,
            unet_params,
            template_contexts(pipe, outcome),
            sampling,
            noise_prompts=len(prompts),
            mesh=mesh,
        )
    if original_images is not None:
        images["original"] = original_images
    elif original_pipe is not None:
        original_params = (
            nnx.state(original_pipe.unet) if original_unet_params is None else original_unet_params
        )
        images["original"] = sample_contexts(
            original_pipe,
            original_params,
            encode_prompt_set(original_pipe, prompts),
            sampling,
            mesh=mesh,
        )
    seen = {k: detections(v, classifier, concept_index) for k, v in images.items()}
    per_prompt_rate = lambda k: seen[k].reshape(len(prompts), sampling.seeds).mean(axis=1)
    rates = {k: per_prompt_rate(k) for k in seen}
    texts = (
        outcome.placeholders.texts
        if outcome.placeholders is not None
        else [f"{p} (+δ)" for p in prompts]
    )
    table = []
    for i, prompt in enumerate(prompts):
        row = {
            "prompt": prompt,
            "attacked_prompt": texts[i],
            "forget_rate": float(rates["unlearned"][i]),
            "forget_rate_attacked": float(rates["attacked"][i]),
        }
        if "original" in rates:
            row["forget_rate_original"] = float(rates["original"][i])
        table.append(row)
    s = outcome.settings
    summary: dict[str, Any] = {
        "method": s.method,
        "forget_rate": forget_rate(images["unlearned"], classifier, concept_index),
        "forget_rate_attacked": forget_rate(images["attacked"], classifier, concept_index),
        "attack_steps": outcome.steps,
        "attack_seconds": outcome.seconds,
        "settings": s.to_json(),
        "sampling": dataclasses.asdict(sampling),
        "prompts": len(prompts),
        "images_per_prompt": sampling.seeds,
        "loss_first": _mean(outcome.losses[:10]),
        "loss_last": _mean(outcome.losses[-10:]),
        "per_prompt": table,
    }
    if "original" in images:
        summary["forget_rate_original"] = forget_rate(images["original"], classifier, concept_index)
    if "template" in images:
        summary["template"] = PLACEHOLDER.join(TEMPLATE).strip()
        summary["template_rate"] = forget_rate(images["template"], classifier, concept_index)
    if s.method == "context":
        norms = np.linalg.norm(outcome.params, axis=-1) / np.maximum(
            np.linalg.norm(outcome.base_context, axis=-1), 1e-12
        )
        summary["relative_perturbation_max"] = float(norms.max())
    summary["eval_seconds"] = round(time.time() - started, 2)
    return summary, images


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def write_attack_report(
    summary: dict[str, Any],
    images: dict[str, np.ndarray],
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    seeds: int = 1,
) -> list[Path]:
    """attack.json and grid.png (original | unlearned | attacked [| "a <v*>"]) in `out_dir`."""
    from unlearn_jax.metrics.visualize import save_grid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [c for c in ("original", "unlearned", "attacked", "template") if c in images]
    labels = {
        "original": "original",
        "unlearned": "unlearned",
        "attacked": f"attacked ({summary['method']})",
        "template": summary.get("template", ""),
    }
    stride = max(1, -(-len(prompts) // GRID_ROWS))
    chosen = list(range(0, len(prompts), stride))[:GRID_ROWS]
    rows = [[images[c][i * seeds] for c in columns] for i in chosen]
    save_grid(  # written atomically
        rows,
        out_dir / "grid.png",
        row_labels=[prompts[i] for i in chosen],
        col_labels=[labels[c] for c in columns],
        min_cell=64,
    )
    atomic_files.write_json(out_dir / "attack.json", summary, indent=2)
    return [out_dir / "attack.json", out_dir / "grid.png"]
