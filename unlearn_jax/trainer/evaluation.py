"""Periodic and final evaluation of an unlearning run: evaluators that yield (name, value).

Evaluators (big_vision style) take the pipeline, θ0's and θ's parameters (the
UNet's, or the joint UNet + text-encoder tree when the text encoder trains,
see `text_encoder`) and an output folder, and yield scalar metrics:

  integrity   -- LPIPS between θ0 and θ images from the same noise on held-out
                 retain prompts (`metrics.integrity.compare_images`), with
                 PSNR/SSIM and a bootstrap interval; report and image grid on disk.
  forget_rate -- the share of forget-prompt generations a classifier assigns
                 to the concept, for θ and θ0. The classifier is a plug-in:
                 register a factory with `register_forget_classifier(name)` and
                 set `eval.classifier=name`. Built in: 'world_shape' (the embedded
                 world's shape head; the concept is `forget.concept`).
  attack      -- with `eval.attack.method` set, final (not periodic) evaluations
                 also attack θ (`unlearn_jax.attacks`): `forget_rate_attacked` is
                 the forget rate of the same prompts and noise under a textual-
                 inversion or context attack; report and grid in out_dir/attack/.
  retain      -- metrics of the same retain image pairs that integrity compares
                 (FID, text-image agreement), plug-ins named in
                 `eval.retain_metrics` (comma-separated), registered with
                 `register_retain_metric(name)`. Built in: 'world' (FID with the
                 world classifier's features, and retain accuracy: the share of
                 θ's retain images showing the prompted shape and colour).

Periodic evaluations (every `eval.every` steps) give a run its trajectory; with
`eval.periodic_prompt_stride=k` they use every k-th prompt of both prompt sets,
so that a curve costs little, while the final evaluation uses them all.
`read_curve(workdir)` returns the trajectory from the files the evaluations wrote.
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
from unlearn_jax.trainer.checkpoints import write_json_atomic
from unlearn_jax.trainer.text_encoder import unet_and_pipeline

log = logging.getLogger(__name__)

PyTree = Any
EVAL_DIR = "eval"  # <workdir>/eval/step_<N>/ and eval/final.json
# (config, pipe) -> (classifier images [N,H,W,3] in [0,1] -> [N,K], the concept's class(es))
ClassifierFactory = Callable[
    [ml_collections.ConfigDict, StableDiffusion], tuple[Classifier, int | Sequence[int]]
]
FORGET_CLASSIFIERS: dict[str, ClassifierFactory] = {}
# (original [N,H,W,3], unlearned [N,H,W,3], the prompt of each image [N]) -> {name: value}
RetainMetric = Callable[[np.ndarray, np.ndarray, Sequence[str]], dict[str, float]]
RetainMetricFactory = Callable[[ml_collections.ConfigDict, StableDiffusion], RetainMetric]
RETAIN_METRICS: dict[str, RetainMetricFactory] = {}


def register_forget_classifier(name: str) -> Callable[[ClassifierFactory], ClassifierFactory]:
    """Decorator registering a forget-rate classifier factory under `name` (eval.classifier)."""

    def register(factory: ClassifierFactory) -> ClassifierFactory:
        FORGET_CLASSIFIERS[name] = factory
        return factory

    return register


def register_retain_metric(name: str) -> Callable[[RetainMetricFactory], RetainMetricFactory]:
    """Decorator registering a retain-metric factory under `name` (for eval.retain_metrics)."""

    def register(factory: RetainMetricFactory) -> RetainMetricFactory:
        RETAIN_METRICS[name] = factory
        return factory

    return register


@register_forget_classifier("world_shape")
def _world_shape_classifier(config: ml_collections.ConfigDict, pipe: StableDiffusion):
    """The embedded world's shape head; the concept is `forget.concept` (e.g. 'circle')."""
    from unlearn_jax.world import generator as world
    from unlearn_jax.world.classifier import world_classifier

    concept = config.forget.get("concept") or ""
    shapes = world.ATTRIBUTES["shape"]
    if concept not in shapes:
        raise ValueError(
            f"eval.classifier='world_shape' detects a shape of the embedded world, but "
            f"forget.concept is {concept!r}. Fix: --config.forget.concept=<one of "
            f"{', '.join(shapes)}>."
        )
    return world_classifier("shape"), world.attribute_index("shape", concept)


@register_retain_metric("world")
def _world_retain_metrics(config: ml_collections.ConfigDict, pipe: StableDiffusion):
    """FID between θ0's and θ's retain images (world features) and θ's retain accuracy."""
    from unlearn_jax.metrics.fid import fid_between_image_sets
    from unlearn_jax.world.classifier import prompt_accuracy, world_feature_fn

    features = world_feature_fn()

    def metrics(original, unlearned, prompts) -> dict[str, float]:
        return {
            "fid": float(fid_between_image_sets(original, unlearned, features, batch_size=64)),
            "retain_accuracy": prompt_accuracy(unlearned, prompts)["accuracy"],
            "retain_accuracy_original": prompt_accuracy(original, prompts)["accuracy"],
        }

    return metrics


def forget_classifier(
    name: str, concept: str, pipe: StableDiffusion
) -> tuple[Classifier, int | Sequence[int]]:
    """The registered forget classifier `name` for `concept`, outside a run's config."""
    _names(name, "the forget classifier", FORGET_CLASSIFIERS)
    config = ml_collections.ConfigDict({"forget": {"concept": concept}})
    return FORGET_CLASSIFIERS[name](config, pipe)


def _names(value: str | None, what: str, registry: dict) -> list[str]:
    names = [n.strip() for n in str(value or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(
            f"{what} {', '.join(map(repr, unknown))} is not registered; registered: "
            f"{', '.join(registry) or '(none)'}."
        )
    return names


def read_curve(workdir: str | Path) -> list[dict[str, Any]]:
    """The run's evaluated points, by step: the metrics.json of every eval/step_N/ folder."""
    records = []
    for path in sorted((Path(workdir) / EVAL_DIR).glob("step_*/metrics.json")):
        records.append(json.loads(path.read_text()))
    return sorted(records, key=lambda r: r["step"])


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
        self._lpips = None
        self._original_forget_rate: dict[int, float] = {}
        self._original_images: dict[tuple[str, int], np.ndarray] = {}
        cfg = config.eval
        if cfg.get("classifier"):
            _names(cfg.classifier, "eval.classifier", FORGET_CLASSIFIERS)
        self.retain_metric_names = _names(
            cfg.get("retain_metrics"), "eval.retain_metrics", RETAIN_METRICS
        )
        if self.retain_metric_names and not cfg.integrity:
            raise ValueError(
                "eval.retain_metrics are computed on the integrity image pairs, but "
                "eval.integrity is off. Fix: --config.eval.integrity=True, or clear "
                "eval.retain_metrics."
            )
        self._retain_metrics: dict[str, RetainMetric] = {}
        from unlearn_jax.attacks.configured import attack_settings

        self.attack = attack_settings(config)  # None: no attack
        stride = int(cfg.get("periodic_prompt_stride", 1) or 1)
        if stride < 1:
            raise ValueError(f"eval.periodic_prompt_stride must be >= 1, got {stride}")
        self.periodic_stride = stride

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

    def prompts(self, which: str, stride: int = 1) -> list[str]:
        """Every `stride`-th prompt of the 'retain' or 'forget' evaluation set."""
        return getattr(self, f"{which}_prompts")[::stride]

    def original_images(self, which: str, stride: int = 1) -> np.ndarray:
        """θ0's images of `prompts(which, stride)`, sampled once, cached on disk by content."""
        if (which, stride) not in self._original_images:
            from unlearn_jax.data.cache import cache_key, load_or_build
            from unlearn_jax.trainer.experiment import model_identity

            cfg, prompts = self.config.eval, self.prompts(which, stride)
            key = cache_key(
                model=model_identity(self.config),
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
            self._original_images[which, stride] = arrays["images"]
        return self._original_images[which, stride]

    def _integrity(self, params: PyTree, out_dir: Path, stride: int) -> dict[str, float]:
        from unlearn_jax.metrics import integrity, lpips

        cfg = self.config.eval
        if self._lpips is None:
            self._lpips = lpips.lpips_distance(cfg.lpips_net)
        prompts = self.prompts("retain", stride)
        result = integrity.compare_images(
            self.original_images("retain", stride),
            self._sample(params, prompts),
            prompts,
            cfg.seeds,
            self._lpips,
            {"steps": cfg.steps, "guidance": cfg.guidance, "seed": cfg.seed, "sampler": "ddim"},
            batch_size=cfg.batch_size,
        )
        if jax.process_index() == 0:
            integrity.write_integrity_report(result, out_dir / "integrity")
        metrics = {
            "integrity_lpips": result.integrity_lpips,
            "integrity_lpips_ci95_low": result.ci95[0],
            "integrity_lpips_ci95_high": result.ci95[1],
            "psnr": result.psnr,
            "ssim": result.ssim,
        }
        image_prompts = [p for p in result.prompts for _ in range(result.seeds)]
        for name in self.retain_metric_names:
            if name not in self._retain_metrics:
                self._retain_metrics[name] = RETAIN_METRICS[name](self.config, self.pipe)
            metrics.update(
                self._retain_metrics[name](result.original, result.unlearned, image_prompts)
            )
        return metrics

    def _forget_rate(
        self, params: PyTree, stride: int, out_dir: Path, periodic: bool
    ) -> Iterator[tuple[str, float]]:
        cfg = self.config.eval
        classifier, concept = FORGET_CLASSIFIERS[cfg.classifier](self.config, self.pipe)
        if stride not in self._original_forget_rate:
            self._original_forget_rate[stride] = forget_rate(
                self.original_images("forget", stride), classifier, concept
            )
        images = self._sample(params, self.prompts("forget", stride))
        yield "forget_rate", forget_rate(images, classifier, concept)
        yield "forget_rate_original", self._original_forget_rate[stride]
        if self.attack is not None and not periodic:
            from unlearn_jax.attacks.configured import attack_in_evaluation

            unet, pipe = unet_and_pipeline(self.pipe, params)
            summary = attack_in_evaluation(
                self.config,
                self.attack,
                self.pipe,
                pipe,
                unet,
                self.prompts("forget", stride),
                classifier,
                concept,
                out_dir,
                cache_dir=self.cache_dir,
                unattacked_images=images,
                original_images=self.original_images("forget", stride),
                mesh=self.mesh,
                write=jax.process_index() == 0,
            )
            yield "forget_rate_attacked", summary["forget_rate_attacked"]
            if "template_rate" in summary:
                yield "template_rate", summary["template_rate"]
            yield "attack_seconds", summary["attack_seconds"]

    def __call__(
        self, params: PyTree, step: int, out_dir: Path, *, periodic: bool = False
    ) -> dict[str, float]:
        """All configured metrics of θ = `params` at `step`; writes `out_dir`/metrics.json.

        `periodic`: an intermediate point of the run's curve, evaluated on every
        `eval.periodic_prompt_stride`-th prompt. metrics.json also records how
        many prompts each metric saw. Every process computes the metrics
        (sampling is sharded over all of them); only process 0 writes files.
        """
        if jax.process_index() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        stride = self.periodic_stride if periodic else 1
        metrics: dict[str, float] = {}
        if self.config.eval.integrity:
            metrics.update(self._integrity(params, out_dir, stride))
        if self.config.eval.classifier:
            metrics.update(self._forget_rate(params, stride, out_dir, periodic))
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        record["prompts"] = {
            "retain": len(self.prompts("retain", stride)) if self.config.eval.integrity else 0,
            "forget": len(self.prompts("forget", stride)) if self.config.eval.classifier else 0,
            "seeds": int(self.config.eval.seeds),
        }
        if jax.process_index() == 0:
            write_json_atomic(out_dir / "metrics.json", record)
        log.info("eval at step %d: %s", step, json.dumps(record))
        return metrics


def _jsonable(value: float) -> float | str:
    value = float(value)
    return value if np.isfinite(value) else str(value)
