"""Prompt sets: the forget set, the retain set and held-out evaluation prompts.

A prompt set is given in a config either as a list of strings or as the path
of a UTF-8 text file with one prompt per line (blank lines and lines starting
with '#' are skipped). The empty prompt is a valid *anchor* but never a member
of a forget or retain set: an empty line in a file is a formatting accident,
not a request to unlearn or keep the unconditional model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

PromptSpec = str | os.PathLike | Sequence[str] | None


class PromptSetError(ValueError):
    """A prompt set is missing, empty or malformed."""


class PromptOverlapWarning(UserWarning):
    """The same prompt is in the forget and the retain set."""


def looks_like_path(text: str) -> bool:
    """A file name rather than a prompt: it exists, has a '/', ends in .txt, or is one word.

    A prompt is words; a single token with no whitespace (`forget_promts`) is far
    more likely a mistyped file name, and taking it as the prompt would train on
    the typo. One one-word prompt is still possible as a list: ['cat'].
    """
    return (
        text.endswith(".txt")
        or os.sep in text
        or Path(text).expanduser().exists()
        or len(text.split()) == 1
    )


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file, one per line; blank and '#' lines skipped, whitespace stripped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PromptSetError(
            f"prompt file {path} does not exist: no such file; to give one prompt, pass a "
            "list. Fix: give a text file with one prompt per line, or a list of prompts in "
            "the config (e.g. --config.forget.prompts=\"['a cat']\")."
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptSetError(
            f"prompt file {path}, line {line}: not UTF-8 text ({e.reason} at byte {e.start}). "
            "Fix: save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None
    lines = text.splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def load_prompts(spec: PromptSpec, what: str) -> list[str]:
    """The prompts a config field names, as a list of non-empty strings, in order.

    Args:
      spec: a list/tuple of prompts, or a path to a text file (one prompt per
        line). A single string that is not an existing file and does not look
        like a path (several words, no '/', no '.txt') is taken as one prompt;
        a single word that names no file is an error (pass ['word'] for that prompt).
      what: the config field, for messages (e.g. 'forget.prompts').
    Raises:
      PromptSetError: the file is missing, or the set is empty or holds an empty prompt.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise PromptSetError(
            f"{what} is empty. Fix: set --config.{what} to a list of prompts or to a text "
            "file with one prompt per line."
        )
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        prompts = read_prompt_file(text) if looks_like_path(text) else [text]
        source = f"file {text}" if looks_like_path(text) else "the config"
    else:
        prompts = [str(p).strip() for p in spec]
        source = "the config"
        if any(not p for p in prompts):
            raise PromptSetError(
                f"{what} holds an empty prompt (entry {prompts.index('')}). Fix: remove it; "
                "the empty prompt is the default anchor (forget.anchor), not a set member."
            )
    if not prompts and source == "the config":
        raise PromptSetError(
            f"{what} is empty. Fix: give at least one prompt, as a list or in a text file."
        )
    if not prompts:
        raise PromptSetError(
            f"{what} ({source}) holds no prompts. Fix: add at least one prompt, one per "
            "line (blank lines and lines starting with '#' are skipped)."
        )
    return prompts


def warn_on_overlap(forget: Iterable[str], retain: Iterable[str]) -> list[str]:
    """Warns (PromptOverlapWarning) when prompts appear in both sets; returns them (sorted).

    Overlap is legal but contradictory: the same prompt is pushed away from
    and held to the original at once, and the integrity metric then measures
    a prompt the method was asked to change.
    """
    normalize = lambda p: " ".join(p.lower().split())
    retained = {normalize(p) for p in retain}
    both = sorted({p for p in forget if normalize(p) in retained})
    if both:
        shown = ", ".join(repr(p) for p in both[:5]) + (" ..." if len(both) > 5 else "")
        warnings.warn(
            f"{len(both)} prompt(s) are in both the forget and the retain set: {shown}. "
            "They are trained to change and to stay the same at once; remove them from "
            "one of the sets.",
            PromptOverlapWarning,
            stacklevel=2,
        )
    return both
