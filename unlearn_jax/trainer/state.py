"""The train state: the trainable parameters, the optimizer, and what a checkpoint holds.

Only the trainable subset lives in the train state: the parameters as a dict
keyed by the '.'-joined path (`unlearn.params.ParamSplit`), the optimizer
state over that same dict in float32 (moments shaped like the parameters;
Adam's first moment optionally bfloat16, `optim.mu_dtype`), and SalUn's mask
as bool arrays of the same names and shapes. Every buffer has its
parameter's shape, hence its parameter's FSDP sharding. Everything outside
the trainable set is θ0's own array, inserted at use by `ParamSplit.merge`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from unlearn_jax.unlearn.params import NamedParams, ParamSplit

PyTree = Any

OPTIMIZERS = ("adam", "adamw", "sgd")
MOMENT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCHEDULES = ("constant", "cosine", "linear")


@flax.struct.dataclass
class TrainState:
    """What one train step reads and writes, and what a checkpoint holds.

    Attributes:
      step: int32 scalar, number of optimizer updates done.
      params: the trainable parameters, {name: array}.
      opt_state: the optax state of `params` in float32 (moments shaped like `params`).
      saliency: SalUn's mask, {name: bool array shaped like the parameter}
        (fixed before step 0), or None.
    """

    step: jax.Array
    params: NamedParams
    opt_state: optax.OptState
    saliency: NamedParams | None = None

    def to_checkpoint(self) -> dict[str, Any]:
        """A plain dict for orbax (no custom pytree nodes on disk)."""
        return {
            "step": self.step,
            "params": self.params,
            "opt_state": self.opt_state,
            "saliency": self.saliency,
        }

    @classmethod
    def from_checkpoint(cls, tree: dict[str, Any]) -> TrainState:
        return cls(tree["step"], tree["params"], tree["opt_state"], tree["saliency"])


def schedule_shape(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning-rate schedule divided by optim.lr: warmup to 1, then constant or decay.

    The decay length is its own field, not train.steps, on purpose: raising
    train.steps to extend a run must not change the learning rates of the
    steps already taken.
    """
    name = optim.get("schedule", "constant")
    if name not in SCHEDULES:
        raise ValueError(f"optim.schedule {name!r} is unknown; valid: {', '.join(SCHEDULES)}")
    warmup = int(optim.get("warmup_steps", 0) or 0)
    decay_steps = int(optim.get("decay_steps", 0) or 0)
    end_fraction = float(optim.get("end_lr_fraction", 0.0) or 0.0)
    if name == "constant":
        decay = optax.constant_schedule(1.0)
    elif decay_steps <= 0:
        raise ValueError(
            f"optim.schedule={name!r} needs optim.decay_steps > 0 (the length of the decay, "
            "independent of train.steps so that extending a run keeps its schedule)."
        )
    elif name == "cosine":
        decay = optax.cosine_decay_schedule(1.0, decay_steps, alpha=end_fraction)
    else:
        decay = optax.linear_schedule(1.0, end_fraction, decay_steps)
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), decay], [warmup])


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """step -> learning rate: optim.lr times `schedule_shape(optim)`."""
    shape = schedule_shape(optim)
    return lambda count: optim.lr * shape(count)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """`optax.clip_by_global_norm`, with the global norm passed in when the caller has it.

    `update(..., global_norm=n)` clips with n instead of another pass over the
    gradients: the train step knows the norm from the Gram matrix of its terms
    (`step.combine_term_grads`, the `grad/norm` it logs), and on XLA:CPU the pass
    costs two to three compiled kernels per trainable leaf. Without `global_norm` it
    computes the norm as optax does; its state is optax's (empty, so checkpoints are
    unchanged). Above the bound it scales by one factor, max_norm / norm, where optax
    divides each element by the norm: equal to rounding (tested against optax).
    """

    def update_fn(updates, state, params=None, *, global_norm=None):
        del params
        norm = optax.tree.norm(updates) if global_norm is None else global_norm
        # One scalar factor, exactly 1 below the bound, multiplied into each leaf. Optax's
        # division per element made XLA:CPU write the clipped gradient out in a kernel of
        # its own per leaf, beside the moments' and the parameter's: 1,296 kernels in the
        # embedded model's update instead of 972, compiled in 2.7-3.3 s instead of 2.4-2.5.
        scale = jnp.where(jnp.squeeze(norm < max_norm), 1.0, max_norm / jnp.squeeze(norm))
        return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optax chain of the `optim` config section: clip -> optimizer with schedule.

    optim.lr is an injected hyperparameter (a leaf of the optimizer state, see
    `set_learning_rate`) rather than a constant of the compiled step, so runs
    that differ only in the learning rate share one compiled train step.
    """
    name = optim.name
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name {name!r} is unknown; valid: {', '.join(OPTIMIZERS)}")
    if not optim.lr > 0:
        raise ValueError(f"optim.lr must be > 0, got {optim.lr}")
    shape = schedule_shape(optim)
    clip = float(optim.get("grad_clip", 0.0) or 0.0)
    mu_name = optim.get("mu_dtype", "float32") or "float32"
    if mu_name not in MOMENT_DTYPES:
        raise ValueError(
            f"optim.mu_dtype {mu_name!r} is unknown; valid: {', '.join(MOMENT_DTYPES)} "
            "(the dtype of Adam's first moment; bfloat16 halves it)"
        )
    mu_dtype = MOMENT_DTYPES[mu_name]

    def build(learning_rate):
        lr = lambda count: learning_rate * shape(count)
        if name == "adam":
            opt = optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, mu_dtype=mu_dtype)
        elif name == "adamw":
            opt = optax.adamw(
                lr,
                b1=optim.b1,
                b2=optim.b2,
                eps=optim.eps,
                weight_decay=optim.weight_decay,
                mu_dtype=mu_dtype,
            )
        else:
            opt = optax.sgd(lr, momentum=optim.momentum or None)
        return optax.chain(clip_by_global_norm(clip), opt) if clip > 0 else opt

    return optax.inject_hyperparams(build)(learning_rate=float(optim.lr))


def set_learning_rate(opt_state: optax.OptState, lr: float) -> optax.OptState:
    """`opt_state` of `make_optimizer` with its injected learning rate set to `lr`."""
    hyperparams = dict(opt_state.hyperparams)
    old = hyperparams["learning_rate"]
    hyperparams["learning_rate"] = jax.device_put(jnp.asarray(lr, old.dtype), old.sharding)
    return opt_state._replace(hyperparams=hyperparams)


def float32_tree(named: NamedParams) -> NamedParams:
    """{name: array} in float32: what the optimizer and the gradient combiners work on."""
    return {n: x.astype(jnp.float32) for n, x in named.items()}


def init_state(
    trainable: NamedParams,
    optimizer: optax.GradientTransformation,
    saliency: NamedParams | None = None,
) -> TrainState:
    """Step-0 state; `trainable` is copied so that donating the state never frees θ0's buffers."""
    params = {n: jnp.copy(x) for n, x in trainable.items()}
    opt_state = optimizer.init(float32_tree(params))
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state, saliency)


def abstract_state(
    split: ParamSplit, full: PyTree, optimizer: optax.GradientTransformation, with_saliency: bool
) -> TrainState:
    """The state's shapes and dtypes (ShapeDtypeStructs), for sharding and restore targets."""

    def build(full):
        trainable = split.select(full)
        saliency = None
        if with_saliency:
            saliency = {n: jnp.zeros(x.shape, bool) for n, x in trainable.items()}
        return init_state(trainable, optimizer, saliency)

    return jax.eval_shape(build, full)
