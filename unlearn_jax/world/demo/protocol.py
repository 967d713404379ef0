"""What the demo runs: methods, learning-rate grids, steps, seeds, and the run config of each.

The demo tests the project's claim on the embedded world: methods built to
preserve integrity forget as well as the baselines while changing everything
else far less. A single (learning rate, step) per method cannot show that (a
method that forgets less also damages less), so every method runs on a grid of
learning rates, each run is evaluated every `eval_every` steps, and methods
are compared by their fronts on forget-rate x integrity axes.

`DEFAULT` fits `unlearn-jax demo` into 10 minutes on 2 CPU cores with an empty
compilation cache: three methods, two learning rates each, three points per run, one
training seed, and the recovery attack on each headline point. `FULL` (`unlearn-jax
demo --full`, 1 h 30 min measured on a shared 2-core machine without the attack, est.
50-60 minutes idle) is the complete protocol: every preset (gradient ascent, GradDiff,
distill_project and ESD + distill too), three learning rates each, more steps, three
training seeds and a 200-step attack.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from unlearn_jax.world import generator as world

if TYPE_CHECKING:  # annotations only: importing it costs every command 30-70 ms
    import ml_collections

CONCEPT = "circle"
# The remapping methods' anchors: each forget prompt with the concept replaced by this
# shape ("a small red circle on a grey background" -> "a small red square on a grey
# background"), so θ0's target keeps colour, size and background and changes only the shape.
ANCHOR_CONCEPT = "square"
BASELINES = ("neggrad", "graddiff", "salun", "esd_x", "ablation")
INTEGRITY_PRESERVING = ("distill", "distill_project", "esd_distill")
METHODS = ("neggrad", "graddiff", "salun", "esd_x", "ablation", "distill", "distill_project")
# The 10-minute default: each method's first run costs 35-70 s of XLA compilation on 2
# cores, so it runs two baselines, ESD-x (the most cited erasure method) and Concept
# Ablation (remapping alone: the same forget term as distill, no retain term), against
# remapping + distillation. SalUn alone takes ~5 minutes here (two-term step, saliency
# pass); --full runs every preset, SalUn and gradient ascent included.
DEFAULT_METHODS = ("esd_x", "ablation", "distill")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One demo protocol.

    Attributes:
      name: 'default' or 'full'.
      methods: presets to run, in report order.
      lrs: method -> learning rates of its grid (Adam, constant).
      steps: unlearning steps of every run.
      eval_every: steps between the points of a run's curve.
      seeds: training seeds; the grid runs with the first, the headline point of every
        method is re-trained with each of the others.
      eval_seeds: images per evaluation prompt.
      periodic_prompt_stride: intermediate curve points use every k-th evaluation prompt.
      attack_steps: steps of the embedding attack (textual inversion, one token) on each
        method's headline point and on the original; 0 = no attack.
      attack_lr: its Adam learning rate.
    """

    name: str
    methods: tuple[str, ...]
    lrs: dict[str, tuple[float, ...]]
    steps: int
    eval_every: int
    seeds: tuple[int, ...]
    eval_seeds: int
    periodic_prompt_stride: int
    attack_steps: int = 0
    attack_lr: float = 2e-2

    def with_overrides(
        self,
        *,
        methods: tuple[str, ...] | None = None,
        lrs: tuple[float, ...] | None = None,
        steps: int | None = None,
        seeds: int | None = None,
        attack_steps: int | None = None,
    ) -> Protocol:
        """This protocol with the command line's choices (one lr grid for all, steps, seeds)."""
        methods = self.methods if methods is None else methods
        from unlearn_jax.unlearn.registry import get_preset

        for method in methods:
            get_preset(method)  # a clear error naming the valid presets
        unknown = [m for m in methods if m not in self.lrs and lrs is None]
        if unknown:
            raise ValueError(
                f"the demo has no learning-rate grid for {', '.join(unknown)}; give one with "
                "--lr (e.g. --lr 3e-4,1e-3)"
            )
        grid = {m: tuple(lrs) if lrs is not None else self.lrs[m] for m in methods}
        steps = self.steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        count = len(self.seeds) if seeds is None else seeds
        if count < 1:
            raise ValueError(f"--seeds must be >= 1, got {count}")
        attack_steps = self.attack_steps if attack_steps is None else attack_steps
        if attack_steps < 0:
            raise ValueError(f"--attack-steps must be >= 0, got {attack_steps}")
        return dataclasses.replace(
            self,
            attack_steps=attack_steps,
            methods=tuple(methods),
            lrs=grid,
            steps=steps,
            eval_every=min(self.eval_every, steps),
            seeds=tuple(range(count)),
        )

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "methods": list(self.methods),
            "lrs": {m: list(self.lrs[m]) for m in self.methods},
            "steps": self.steps,
            "eval_every": self.eval_every,
            "seeds": list(self.seeds),
            "eval_seeds": self.eval_seeds,
            "periodic_prompt_stride": self.periodic_prompt_stride,
            "attack": self.attack_json(),
        }

    def attack_json(self) -> dict:
        """The headline attack's settings as the report states them."""
        return {
            "method": "embedding",
            "steps": self.attack_steps,
            "tokens": 1,
            "lr": self.attack_lr,
            "batch_size": 8,
            "init_word": CONCEPT,
        }


# Learning-rate grids per method (Adam, constant), bracketing where each starts to forget:
# gradient ascent diverges at rates the remapping methods need, and ESD-x trains only the
# cross-attention, so it needs larger ones.
DEFAULT_LRS = {
    "neggrad": (1e-5, 3e-5),
    "graddiff": (3e-5, 1e-4),
    "salun": (1e-4, 3e-4),
    "esd_x": (1e-3, 3e-3),
    "ablation": (1e-4, 3e-4),
    "distill": (1e-4, 2e-4),
    "distill_project": (1e-4, 2e-4),
}
FULL_LRS = {
    "neggrad": (1e-5, 3e-5, 1e-4),
    "graddiff": (1e-5, 3e-5, 1e-4),
    "salun": (1e-4, 3e-4, 1e-3),
    "esd_x": (3e-4, 1e-3, 3e-3),
    "ablation": (1e-4, 3e-4, 1e-3),
    "distill": (1e-4, 3e-4, 1e-3),
    "distill_project": (1e-4, 3e-4, 1e-3),
    "esd_distill": (3e-4, 1e-3, 3e-3),
}
# The embedding attack on each headline point and on the original (textual inversion,
# one token starting at the concept's own embedding, Adam 2e-2, batch 8 of θ0's forget
# latents). 100 steps, not fewer: measured on Concept Ablation's headline point, 30 steps
# recover the circle for 17% of forget prompts and 100 steps for 92% (a budget too small
# calls a method "forgot" that only hid the concept). Cost: ~0.2 s a step on 2 cores plus
# ~13 s of sampling per attacked model, and one compile.
ATTACK_STEPS_DEFAULT = 100
ATTACK_STEPS_FULL = 200
DEFAULT = Protocol(
    name="default",
    methods=DEFAULT_METHODS,
    lrs=DEFAULT_LRS,
    steps=120,
    eval_every=40,
    seeds=(0,),  # --seeds 2 re-trains every headline point; --full uses 3 seeds
    eval_seeds=1,
    periodic_prompt_stride=2,
    attack_steps=ATTACK_STEPS_DEFAULT,
)
FULL = Protocol(
    name="full",
    methods=(*METHODS, "esd_distill"),
    lrs=FULL_LRS,
    steps=160,
    eval_every=40,
    seeds=(0, 1, 2),
    eval_seeds=1,
    periodic_prompt_stride=1,
    attack_steps=ATTACK_STEPS_FULL,
)


def split_prompts(concept: str = CONCEPT) -> dict[str, list[str]]:
    """Forget prompts, training retain prompts and held-out retain prompts (every 4th)."""
    forget, retain = world.forget_retain_prompts(concept)
    held_out = retain[::4]
    train_retain = [p for p in retain if p not in held_out]
    return {"forget": forget, "retain": train_retain, "eval_retain": held_out}


def demo_config_path() -> Path:
    """configs/demo.py, the demo's experiment (in the package as unlearn_jax.configs)."""
    from importlib import resources

    return Path(str(resources.files("unlearn_jax.configs").joinpath("demo.py")))


def demo_config(
    method: str,
    model_path: Path,
    prompts: dict[str, list[str]],
    *,
    steps: int,
    lr: float,
    seed: int = 0,
    eval_every: int = 0,
    eval_seeds: int = 1,
    periodic_prompt_stride: int = 1,
) -> ml_collections.ConfigDict:
    """configs/demo.py for one (method, learning rate, seed), on `model_path` and `prompts`.

    Every evaluation point keeps its checkpoint (the headline point may be any of them).
    """
    from unlearn_jax.trainer.config_file import load_config_file

    args = (
        f"method={method},lr={lr!r},steps={steps},seed={seed},eval_every={eval_every},"
        f"eval_seeds={eval_seeds},stride={periodic_prompt_stride}"
    )
    config = load_config_file(f"{demo_config_path()}:{args}")
    config.model.path = str(model_path)
    config.forget.prompts = prompts["forget"]
    config.retain.prompts = prompts["retain"]
    config.eval.prompts = prompts["eval_retain"]
    config.eval.forget_prompts = prompts["forget"]
    return config


def attack_config(
    config: ml_collections.ConfigDict, protocol: Protocol
) -> ml_collections.ConfigDict:
    """`config` with the protocol's headline attack as `eval.attack` (a copy)."""
    config = copy.deepcopy(config)
    settings = protocol.attack_json()
    for name in ("method", "steps", "tokens", "lr", "batch_size", "init_word"):
        config.eval.attack[name] = settings[name]
    return config
