"""Compiled programs kept for reuse within a process, bounded and visible.

XLA compilation dominates short runs (a minute for a tiny UNet's train step on
two CPU cores), so the sampler's chunk programs and the trainer's train steps are
kept and reused when a later call needs the same program. Each kind of program
has one named `ProgramCache`, defined next to the code that fills it
(`diffusion.chunks.CHUNK_PROGRAMS`, `trainer.step_programs.TRAIN_STEPS`,
`trainer.step_programs.COMPILED_TRAIN_STEPS`); each holds at most `max_size` entries,
dropping the least recently used, and `clear()` empties it (tests, or to free
device memory between unrelated experiments in one process).

`compile_program` compiles the sampler's and the trainer's programs with the
options of `cpu_compile_options`.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Hashable
from typing import Any

import jax

# LLVM's optimisation level for XLA:CPU's kernels. Level 1 instead of XLA's default 2
# compiles the embedded model's two-term train step in 55 s instead of 63 s and the
# 2-level UNet's forward in 4.6 s instead of 5.5 s (one pinned core), at the same
# speed (steps/s and forward ms within run-to-run noise): the kernels' heavy
# arithmetic is in XLA's own emitters and library calls, not in what LLVM's extra
# passes improve. Level 0 compiles faster still but runs the UNet ~1.7x slower.
CPU_LLVM_LEVEL = 1
_LEVEL_OPTION = "xla_backend_optimization_level"


def cpu_compile_options() -> dict[str, Any] | None:
    """XLA options for this process's programs: `CPU_LLVM_LEVEL` on a CPU backend.

    None (XLA's defaults) on accelerators, whose compilers this does not
    concern, and when the user set the level in XLA_FLAGS themselves.
    """
    if jax.default_backend() != "cpu" or _LEVEL_OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    return {_LEVEL_OPTION: CPU_LLVM_LEVEL}


def compile_program(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
    """`lowered.compile()` with `cpu_compile_options()`: how the sampler's chunk
    programs and the train step's programs compile."""
    return lowered.compile(cpu_compile_options())


class ProgramCache:
    """A thread-safe LRU map from a program's key to the program (or its future)."""

    def __init__(self, name: str, max_size: int):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.name, self.max_size = name, max_size
        self._entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get_or_create(self, key: Hashable, make: Callable[[], Any]) -> tuple[Any, bool]:
        """(the entry for `key`, whether `make()` created it now).

        `make` runs under the cache's lock: it should only create a cheap handle
        (e.g. a future whose compilation runs elsewhere) or be called by one thread.
        """
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key], False
            value = self._entries[key] = make()
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
            return value, True

    def get(self, key: Hashable) -> Any | None:
        """The entry for `key`, or None."""
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key]

    def discard(self, key: Hashable) -> None:
        """Forgets `key` (e.g. a program whose compilation failed)."""
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ProgramCache({self.name!r}, {len(self)}/{self.max_size})"
