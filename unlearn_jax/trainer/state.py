"""The train state: which parameters train, the optimizer, and what a checkpoint holds.

Only the trainable subset lives in the train state: the parameters as a
dict keyed by the '.'-joined path (`down_blocks.0.attentions.0....attn2.to_k.kernel`,
readable in a checkpoint without the model code), and the optimizer state
(and SalUn's mask) over ONE flat float32 vector of those parameters (raveled
and concatenated in `jax.tree.leaves` order, zero-padded to a multiple of
`PAD_MULTIPLE`). Why both:

  * gradients are taken with respect to the per-leaf parameters (the
    gradient of slicing a flat vector compiles slowly), then concatenated
    once; combination, clipping and the optimizer update are then a handful
    of operations on one vector instead of a handful per leaf: this halves
    the XLA compile time of a train step (45 s -> 20 s for a tiny UNet on
    two CPU cores), and at 860M parameters it is fewer, bigger kernels;
  * optimizer state and checkpoints scale with what trains, not with the UNet.

Everything outside the trainable set is θ0's own array, inserted at use by
`ParamSplit.merge`; it cannot change, so export writes it back bit for bit.
When the text encoder trains (`text_encoder`), the split is over the joint
tree {'text_encoder', 'unet'} and the names start with 'text_encoder.' or 'unet.'.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unlearn_jax.unlearn.registry import trainable_mask
from unlearn_jax.unlearn.step import param_paths

PyTree = Any
NamedParams = dict[str, jax.Array]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
# The flat vector's length is padded to a multiple of this, so that it shards
# evenly over any power-of-two number of devices up to it (the padding never
# reaches the model and has zero gradient).
PAD_MULTIPLE = 1024


@dataclasses.dataclass(frozen=True)
class ParamSplit:
    """The trainable/frozen split of a parameter pytree, and the flat layout of the trainable part.

    Attributes:
      treedef: structure of the full parameter pytree (e.g. a UNet's pure dict).
      names: '.'-joined path of every leaf, in `jax.tree.leaves` order.
      mask: per leaf, whether it trains.
      shapes: shape of each trainable leaf, in order.
      size: number of trainable entries (the unpadded length of the flat vector).
    """

    treedef: Any
    names: tuple[str, ...]
    mask: tuple[bool, ...]
    shapes: tuple[tuple[int, ...], ...]
    size: int

    @classmethod
    def from_params(cls, params: PyTree, group: str) -> ParamSplit:
        """Split by a group ('full', 'xattn', 'noxattn') or a regex (see `trainable_mask`)."""
        return cls.from_mask(params, trainable_mask(param_paths(params), group))

    @classmethod
    def from_mask(cls, params: PyTree, mask: list[bool]) -> ParamSplit:
        """Split by a per-leaf bool list (`jax.tree.leaves` order), e.g. `text_encoder.joint_mask`.

        Raises:
          ValueError: when no leaf trains.
        """
        paths = param_paths(params)
        if len(mask) != len(paths) or not any(mask):
            raise ValueError(
                f"the trainable mask selects {sum(mask)} of {len(paths)} parameters "
                f"({len(mask)} entries); at least one parameter must train"
            )
        mask = tuple(bool(m) for m in mask)
        names = tuple(".".join(map(str, p)) for p in paths)
        leaves = jax.tree.leaves(params)
        shapes = tuple(tuple(x.shape) for x, m in zip(leaves, mask) if m)
        size = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
        return cls(jax.tree.structure(params), names, mask, shapes, size)

    @property
    def padded_size(self) -> int:
        return -(-self.size // PAD_MULTIPLE) * PAD_MULTIPLE

    @property
    def trainable_names(self) -> tuple[str, ...]:
        return tuple(n for n, m in zip(self.names, self.mask) if m)

    def select(self, full: PyTree) -> NamedParams:
        """The trainable leaves of `full` as {name: array}."""
        leaves = self.treedef.flatten_up_to(full)
        return {n: x for n, x, m in zip(self.names, leaves, self.mask) if m}

    def ordered(self, named: NamedParams) -> list[jax.Array]:
        """The values of a {name: array} dict in the split's (flat-vector) order."""
        return [named[n] for n in self.trainable_names]

    def flatten(self, trainable: NamedParams | list[jax.Array]) -> jax.Array:
        """Trainable leaves ({name: array} or an ordered list) -> flat float32 [padded_size]."""
        leaves = self.ordered(trainable) if isinstance(trainable, dict) else trainable
        parts = [jnp.ravel(x).astype(jnp.float32) for x in leaves]
        parts.append(jnp.zeros((self.padded_size - self.size,), jnp.float32))
        return jnp.concatenate(parts)

    def unflatten(self, flat: jax.Array) -> NamedParams:
        """{name: array} of the trainable leaves from the flat vector."""
        out, offset = {}, 0
        for name, shape in zip(self.trainable_names, self.shapes):
            n = int(np.prod(shape, dtype=np.int64))
            out[name] = flat[offset : offset + n].reshape(shape)
            offset += n
        return out

    def merge(self, trainable: NamedParams, full: PyTree) -> PyTree:
        """`full` with its trainable leaves replaced by `trainable` (cast to the leaves' dtypes)."""
        leaves = self.treedef.flatten_up_to(full)
        merged = [
            trainable[n].astype(x.dtype) if m else x
            for n, x, m in zip(self.names, leaves, self.mask)
        ]
        return self.treedef.unflatten(merged)

    def sizes(self, full: PyTree) -> tuple[int, int]:
        """(number of trainable parameter entries, number of all entries)."""
        return self.size, sum(int(x.size) for x in self.treedef.flatten_up_to(full))


@flax.struct.dataclass
class TrainState:
    """What one train step reads and writes, and what a checkpoint holds.

    Attributes:
      step: int32 scalar, number of optimizer updates done.
      params: the trainable parameters, {name: array}.
      opt_state: the optax state of the flat vector of `params` (`ParamSplit.flatten`).
      saliency: SalUn's mask over the flat vector, bool [padded_size] (fixed
        before step 0), or None.
    """

    step: jax.Array
    params: NamedParams
    opt_state: optax.OptState
    saliency: jax.Array | None = None

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

    def build(learning_rate):
        lr = lambda count: learning_rate * shape(count)
        if name == "adam":
            opt = optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
        elif name == "adamw":
            opt = optax.adamw(
                lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
            )
        else:
            opt = optax.sgd(lr, momentum=optim.momentum or None)
        return optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt

    return optax.inject_hyperparams(build)(learning_rate=float(optim.lr))


def set_learning_rate(opt_state: optax.OptState, lr: float) -> optax.OptState:
    """`opt_state` of `make_optimizer` with its injected learning rate set to `lr`."""
    hyperparams = dict(opt_state.hyperparams)
    old = hyperparams["learning_rate"]
    hyperparams["learning_rate"] = jax.device_put(jnp.asarray(lr, old.dtype), old.sharding)
    return opt_state._replace(hyperparams=hyperparams)


def init_state(
    trainable: NamedParams,
    split: ParamSplit,
    optimizer: optax.GradientTransformation,
    saliency: jax.Array | None = None,
) -> TrainState:
    """Step-0 state; `trainable` is copied so that donating the state never frees θ0's buffers."""
    params = {n: jnp.copy(x) for n, x in trainable.items()}
    opt_state = optimizer.init(split.flatten(params))
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state, saliency)


def abstract_state(
    split: ParamSplit, full: PyTree, optimizer: optax.GradientTransformation, with_saliency: bool
) -> TrainState:
    """The state's shapes and dtypes (ShapeDtypeStructs), for sharding and restore targets."""

    def build(full):
        saliency = jnp.zeros((split.padded_size,), bool) if with_saliency else None
        return init_state(split.select(full), split, optimizer, saliency)

    return jax.eval_shape(build, full)
