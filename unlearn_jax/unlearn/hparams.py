"""Hyperparameters of the unlearning objectives, in one small frozen dataclass.

One flat record rather than one per term: a preset is a choice of terms plus
one `UnlearnHParams`, each term reads only the fields it needs, and a config
overrides fields by name (`dataclasses.replace(preset.hparams, **overrides)`).
Hashable, so it can be a static argument of `jax.jit`. An
`ml_collections.ConfigDict` holding the same fields works wherever an
`UnlearnHParams` is read.
"""

from __future__ import annotations

import dataclasses

REMAP_TARGETS = ("frozen", "current")


@dataclasses.dataclass(frozen=True)
class UnlearnHParams:
    """Hyperparameters read by the forget/retain terms and the combiners.

    Attributes:
      eta: ESD negative-guidance scale η in
        ε* = ε_θ0(x_t,∅) − η (ε_θ0(x_t,c_f) − ε_θ0(x_t,∅)).
      target_model: remap target network: 'frozen' (θ0, Concept Ablation
        model-based) or 'current' (the current model, detached: SalUn /
        EraseDiff pseudo prompt).
      uncond_weight: weight of the unconditional (∅) branch in retain_distill;
        the conditional branch has weight 1.
      retain_weight: λ of the `sum` and `project` combiners, g = g_f' + λ g_r.
      strict: `project` always removes the g_r component (not only on conflict).
      project_rounding: `project` treats g_r as zero (no projection) when
        ‖g_r‖ ≤ project_rounding · ‖g_f‖. A retain gradient that small is
        rounding, not signal: retain_distill's gradient at θ = θ0 is exactly 0
        when student and teacher compile alike, and ~1e-7 of its parts when
        they do not, and projecting on it would remove g_f's component along
        a direction that is noise. 1e-5 is ~100 float32 ulps.
      erasediff_eta: η of EraseDiff's adaptive weight λ = max(η − cos(g_r, g_f), 0).
      erasediff_lambda: a fixed EraseDiff λ instead of the adaptive one (None: adaptive).
      keep_fraction: SalUn saliency: fraction of parameters (by |forget gradient|)
        that stay trainable.
    """

    eta: float = 1.0
    target_model: str = "frozen"
    uncond_weight: float = 1.0
    retain_weight: float = 1.0
    strict: bool = False
    project_rounding: float = 1e-5
    erasediff_eta: float = 1.0
    erasediff_lambda: float | None = None
    keep_fraction: float = 0.5

    def __post_init__(self):
        if self.target_model not in REMAP_TARGETS:
            raise ValueError(
                f"target_model {self.target_model!r} is not valid; "
                f"valid: {', '.join(REMAP_TARGETS)}"
            )
        if not 0.0 <= self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must lie in [0, 1], got {self.keep_fraction}")
        if not 0.0 <= self.project_rounding < 1.0:
            raise ValueError(
                f"project_rounding must lie in [0, 1), got {self.project_rounding}; it is "
                "the ratio ‖g_r‖/‖g_f‖ below which `project` ignores g_r (default 1e-5)"
            )
