"""Traced programs kept across processes, as serialized `jax.export` modules.

JAX's persistent compilation cache skips XLA's compilation on a later run, but
not the Python work before it: JAX must trace and lower the program to find it
in that cache. For the sampler that work is the UNet traced inside the scan:
1.1 s for SD-1.5 on every `unlearn-jax sample` process, 0.4 s for a tiny
model, all of it on the main thread before the first step.

`lower` does that work once per program and keeps its result: the lowered
program, serialized with `jax.export`, in a folder the CLI sets next to its
compilation cache (`set_folder`); `text_to_image.precompile` lowers the sampler,
the text encoder and the VAE decoder through it. A later process reads the
module back and lowers only a call of it (0.16-0.25 s for SD-1.5's sampler).
XLA compiles that call as it would the original program; the program computes
the same values bit for bit (tested), and its compiled form lands in the
compilation cache like any other.

A module is reused only for exactly what it was traced from. Its file is named
by a digest of:
- this package's Python source, and the versions of Python, jax, jaxlib, flax
  and numpy: a program traced by other code is never read back;
- JAX's configuration, the UNLEARN_JAX_* environment and XLA_FLAGS;
- the platform and the number of devices;
- the caller's `identity` of what its function closes over (for the sampler,
  the UNet's class, config and dtypes), the static arguments, and every input's
  shape, dtype and sharding.
A file that cannot be read back is reported and written again. A function that
`jax.export` cannot serialize (host callbacks), a folder that cannot be written,
and a kept module that cannot be called are reported and cost only the trace:
the program is then lowered as usual. Removing the folder is always safe.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from unlearn_jax import atomic_files

log = logging.getLogger(__name__)

SUFFIX = ".jaxexport"
_PACKAGE = Path(__file__).resolve().parent
_state: dict[str, Path | None] = {"folder": None}


def set_folder(folder: Path | str | None) -> None:
    """Where `lower` keeps its modules; None (the default) turns the store off."""
    _state["folder"] = None if folder is None else Path(folder)


def folder() -> Path | None:
    """The folder `set_folder` set, or None."""
    return _state["folder"]


@functools.cache
def source_digest() -> str:
    """SHA-256 of this package's Python files (paths and contents) and the versions
    of the libraries that trace its programs."""
    import flax
    import jaxlib
    import numpy as np

    digest = hashlib.sha256()
    versions = (sys.version, jax.__version__, jaxlib.__version__, flax.__version__, np.__version__)
    digest.update(repr(versions).encode())
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _environment() -> str:
    """What outside the source can change a trace: JAX's config, our and XLA's variables,
    the devices."""
    config = sorted((k, repr(v)) for k, v in jax.config.values.items())
    variables = sorted(
        (k, v) for k, v in os.environ.items() if k.startswith("UNLEARN_JAX_") or k == "XLA_FLAGS"
    )
    devices = jax.devices()
    return repr((config, variables, devices[0].platform, devices[0].device_kind, len(devices)))


def _leaf_description(leaf: Any) -> str:
    sharding = getattr(leaf, "sharding", None)
    return repr((tuple(leaf.shape), str(leaf.dtype), bool(getattr(leaf, "weak_type", False)),
                 None if sharding is None else repr(sharding)))  # fmt: skip


def module_path(name: str, identity: str, static: dict[str, Any], args: tuple) -> Path | None:
    """The file `lower` uses for these inputs (None while no folder is set, and in a
    multi-process run, whose programs are always traced).

    Args:
      name: a short name of the program (the file name's prefix).
      identity: everything the traced function closes over that its source does not
        fix, as a string (e.g. a model's class, config and dtypes).
      static: the static keyword arguments of the call.
      args: the call's positional arguments: arrays or `jax.ShapeDtypeStruct`s
        (with shardings), in any pytree.
    """
    if folder() is None or jax.process_count() > 1:
        return None
    leaves, treedef = jax.tree.flatten(args)
    digest = hashlib.sha256()
    for part in (
        source_digest(),
        _environment(),
        name,
        identity,
        repr(sorted(static.items())),
        repr(treedef),
        *map(_leaf_description, leaves),
    ):
        digest.update(part.encode() + b"\0")
    return folder() / f"{name}-{digest.hexdigest()[:40]}{SUFFIX}"


def _read(path: Path, leaves: list) -> jax.export.Exported | None:
    """The module in `path`, if it exists, reads back and takes these inputs."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        exported = jax.export.deserialize(bytearray(data))
    except Exception as e:  # noqa: BLE001 - any unreadable file is written again
        log.warning("%s cannot be read back (%s: %s); tracing the program again",
                    path, type(e).__name__, e)  # fmt: skip
        return None
    expected = [(tuple(x.shape), x.dtype) for x in leaves]
    if [(tuple(a.shape), a.dtype) for a in exported.in_avals] != expected:
        log.warning("%s holds a program for other inputs; tracing the program again", path)
        return None
    return exported


def _export(
    fn: Callable, leading: tuple, static: dict[str, Any], args: tuple
) -> jax.export.Exported | None:
    """`fn(*leading, *args, **static)` exported over `args`' leaves (None if it cannot be)."""
    leaves, treedef = jax.tree.flatten(args)
    flat = jax.jit(lambda *xs: fn(*leading, *jax.tree.unflatten(treedef, xs), **static))
    # Every custom call may stay (e.g. cuDNN's attention): jax.export keeps only those
    # with a stable form by default, for modules read by other versions, and a module
    # here is read back only by the same versions (`source_digest`).
    any_custom_call = jax.export.DisabledSafetyCheck.custom_call("ALL")
    try:
        return jax.export.export(
            flat, platforms=[jax.devices()[0].platform], disabled_checks=[any_custom_call]
        )(*leaves)
    except Exception as e:  # noqa: BLE001 - e.g. a custom call without a stable form
        log.info("not keeping the traced program (%s: %s); it is traced on every run",
                 type(e).__name__, e)  # fmt: skip
        return None


def _lower_call(exported: jax.export.Exported, args: tuple) -> jax.stages.Lowered:
    """A jitted call of `exported` taking `args`' pytree, lowered for `args`."""
    return jax.jit(lambda *a: exported.call(*jax.tree.leaves(a))).lower(*args)


def lower(
    fn: Callable,
    args: tuple,
    *,
    name: str,
    identity: str | None,
    leading: tuple = (),
    **static: Any,
) -> jax.stages.Lowered:
    """`fn.lower(*leading, *args, **static)`, through the folder's module when one is set.

    Args:
      fn: a jitted function.
      args: its traced positional arguments (arrays or `jax.ShapeDtypeStruct`s).
      name: see `module_path`.
      identity: see `module_path`; it must describe `leading` (static positional
        arguments, e.g. a model function, which are not part of the file's name).
        None lowers as usual.
      static: static keyword arguments.

    Returns:
      The lowered program. Compiled, it takes `args`' pytree and returns what
      `fn(*leading, *args, **static)` returns.
    """
    path = None if identity is None else module_path(name, identity, static, args)
    if path is None:
        return fn.lower(*leading, *args, **static)
    exported = _read(path, jax.tree.leaves(args))
    if exported is None:
        exported = _export(fn, leading, static, args)
        if exported is None:
            return fn.lower(*leading, *args, **static)
        _write(path, exported)
    try:
        return _lower_call(exported, args)
    except Exception as e:  # noqa: BLE001 - the store must never stop a run
        log.warning("the kept program %s cannot be called here (%s: %s); tracing it as usual",
                    path, type(e).__name__, e)  # fmt: skip
        return fn.lower(*leading, *args, **static)


def _write(path: Path, exported: jax.export.Exported) -> None:
    """Keeps `exported` in `path`; a folder that cannot be written only costs the next
    run its trace."""
    try:
        atomic_files.write_bytes(path, bytes(exported.serialize()))
    except OSError as e:
        log.warning("cannot keep the traced program in %s (%s); later runs trace it again",
                    path, e)  # fmt: skip
