"""Range checks of an unlearning config's numbers, before anything is loaded or written.

A NaN guidance weight, a negative step count or a zero batch size is a typo,
not a request: without a check it reaches the sampler or the train loop and
either crashes deep inside JAX or, worse, silently means something else (a
NaN guidance weight compares false with 1 and turns guidance off). Each field
below is checked when the config has it; the message names the field, the
value and the valid range.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

# field -> (kind, low, high, low_exclusive); None bounds are open. `kind` "int" also
# refuses floats and bools; "float" accepts ints. Optional fields may be None.
_INF = math.inf
RANGES: dict[str, tuple[str, float, float, bool]] = {
    "seed": ("int", 0, 2**31 - 1, False),
    "train.steps": ("int", 0, _INF, False),
    "train.batch_size": ("int", 1, _INF, False),
    "train.grad_accum": ("int", 1, _INF, False),
    "train.log_every": ("int", 1, _INF, False),
    "optim.lr": ("float", 0.0, _INF, False),
    "optim.b1": ("float", 0.0, 1.0, False),
    "optim.b2": ("float", 0.0, 1.0, False),
    "optim.eps": ("float", 0.0, _INF, True),
    "optim.weight_decay": ("float", 0.0, _INF, False),
    "optim.momentum": ("float", 0.0, 1.0, False),
    "optim.warmup_steps": ("int", 0, _INF, False),
    "optim.decay_steps": ("int", 0, _INF, False),
    "optim.end_lr_fraction": ("float", 0.0, 1.0, False),
    "optim.grad_clip": ("float", 0.0, _INF, False),
    "forget.images_per_prompt": ("int", 1, _INF, False),
    "retain.images_per_prompt": ("int", 1, _INF, False),
    "sample.steps": ("int", 1, _INF, False),
    "sample.guidance": ("float", 0.0, _INF, False),
    "sample.esd_steps": ("int", 1, _INF, False),
    "sample.esd_guidance": ("float", 0.0, _INF, False),
    "sample.height": ("int", 1, _INF, False),
    "sample.width": ("int", 1, _INF, False),
    "sample.batch_size": ("int", 1, _INF, False),
    "eval.every": ("int", 0, _INF, False),
    "eval.seeds": ("int", 1, _INF, False),
    "eval.steps": ("int", 1, _INF, False),
    "eval.guidance": ("float", 0.0, _INF, False),
    "eval.seed": ("int", 0, 2**31 - 1, False),
    "eval.batch_size": ("int", 1, _INF, False),
    "eval.periodic_prompt_stride": ("int", 1, _INF, False),
    "eval.attack.steps": ("int", 0, _INF, False),
    "eval.attack.tokens": ("int", 0, _INF, False),
    "eval.attack.lr": ("float", 0.0, _INF, True),
    "eval.attack.batch_size": ("int", 1, _INF, False),
    "eval.attack.epsilon": ("float", 0.0, _INF, False),
    "eval.attack.seed": ("int", 0, 2**31 - 1, False),
    "checkpoint.every": ("int", 0, _INF, False),
    "checkpoint.keep": ("int", 0, _INF, False),
    "mesh.data": ("int", -1, _INF, False),
    "mesh.fsdp": ("int", 1, _INF, False),
    "unlearn.hparams.eta": ("float", -_INF, _INF, False),
    "unlearn.hparams.uncond_weight": ("float", -_INF, _INF, False),
    "unlearn.hparams.retain_weight": ("float", 0.0, _INF, False),
    "unlearn.hparams.erasediff_eta": ("float", -_INF, _INF, False),
    "unlearn.hparams.erasediff_lambda": ("float", 0.0, _INF, False),
    "unlearn.hparams.keep_fraction": ("float", 0.0, 1.0, True),
    "unlearn.hparams.project_rounding": ("float", 0.0, 1.0, False),
}

# field -> the values it may take (checked when the config has the field).
CHOICES: dict[str, tuple[str, ...]] = {
    "eval.attack.method": ("", "none", "embedding", "context"),
    "train.frozen_dtype": ("float32", "compute"),
    "train.step_programs": ("auto", "fused", "split", "staged"),
    "optim.mu_dtype": ("float32", "bfloat16"),
}


def _lookup(config: ml_collections.ConfigDict, name: str) -> tuple[bool, Any]:
    node: Any = config
    for part in name.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _range_text(kind: str, low: float, high: float, low_exclusive: bool) -> str:
    what = "an integer" if kind == "int" else "a finite number"
    show = lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"
    parts = []
    if low > -_INF:
        parts.append(f"{'>' if low_exclusive else '>='} {show(low)}")
    if high < _INF:
        parts.append(f"<= {show(high)}")
    return what + (" " + " and ".join(parts) if parts else "")


def check_config_values(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming every numeric field that is non-finite or out of range."""
    problems = []
    for name, (kind, low, high, low_exclusive) in RANGES.items():
        present, value = _lookup(config, name)
        if not present or value is None:
            continue
        if name == "mesh.data" and value == 0:
            problems.append(f"  {name}={value!r}: expected -1 (all devices) or an integer >= 1")
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = is_number and (kind == "float" or isinstance(value, int))
        ok = ok and math.isfinite(value) and value <= high
        ok = ok and (value > low if low_exclusive else value >= low)
        if not ok:
            problems.append(
                f"  {name}={value!r}: expected {_range_text(kind, low, high, low_exclusive)}"
            )
    for name, valid in CHOICES.items():
        present, value = _lookup(config, name)
        if present and value not in valid:
            shown = ", ".join(repr(v) for v in valid)
            problems.append(f"  {name}={value!r}: expected one of {shown}")
    if problems:
        raise ValueError(
            "config value(s) out of range:\n" + "\n".join(problems) + "\nFix: pass valid "
            "values, e.g. --config." + problems[0].split("=")[0].strip() + "=VALUE."
        )
