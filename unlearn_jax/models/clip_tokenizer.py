"""CLIP tokenizers without importing transformers on every run.

`from transformers import CLIPTokenizer` takes 0.8-1.4 s (transformers scans its
whole model tree to build its lazy import table), while the tokenizer it wraps,
a Rust `tokenizers.Tokenizer`, loads in milliseconds. On a small `unlearn-jax
sample` job that import was the largest single start-up cost once the compiled
programs came from the persistent cache.

`load_clip_tokenizer(folder)` returns transformers' `CLIPTokenizer`, exactly as
before, the first time it sees a tokenizer folder. When this process caches
tokenizers (`set_cache_folder`; the CLI does, next to its compilation cache), it
also writes what that tokenizer resolved to: its backend as `tokenizers` JSON,
its special tokens and ids, its window. Every later load of the same files, under
the same transformers and tokenizers versions, is a `CachedClipTokenizer` built
from that JSON without importing transformers. The cache stores transformers'
own resolution of the folder (which special tokens it registered, with which
flags), so nothing of it is re-implemented here; what this module implements is
the call: encoding, truncation and padding of single sequences, and decoding,
the way transformers' CLIPTokenizer does them (tests compare both on many
prompts and several tokenizer configurations). Anything else (pairs of
sequences, other options, other methods) goes to transformers' tokenizer,
imported and loaded from the folder on first use.

The cache holds JSON only. An entry is keyed by the contents of the folder's
tokenizer files and the two libraries' versions; a corrupt entry is ignored and
rewritten.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from unlearn_jax.atomic_files import write_json

# The files transformers reads to build a tokenizer from a folder.
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "config.json",
)
_FORMAT = 2
# transformers' bound above which model_max_length means "no limit" (LARGE_INTEGER).
_NO_LIMIT = int(1e20)
_SPECIALS = ("bos", "eos", "unk", "pad")

_cache_folder: Path | None = None


def set_cache_folder(folder: str | Path | None) -> None:
    """Where `load_clip_tokenizer` keeps resolved tokenizers (None: nowhere, the default)."""
    global _cache_folder
    _cache_folder = None if folder is None else Path(folder)


def cache_folder() -> Path | None:
    """The folder `set_cache_folder` named, or None."""
    return _cache_folder


def _library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cache_key(folder: Path) -> str:
    """Hex digest of the folder's tokenizer files and the tokenizer libraries' versions."""
    digest = hashlib.sha256(f"clip-tokenizer/{_FORMAT}".encode())
    for library in ("transformers", "tokenizers"):
        digest.update(f"\0{library}={_library_version(library)}".encode())
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            data = path.read_bytes()
            digest.update(f"\0{name}:{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def _transformers_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def _entry(tokenizer: Any) -> dict | None:
    """What a transformers CLIPTokenizer resolved to, or None when this module's
    fast path would not reproduce it (another class, cleanup on decode, left
    padding or truncation)."""
    from transformers import CLIPTokenizer

    cleans = tokenizer.clean_up_tokenization_spaces and getattr(
        tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False
    )
    if type(tokenizer) is not CLIPTokenizer or cleans:
        return None
    if tokenizer.padding_side != "right" or tokenizer.truncation_side != "right":
        return None
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:
        return None
    entry = {
        "format": _FORMAT,
        # A string, not nested JSON: SD's backend is 4 MB, parsed once, by the Rust side.
        "backend": backend.to_str(),
        "model_max_length": int(tokenizer.model_max_length),
        "end_of_word_suffix": tokenizer.backend_tokenizer.model.end_of_word_suffix,
    }
    for name in _SPECIALS:
        token = getattr(tokenizer, f"{name}_token")
        entry[f"{name}_token"] = None if token is None else str(token)
        entry[f"{name}_token_id"] = getattr(tokenizer, f"{name}_token_id")
    return entry


def load_clip_tokenizer(folder: str | Path) -> Any:
    """The CLIP tokenizer of a folder (vocab.json, merges.txt, tokenizer_config.json).

    Returns transformers' `CLIPTokenizer`, or, when `set_cache_folder` named a
    cache holding this folder's resolved tokenizer, an equivalent
    `CachedClipTokenizer` (no transformers import).

    Raises:
      whatever `CLIPTokenizer.from_pretrained` raises for a folder it cannot load.
    """
    folder = Path(folder)
    cache = _cache_folder
    path = None
    if cache is not None:
        path = cache / f"{cache_key(folder)}.json"
        try:
            return CachedClipTokenizer(json.loads(path.read_text()), folder)
        except Exception:  # noqa: BLE001 - tokenizers' parse errors are bare Exceptions
            pass  # absent or unreadable: resolve with transformers and (re)write it
    tokenizer = _transformers_tokenizer(folder)
    entry = _entry(tokenizer) if path is not None else None
    if entry is not None:
        try:
            write_json(path, entry)
        except OSError:
            pass  # a read-only cache only costs the next run the import
    return tokenizer


class Encoding(dict):
    """`input_ids` and `attention_mask`, by key or attribute (as transformers' BatchEncoding)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CachedClipTokenizer:
    """transformers' CLIPTokenizer as resolved for one folder, rebuilt from the cache.

    Attributes:
      backend_tokenizer: the `tokenizers.Tokenizer` transformers' tokenizer wraps.
      model_max_length: the text encoder's window (77 for SD).
      bos_token, eos_token, unk_token, pad_token (and their `_id`s): as transformers has them.
      name_or_path: the folder.
    """

    padding_side = "right"
    truncation_side = "right"

    def __init__(self, entry: dict, folder: Path):
        if entry.get("format") != _FORMAT:
            raise ValueError(f"tokenizer cache entry of format {entry.get('format')}")
        self.backend_tokenizer = tokenizers.Tokenizer.from_str(entry["backend"])
        self.model_max_length = entry["model_max_length"]
        self._suffix = entry["end_of_word_suffix"]
        for name in _SPECIALS:
            setattr(self, f"{name}_token", entry[f"{name}_token"])
            setattr(self, f"{name}_token_id", entry[f"{name}_token_id"])
        self.name_or_path = str(folder)
        self._folder = folder
        self._specials = self.backend_tokenizer.num_special_tokens_to_add(is_pair=False)

    def __repr__(self) -> str:
        return f"CachedClipTokenizer({self.name_or_path!r}, {self.model_max_length} tokens)"

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def _transformers(self) -> Any:
        """transformers' tokenizer of the same folder, loaded on first use."""
        if "_full" not in self.__dict__:
            self._full = _transformers_tokenizer(self._folder)
        return self._full

    def __getattr__(self, name: str) -> Any:
        # Everything not implemented here behaves as transformers' tokenizer does.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._transformers(), name)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: Any = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Token ids and attention mask of a prompt or a list of prompts, as transformers'.

        Single sequences with these options run here; pairs, other options and other
        tensor types go to transformers' tokenizer.
        """
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        plan = self._plan(padding, truncation, max_length)
        fast = (
            text_pair is None
            and not kwargs
            and plan is not None
            and return_tensors in (None, "np")
            and all(isinstance(t, str) for t in texts)
            and (batched or isinstance(text, str))
        )
        if not fast:
            full = self._transformers()
            return full(
                text,
                text_pair,
                add_special_tokens=add_special_tokens,
                padding=padding,
                truncation=truncation,
                max_length=max_length,
                return_tensors=return_tensors,
                **kwargs,
            )
        pad_to, truncate_to = plan
        encodings = self.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = []
        for encoding in encodings:
            if truncate_to is not None:
                encoding.truncate(max(truncate_to - add_special_tokens * self._specials, 0))
            if add_special_tokens:
                encoding = self.backend_tokenizer.post_process(encoding)
            ids.append(encoding.ids)
        if pad_to == "longest":
            pad_to = max(len(row) for row in ids)
        masks = [[1] * len(row) for row in ids]
        if pad_to is not None:
            masks = [m + [0] * max(pad_to - len(m), 0) for m in masks]
            ids = [row + [self.pad_token_id] * max(pad_to - len(row), 0) for row in ids]
        if return_tensors == "np":
            return Encoding(input_ids=np.asarray(ids), attention_mask=np.asarray(masks))
        if not batched:
            ids, masks = ids[0], masks[0]
        return Encoding(input_ids=ids, attention_mask=masks)

    def _plan(self, padding, truncation, max_length) -> tuple | None:
        """(pad to: None, 'longest' or a length; truncate to: None or a length), as
        transformers resolves the options; None where this class leaves them to it."""
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # transformers: max_length alone truncates
        if padding in (False, "do_not_pad"):
            pad = None
        elif padding in (True, "longest"):
            pad = "longest"
        elif padding == "max_length":
            pad = "max_length"
        else:
            return None
        if truncation in (None, False, "do_not_truncate"):
            cut = False
        elif truncation in (True, "longest_first", "only_first"):
            cut = True
        else:
            return None
        limit = max_length
        if limit is None and (pad == "max_length" or cut):
            if self.model_max_length > _NO_LIMIT:
                pad = None if pad == "max_length" else pad
                cut = False
            else:
                limit = self.model_max_length
        if pad is not None and (self.pad_token is None or self.pad_token_id is None):
            return None  # transformers raises its own error
        return (limit if pad == "max_length" else pad), (limit if cut else None)

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """Text of token ids, as transformers' CLIPTokenizer decodes them."""
        if kwargs.get("clean_up_tokenization_spaces") or set(kwargs) - {
            "clean_up_tokenization_spaces"
        }:
            return self._transformers().decode(token_ids, skip_special_tokens, **kwargs)
        if isinstance(token_ids, dict):
            token_ids = token_ids["input_ids"]
        ids = [int(token_ids)] if np.ndim(token_ids) == 0 else [int(i) for i in token_ids]
        text = self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace(self._suffix, " ").strip()

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs) -> list:
        return [self.decode(s, skip_special_tokens, **kwargs) for s in sequences]
