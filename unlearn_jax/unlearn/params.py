"""Which parameters train, and their names.

`ParamSplit` splits a parameter pytree (e.g. a UNet's pure dict) into the
trainable leaves, chosen by a group or regex (`registry.trainable_mask`), and
the rest, which stays θ0's own arrays. The trainable leaves travel as a dict
keyed by the '.'-joined path (`down_blocks.0.attentions.0....attn2.to_k.kernel`,
readable in a checkpoint without the model code). Their gradients, optimizer
state and SalUn's mask are dicts of the same names and shapes: every buffer
of the train step has its parameter's shape, hence its parameter's FSDP
sharding (`trainer.sharding.param_spec`), and nothing the size of all
parameters is ever concatenated. (An earlier layout kept the optimizer state
over ONE flat float32 vector of every trainable entry: the concatenations it
needed were parameter-sized temporaries, about ten in an SD-1.5 step, and
under FSDP XLA gathered every leaf whole to build them, so sharding did not
divide them. `trainer.checkpoints` refuses to resume such a checkpoint.)

Everything outside the trainable set is inserted at use by `ParamSplit.merge`;
it cannot change, so export writes it back bit for bit. When the text encoder
trains (`trainer.text_encoder`), the split is over the joint tree
{'text_encoder', 'unet'} and the names start with 'text_encoder.' or 'unet.'.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from unlearn_jax.unlearn.registry import ParamPath, trainable_mask

PyTree = Any
NamedParams = dict[str, jax.Array]


def _key_name(entry: Any) -> str | int:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def param_paths(params: PyTree) -> list[ParamPath]:
    """The path of each leaf as a tuple of str/int keys, in `jax.tree.leaves` order.

    A trailing `.value` (an NNX Variable around the array) is dropped, so an
    `nnx.State` and its pure dict give the same paths.
    """
    paths = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(_key_name(entry) for entry in path)
        if isinstance(path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
            keys = keys[:-1]
        paths.append(keys)
    return paths


@dataclasses.dataclass(frozen=True)
class ParamSplit:
    """The trainable/frozen split of a parameter pytree, and the names of the trainable leaves.

    Attributes:
      treedef: structure of the full parameter pytree (e.g. a UNet's pure dict).
      names: '.'-joined path of every leaf, in `jax.tree.leaves` order.
      mask: per leaf, whether it trains.
      shapes: shape of each trainable leaf, in order.
      size: number of trainable entries.
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
    def trainable_names(self) -> tuple[str, ...]:
        return tuple(n for n, m in zip(self.names, self.mask) if m)

    def select(self, full: PyTree) -> NamedParams:
        """The trainable leaves of `full` as {name: array}."""
        leaves = self.treedef.flatten_up_to(full)
        return {n: x for n, x, m in zip(self.names, leaves, self.mask) if m}

    def ordered(self, named: NamedParams) -> list[jax.Array]:
        """The values of a {name: array} dict in the split's (`jax.tree.leaves`) order."""
        return [named[n] for n in self.trainable_names]

    def named(self, ordered: list[jax.Array]) -> NamedParams:
        """Inverse of `ordered`: {name: array} from the values in the split's order."""
        return dict(zip(self.trainable_names, ordered, strict=True))

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
