"""Periodic and final evaluation of an unlearning run: evaluators that yield (name, value).

Evaluators (big_vision style) take the pipeline, θ0's and θ's parameters (the
UNet's, or the joint UNet + text-encoder tree when the text encoder trains,
see `text_encoder`) and an output folder, and yield scalar metrics:

  integrity   -- LPIPS between θ0 and θ images from the same noise on held-out
                 retain prompts (`metrics.integrity.compute_integrity`), with
                 PSNR/SSIM and a bootstrap interval; report and image grid on disk.
  forget_rate -- the share of forget-prompt generations a classifier assigns
                 to the concept, for θ and θ0. The classifier is a plug-in:
                 register a factory with `register_forget_classifier(name)` and
                 set `eval.classifier=name` (none is built in yet).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from unlearn_jax.diffusion import text_to_image
from unlearn_jax.metrics.forget_rate import Classifier, forget_rate
from unlearn_jax.models.pipeline import StableDiffusion
from unlearn_jax.unlearn.checkpoints import write_json_atomic
from unlearn_jax.unlearn.text_encoder import unet_and_pipeline

log = logging.getLogger(__name__)

PyTree = Any
EVAL_DIR = "eval"  # <workdir>/eval/step_<N>/ and eval/final.json
# (config, pipe) -> (classifier images [N,H,W,3] in [0,1] -> [N,K], the concept's class(es))
ClassifierFactory = Callable[
    [ml_collections.ConfigDict, StableDiffusion], tuple[Classifier, int | Sequence[int]]
]
FORGET_CLASSIFIERS: dict[str, ClassifierFactory] = {}


def register_forget_classifier(name: str) -> Callable[[ClassifierFactory], ClassifierFactory]:
    """Decorator registering a forget-rate classifier factory under `name` (eval.classifier)."""

    def register(factory: ClassifierFactory) -> ClassifierFactory:
        FORGET_CLASSIFIERS[name] = factory
        return factory

    return register


class Evaluator:
    """Runs the configured evaluators; holds what is expensive to build (LPIPS) across calls.

    Args:
      config: the run config (its `eval` and `sample` sections are read).
      pipe: the loaded pipeline (text encoder, VAE, scheduler, UNet structure).
      original_params: θ0's UNet parameters (pure dict or nnx.State), or θ0's
        `text_encoder.joint_params` when the text encoder trains (its text
        encoder must be `pipe`'s own).
      retain_prompts: held-out retain prompts for integrity.
      forget_prompts: prompts for the forget rate.
      mesh: optional mesh with a 'data' axis for sampling.
      cache_dir: where θ0's evaluation images are cached (keyed by the model
        files, prompts and sampler settings), so that runs sharing the folder
        (e.g. the demo's methods) and repeated evaluations sample θ0 once.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        pipe: StableDiffusion,
        original_params: PyTree,
        retain_prompts: Sequence[str],
        forget_prompts: Sequence[str],
        mesh=None,
        cache_dir: Path | None = None,
    ):
        self.config = config
        self.cache_dir = cache_dir
        self.pipe = pipe
        self.original_params = original_params
        self.retain_prompts = list(retain_prompts)
        self.forget_prompts = list(forget_prompts)
        self.mesh = mesh
        self._lpips_fn = None
        self._original_forget_rate: float | None = None
        self._original_images: dict[str, np.ndarray] = {}

    def _sample(self, model_params: PyTree, prompts: list[str]) -> np.ndarray:
        """Evaluation images of θ = `model_params`: eval.seeds per prompt, prompt-major."""
        cfg = self.config.eval
        unet_params, pipe = unet_and_pipeline(self.pipe, model_params)
        return text_to_image.generate(
            pipe,
            prompts,
            num_images_per_prompt=cfg.seeds,
            steps=cfg.steps,
            guidance=cfg.guidance,
            height=self.config.sample.height,
            width=self.config.sample.width,
            seed=cfg.seed,
            unet_params=unet_params,
            batch_size=cfg.batch_size,
            mesh=self.mesh,
            progress=False,
        )

    def original_images(self, which: str) -> np.ndarray:
        """θ0's evaluation images of the 'retain' or 'forget' prompts, sampled once, cached."""
        if which not in self._original_images:
            from unlearn_jax.data.cache import cache_key, load_or_build, model_key

            cfg, prompts = self.config.eval, getattr(self, f"{which}_prompts")
            key = cache_key(
                model=model_key(self.config.model.path),
                dtype=str(self.pipe.unet.dtype),
                variant=self.config.model.get("variant"),
                prompts=prompts,
                seeds=cfg.seeds,
                steps=cfg.steps,
                guidance=cfg.guidance,
                height=self.config.sample.height,
                width=self.config.sample.width,
                seed=cfg.seed,
                sampler="ddim",
            )
            arrays = load_or_build(
                self.cache_dir,
                f"eval-original-{which}",
                key,
                lambda: {"images": self._sample(self.original_params, prompts)},
            )
            self._original_images[which] = arrays["images"]
        return self._original_images[which]

    def _integrity(self, params: PyTree, out_dir: Path) -> Iterator[tuple[str, float]]:
        from unlearn_jax.metrics import integrity, lpips

        cfg = self.config.eval
        if self._lpips_fn is None:
            self._lpips_fn = lpips.make_lpips_fn(lpips.load_lpips(cfg.lpips_net))
        original_unet, _ = unet_and_pipeline(self.pipe, self.original_params)
        unet, unlearned_pipe = unet_and_pipeline(self.pipe, params)
        result = integrity.compute_integrity(
            self.pipe,
            original_unet,
            unet,
            self.retain_prompts,
            seeds=cfg.seeds,
            steps=cfg.steps,
            guidance=cfg.guidance,
            height=self.config.sample.height,
            width=self.config.sample.width,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            lpips_net=cfg.lpips_net,
            lpips_fn=self._lpips_fn,
            mesh=self.mesh,
            progress=False,
            unlearned_pipe=unlearned_pipe,
            original_images=self.original_images("retain"),
        )
        if jax.process_index() == 0:
            integrity.write_integrity_report(result, out_dir / "integrity")
        yield "integrity_lpips", result.integrity_lpips
        yield "integrity_lpips_ci95_low", result.ci95[0]
        yield "integrity_lpips_ci95_high", result.ci95[1]
        yield "psnr", result.psnr
        yield "ssim", result.ssim

    def _forget_rate(self, params: PyTree) -> Iterator[tuple[str, float]]:
        cfg = self.config.eval
        if cfg.classifier not in FORGET_CLASSIFIERS:
            raise ValueError(
                f"eval.classifier {cfg.classifier!r} is not registered; registered: "
                f"{', '.join(FORGET_CLASSIFIERS) or '(none)'}. Register one with "
                "unlearn_jax.unlearn.evaluation.register_forget_classifier."
            )
        classifier, concept = FORGET_CLASSIFIERS[cfg.classifier](self.config, self.pipe)

        if self._original_forget_rate is None:
            self._original_forget_rate = forget_rate(
                self.original_images("forget"), classifier, concept
            )
        yield (
            "forget_rate",
            forget_rate(self._sample(params, self.forget_prompts), classifier, concept),
        )
        yield "forget_rate_original", self._original_forget_rate

    def __call__(self, params: PyTree, step: int, out_dir: Path) -> dict[str, float]:
        """All configured metrics of θ = `params` at `step`; writes `out_dir`/metrics.json.

        Every process computes the metrics (sampling is sharded over all of them);
        only process 0 writes files.
        """
        if jax.process_index() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        metrics: dict[str, float] = {}
        if self.config.eval.integrity:
            metrics.update(self._integrity(params, out_dir))
        if self.config.eval.classifier:
            metrics.update(self._forget_rate(params))
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        if jax.process_index() == 0:
            write_json_atomic(out_dir / "metrics.json", record)
        log.info("eval at step %d: %s", step, json.dumps(record))
        return metrics


def _jsonable(value: float) -> float | str:
    value = float(value)
    return value if np.isfinite(value) else str(value)
