"""Names -> forget terms, retain terms and combiners; the named presets; trainable groups.

A preset is one line: which forget term, which retain term (or none), which
combiner, which parameters train by default, whether SalUn's saliency mask
applies, and default hyperparameters. `config.unlearn.method` names a preset;
`config.unlearn.params` names a trainable group (or is a regex) for
`trainable_mask`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from unlearn_jax.unlearn import combine, forget, retain
from unlearn_jax.unlearn.hparams import UnlearnHParams

PyTree = Any
ParamPath = tuple[str | int, ...]
# A combiner maps the Gram matrix [[‖g_f‖², ⟨g_f,g_r⟩], [⟨g_r,g_f⟩, ‖g_r‖²]] to the
# coefficients (a, b) of the update g = a g_f + b g_r (all three are such
# combinations), plus aux scalars: one pass over the gradients, whatever the combiner.
Combiner = Callable[[jax.Array, UnlearnHParams], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]

FORGET_TERMS = {
    "neggrad": forget.neggrad_loss,
    "remap": forget.remap_loss,
    "esd": forget.esd_loss,
    "noise": forget.noise_loss,
}
RETAIN_TERMS = {
    "retain_dm": retain.retain_dm_loss,
    "retain_distill": retain.retain_distill_loss,
    "anchor": retain.anchor_loss,
}
# The batch keys each term reads, for whoever assembles the batches.
BATCH_KEYS = {
    "neggrad": ("x0", "context"),
    "remap": ("x0", "context", "anchor_context"),
    "esd": ("x_t", "t", "context", "uncond_context"),
    "noise": ("x0", "context"),
    "retain_dm": ("x0", "context"),
    "retain_distill": ("x0", "context", "uncond_context"),
    "anchor": (),
}


def _sum(gram: jax.Array, hp: UnlearnHParams) -> tuple[jax.Array, jax.Array, dict]:
    return jnp.float32(1.0), jnp.asarray(hp.retain_weight, jnp.float32), {}


def _project(gram: jax.Array, hp: UnlearnHParams) -> tuple[jax.Array, jax.Array, dict]:
    c, projected = combine.project_coefficient(
        gram, hp.retain_weight, hp.strict, hp.project_rounding
    )
    return jnp.float32(1.0), c, {"projected": projected.astype(jnp.float32)}


def _erasediff(gram: jax.Array, hp: UnlearnHParams) -> tuple[jax.Array, jax.Array, dict]:
    # Outer step of EraseDiff on retain + λ (f − f*): f* is a constant of the
    # inner forget steps, so ∇(f − f*) at θ is the forget gradient g_f.
    if hp.erasediff_lambda is None:
        lam = jnp.maximum(hp.erasediff_eta - combine.gram_cosine(gram), 0.0)
    else:
        lam = jnp.asarray(hp.erasediff_lambda, jnp.float32)
    return lam, jnp.float32(1.0), {"lambda": lam}


COMBINERS: dict[str, Combiner] = {"sum": _sum, "project": _project, "erasediff": _erasediff}


@dataclasses.dataclass(frozen=True)
class Preset:
    """One named unlearning method.

    Attributes:
      name: registry name (`config.unlearn.method`).
      forget: key of FORGET_TERMS.
      retain: key of RETAIN_TERMS, or None for forget-only methods.
      combiner: key of COMBINERS (ignored when retain is None).
      params: default trainable group for `trainable_mask`.
      saliency: whether SalUn's saliency mask restricts the update.
      hparams: default hyperparameters.
      description: one line for tables and --help.
    """

    name: str
    forget: str
    retain: str | None
    combiner: str
    params: str = "full"
    saliency: bool = False
    hparams: UnlearnHParams = UnlearnHParams()
    description: str = ""


_PSEUDO = UnlearnHParams(target_model="current")
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("neggrad", "neggrad", None, "sum", description="gradient ascent on forget data"),
        Preset("graddiff", "neggrad", "retain_dm", "sum", description="neggrad + retain denoising"),
        Preset(
            "salun",
            "remap",
            "retain_dm",
            "sum",
            saliency=True,
            hparams=dataclasses.replace(_PSEUDO, retain_weight=0.5, keep_fraction=0.5),
            description="SalUn: pseudo-prompt remap + α retain denoising, top-50% saliency",
        ),
        Preset(
            "erasediff",
            "remap",
            "retain_dm",
            "erasediff",
            hparams=_PSEUDO,
            description="EraseDiff: retain step + λ·forget, λ = max(η − cos(g_r, g_f), 0)",
        ),
        Preset("esd_x", "esd", None, "sum", "xattn", description="ESD on cross-attention"),
        Preset("esd_u", "esd", None, "sum", "noxattn", description="ESD on all but cross-attn"),
        Preset("ablation", "remap", None, "sum", description="Concept Ablation, frozen anchor"),
        Preset("distill", "remap", "retain_distill", "sum", description="remap + distill to θ0"),
        Preset(
            "distill_project",
            "remap",
            "retain_distill",
            "project",
            description="remap + distill, conflicting forget component projected out",
        ),
        Preset("esd_distill", "esd", "retain_distill", "sum", description="ESD + distill to θ0"),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError listing the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown unlearning method {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


PARAM_GROUPS = ("full", "xattn", "noxattn", "none")
_CROSS_ATTENTION = "attn2"  # diffusers' name of the text cross-attention in transformer blocks


def trainable_mask(param_paths: Sequence[ParamPath], group: str) -> list[bool]:
    """Which parameters train, one bool per path.

    Args:
      param_paths: tuples of str/int keys, e.g. ('down_blocks', 0, 'attentions',
        0, 'transformer_blocks', 0, 'attn2', 'to_k', 'kernel').
      group: 'full' (all), 'xattn' (paths with an 'attn2' component: ESD-x),
        'noxattn' (all others: ESD-u), 'none' (no parameter: the UNet stays
        frozen while the text encoder trains, see `text_encoder`), or a regex
        searched in the '.'-joined path.
    Raises:
      ValueError (listing the valid groups) when `group` is neither a group
      name nor a valid regex, or is not 'none' and selects no parameter at all.
    """
    if group == "none":
        return [False] * len(param_paths)
    if group == "full":
        mask = [True] * len(param_paths)
    elif group in ("xattn", "noxattn"):
        in_xattn = [_CROSS_ATTENTION in map(str, path) for path in param_paths]
        mask = in_xattn if group == "xattn" else [not m for m in in_xattn]
    else:
        try:
            pattern = re.compile(group)
        except re.error as e:
            raise ValueError(
                f"unlearn.params {group!r} is neither a group ({', '.join(PARAM_GROUPS)}) "
                f"nor a valid regex: {e}"
            ) from None
        mask = [pattern.search(".".join(map(str, path))) is not None for path in param_paths]
    if not any(mask):
        raise ValueError(
            f"unlearn.params {group!r} selects none of the {len(param_paths)} parameters; "
            f"use a group ({', '.join(PARAM_GROUPS)}) or a regex over '.'-joined paths "
            "such as 'attn2\\.to_[kv]'"
        )
    return mask
