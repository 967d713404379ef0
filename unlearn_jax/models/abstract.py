"""Building a module's structure without computing (or tracing much of) its initial values.

Loading a checkpoint needs the module's graph and the shapes and dtypes of its
variables, never the random initial values the weight files overwrite. The
usual way, `nnx.eval_shape(lambda: Module(..., rngs=nnx.Rngs(0)))`, traces
every initialiser, and each draw from `nnx.Rngs` updates a counter variable.
Inside a trace that update makes Flax ask the traced counter for its
`.sharding`; JAX answers with an AttributeError whose message it builds by
walking the whole trace so far, so the cost grows with the number of layers
drawn before: ~3.5 s for a tiny UNet, ~7 s for SD-1.5's, about 90% of it
spent building error messages nobody reads.

`abstract_module` passes a stand-in for `nnx.Rngs` whose streams all return
one fixed key and keep no counter. Initialisers still run under
`nnx.eval_shape` (so nothing is computed and nothing allocated), but the
trace stays short and no message is built: the same graph and the same
variable shapes and dtypes as with `nnx.Rngs`, in a tenth of the time. The
keys are all equal, so the abstract values must never be used as an
initialisation; they only have shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


class ShapeOnlyRngs:
    """Duck-types `nnx.Rngs` for initialisers whose values are discarded.

    Any stream (`rngs.params()`, `rngs["dropout"]()`, `rngs()`) returns the
    same key, created lazily inside the caller's trace.
    """

    def __init__(self) -> None:
        self._key = None

    def __call__(self) -> jax.Array:
        if self._key is None:
            self._key = jax.random.key(0)
        return self._key

    def __getattr__(self, name: str) -> Callable[[], jax.Array]:
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __getitem__(self, name: str) -> Callable[[], jax.Array]:
        return self


def abstract_module(build: Callable[[nnx.Rngs], M]) -> M:
    """The module `build(rngs)` returns, with `jax.ShapeDtypeStruct` variables.

    Args:
      build: constructs the module from the rngs it is given, e.g.
        `lambda rngs: UNet2DConditionModel(config, rngs=rngs)`.

    Returns:
      The module as `nnx.eval_shape` would return it: real graph, abstract variables.
    """
    return nnx.eval_shape(lambda: build(ShapeOnlyRngs()))
