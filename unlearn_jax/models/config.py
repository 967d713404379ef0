"""An immutable, hashable view of a component's config.json.

Modules keep their config as an attribute; NNX puts such attributes in the
graph definition, which jit uses as a static (hashed) key. A plain dict there
would make the graphdef unhashable, so modules store a `FrozenConfig`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenConfig(value)
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, FrozenConfig):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


class FrozenConfig(Mapping):
    """A read-only mapping (lists become tuples) that hashes by content."""

    def __init__(self, data: Mapping[str, Any]):
        self._data = {str(k): _freeze(v) for k, v in data.items()}
        self._hash = hash(json.dumps(self.to_dict(), sort_keys=True, default=repr))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __repr__(self) -> str:
        return f"FrozenConfig({self.to_dict()!r})"

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict copy."""
        return {k: _thaw(v) for k, v in self._data.items()}
