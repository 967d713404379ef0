"""The integrity (retention) metric: how far did the unlearned model move on what it should keep?

Definition (DESIGN.md): retain prompts p_1..p_P, seeds 1..S; z_ij is normal
noise from `fold_in(key(seed), i*S + j)`, the same array for both models;
x0_ij = G_θ0(z_ij, p_i) and xu_ij = G_θ(z_ij, p_i) with the same deterministic
DDIM sampler, steps and guidance; I = mean_ij LPIPS(x0_ij, xu_ij).

Both models run through one compiled sampler (the UNet parameters are an
argument), so the second model costs no compilation. For identical parameters
the two image sets are bitwise identical and I is exactly 0.

The 95% interval is a bootstrap over prompts (images of one prompt are not
independent, so prompts are the resampling unit; with one prompt, over seeds).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from unlearn_jax.atomic_files import write_json, write_npz
from unlearn_jax.diffusion import text_to_image
from unlearn_jax.diffusion.chunks import map_in_chunks
from unlearn_jax.metrics import image_quality, lpips
from unlearn_jax.metrics.visualize import save_grid
from unlearn_jax.models.pipeline import StableDiffusion

log = logging.getLogger(__name__)


@dataclasses.dataclass
class IntegrityResult:
    """Integrity of an unlearned model against the original.

    Attributes:
      integrity_lpips: mean LPIPS over all P*S pairs (lower is better; 0 = unchanged).
      ci95: bootstrap 95% interval of the mean.
      per_prompt: mean LPIPS per prompt, [P].
      per_pair: LPIPS per pair, [P*S], prompt-major.
      psnr, ssim: means over pairs (PSNR of identical pairs is +inf).
      prompts, seeds, settings: what was measured.
      original, unlearned: the image pairs [P*S,H,W,3] in [0,1].
    """

    integrity_lpips: float
    ci95: tuple[float, float]
    per_prompt: list[float]
    per_pair: np.ndarray
    psnr: float
    ssim: float
    prompts: list[str]
    seeds: int
    settings: dict
    original: np.ndarray
    unlearned: np.ndarray
    ci95_note: str = ""

    def to_json(self) -> dict:
        """The JSON-serialisable summary (no images)."""
        note = {"ci95_note": self.ci95_note} if self.ci95_note else {}
        return {
            "integrity_lpips": self.integrity_lpips,
            "ci95": list(self.ci95),
            **note,
            "psnr": self.psnr if np.isfinite(self.psnr) else "inf",
            "ssim": self.ssim,
            "num_prompts": len(self.prompts),
            "seeds_per_prompt": self.seeds,
            "per_prompt": [
                {"prompt": p, "lpips": v} for p, v in zip(self.prompts, self.per_prompt)
            ],
            "settings": self.settings,
        }


def bootstrap_ci(
    per_group: np.ndarray, *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `per_group` [G] (groups equally sized)."""
    values = np.asarray(per_group, np.float64)
    if values.size <= 1:
        v = float(values.mean()) if values.size else float("nan")
        return v, v
    idx = np.random.default_rng(seed).integers(0, values.size, (resamples, values.size))
    means = values[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def pair_metrics(
    original: np.ndarray, unlearned: np.ndarray, lpips_fn, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """LPIPS, PSNR and SSIM per pair, [N] each, computed in fixed-size batches."""

    def metrics(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "lpips": lpips_fn(a, b),
            "psnr": image_quality.psnr(a, b),
            "ssim": image_quality.ssim(a, b),
        }

    out = map_in_chunks(metrics, original, unlearned, size=batch_size)
    return {k: v.astype(np.float64) for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class IntegritySettings:
    """How both models' images are made: identical for the two, by construction.

    Attributes:
      seeds: S images per prompt.
      steps, guidance, height, width: sampler settings (height/width None: native size).
      seed: root seed of the shared initial noise.
      batch_size: images per compiled sampler chunk and per LPIPS batch.
      scheduler: the solver ('ddim', 'dpmpp_2m' or 'euler'; see `text_to_image.generate`).
    """

    seeds: int = 4
    steps: int = 50
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    seed: int = 0
    batch_size: int = 8
    scheduler: str = "ddim"


def integrity_images(
    pipe: StableDiffusion,
    prompts: Sequence[str],
    settings: IntegritySettings,
    *,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> np.ndarray:
    """One model's side of the comparison: [P*S, H, W, 3] in [0,1], prompt-major.

    The initial noise depends only on (settings.seed, prompt index, seed index), so
    two pipelines of one architecture get the same noise.
    """
    _check_prompts(prompts, settings.seeds)
    return text_to_image.generate(
        pipe,
        list(prompts),
        num_images_per_prompt=settings.seeds,
        steps=settings.steps,
        guidance=settings.guidance,
        height=settings.height,
        width=settings.width,
        seed=settings.seed,
        batch_size=settings.batch_size,
        mesh=mesh,
        progress=progress,
        scheduler=settings.scheduler,
    )


def _check_prompts(prompts: Sequence[str], seeds: int) -> None:
    if not prompts:
        raise ValueError("integrity needs at least one retain prompt; the prompt set is empty.")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")


def compare_images(
    original: np.ndarray,
    unlearned: np.ndarray,
    prompts: Sequence[str],
    seeds: int,
    distance: lpips.LpipsDistance,
    settings: dict,
    *,
    batch_size: int = 8,
) -> IntegrityResult:
    """The integrity metric of two image sets made from the same prompts and noise.

    Args:
      original, unlearned: [P*S, H, W, 3] in [0,1], prompt-major (image i*S + j is
        prompt i, seed j), from θ0 and θ.
      prompts, seeds: the P prompts and S images per prompt they were made from.
      distance: LPIPS (`lpips.lpips_distance`).
      settings: how they were made (steps, guidance, seed, sampler: recorded in the
        result with the image size and the LPIPS network).
      batch_size: image pairs per LPIPS call (at least 8).
    """
    prompts = list(prompts)
    _check_prompts(prompts, seeds)
    original, unlearned = np.asarray(original, np.float32), np.asarray(unlearned, np.float32)
    if original.shape != unlearned.shape or original.shape[0] != len(prompts) * seeds:
        raise ValueError(
            f"the image sets have shapes {original.shape} and {unlearned.shape}; both must be "
            f"[{len(prompts)} prompts x {seeds} seeds, H, W, 3] from the same prompts and noise."
        )
    per_pair = pair_metrics(original, unlearned, distance, batch_size=max(batch_size, 8))
    per_prompt = per_pair["lpips"].reshape(len(prompts), seeds).mean(axis=1)
    groups = per_prompt if len(prompts) > 1 else per_pair["lpips"]
    note = ""
    if len(prompts) < 2:
        note = "the confidence interval needs >= 2 prompts (prompts are the resampling unit); " + (
            "with one prompt and one seed it has zero width and means nothing"
            if seeds < 2
            else "with one prompt it is taken over seeds of that prompt, which are not "
            "independent, and is too narrow"
        )
        log.warning("integrity: %s. Fix: pass more prompts.", note)
    return IntegrityResult(
        ci95_note=note,
        integrity_lpips=float(per_pair["lpips"].mean()),
        ci95=bootstrap_ci(groups),
        per_prompt=[float(v) for v in per_prompt],
        per_pair=per_pair["lpips"],
        psnr=float(per_pair["psnr"].mean()),
        ssim=float(per_pair["ssim"].mean()),
        prompts=prompts,
        seeds=seeds,
        settings={
            **settings,
            "height": original.shape[1],
            "width": original.shape[2],
            "lpips_net": distance.net,
            "eta": 0.0,
        },
        original=original,
        unlearned=unlearned,
    )


def compute_integrity(
    original: StableDiffusion,
    unlearned: StableDiffusion,
    prompts: Sequence[str],
    settings: IntegritySettings = IntegritySettings(),
    *,
    lpips_net: str = "vgg",
    mesh: Mesh | None = None,
    progress: bool = True,
) -> IntegrityResult:
    """Integrity of the `unlearned` pipeline against the `original` (same architecture).

    Args:
      original, unlearned: loaded pipelines (`load_pipeline`); every component may differ.
      prompts: the retain prompts p_1..p_P (held out from training).
      settings: how the images are made, identical for both.
      lpips_net: "vgg" (default) or "alex", real weights.
      mesh: optional mesh with a 'data' axis for sampling.
    """
    images = [
        integrity_images(pipe, prompts, settings, mesh=mesh, progress=progress)
        for pipe in (unlearned, original)
    ]
    return compare_images(
        images[1],
        images[0],
        prompts,
        settings.seeds,
        lpips.lpips_distance(lpips_net),
        {
            "steps": settings.steps,
            "guidance": settings.guidance,
            "seed": settings.seed,
            "sampler": settings.scheduler,
        },
        batch_size=settings.batch_size,
    )


def write_integrity_report(
    result: IntegrityResult, out_dir: str | Path, max_grid_prompts: int = 16
) -> Path:
    """Writes integrity.json, pairs.npz and grid.png (original vs unlearned per prompt)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "integrity.json", result.to_json())
    write_npz(
        out / "pairs.npz",
        compressed=True,
        original=result.original.astype(np.float32),
        unlearned=result.unlearned.astype(np.float32),
        lpips=result.per_pair.astype(np.float32),
        prompts=np.asarray(result.prompts),
    )
    s = result.seeds
    rows, labels = [], []
    for i, prompt in enumerate(result.prompts[:max_grid_prompts]):
        pairs = range(i * s, (i + 1) * s)
        rows.append([result.original[k] for k in pairs] + [result.unlearned[k] for k in pairs])
        labels.append(f"{prompt}  (LPIPS {result.per_prompt[i]:.3f})")
    cols = [f"orig {j}" for j in range(s)] + [f"unl {j}" for j in range(s)]
    save_grid(rows, out / "grid.png", row_labels=labels, col_labels=cols)
    return out
