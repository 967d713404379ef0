"""Placeholder prompts for the embedding attack: the concept word out, k learned tokens in.

A template is a prompt split around the places a learned token goes:
"a small red circle on grey" with concept "circle" becomes the parts
("a small red ", " on grey"). `placeholder_ids` tokenizes the parts and puts k
placeholder positions between them, so that the encoder sees
[bos] a small red <v1>..<vk> on grey [eos] [pad]... with v* spliced in at the
placeholders (`objectives.splice_tokens`). CLIP's tokenizer is word-level at
spaces, so tokenizing the parts separately gives the same ids as the whole prompt.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

PLACEHOLDER = "<v*>"  # how a template is shown in reports
Template = tuple[str, ...]


class AttackInputError(ValueError):
    """The attack's prompts or concept cannot be used as given."""


def _concept_pattern(concept: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(concept.strip()) + r"(?!\w)", re.IGNORECASE)


def check_forget_prompts(prompts: Sequence[str], concept: str) -> None:
    """Raises AttackInputError: an empty set, an empty concept, or prompts lacking the concept."""
    prompts = list(prompts)
    if not prompts:
        raise AttackInputError(
            "the forget prompt set is empty: the attack needs the prompts the concept was "
            "erased from. Fix: give a file with one forget prompt per line."
        )
    if not concept.strip():
        raise AttackInputError(
            "no concept given: the embedding attack replaces the concept's word in each "
            "forget prompt by learned tokens. Fix: --concept WORD (e.g. --concept circle)."
        )
    pattern = _concept_pattern(concept)
    missing = [p for p in prompts if not pattern.search(p)]
    if missing:
        shown = ", ".join(repr(p) for p in missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise AttackInputError(
            f"the concept {concept!r} does not occur as a word in {len(missing)} of "
            f"{len(prompts)} forget prompts ({shown}). Fix: pass the concept exactly as the "
            "prompts spell it, or keep only prompts that name it."
        )


def concept_templates(prompts: Sequence[str], concept: str) -> list[Template]:
    """Each prompt split at the concept's whole-word occurrences (case-insensitive)."""
    check_forget_prompts(prompts, concept)
    pattern = _concept_pattern(concept)
    return [tuple(pattern.split(p)) for p in prompts]


def show(template: Template) -> str:
    """The template as text, learned tokens as <v*>."""
    return PLACEHOLDER.join(template)


@dataclasses.dataclass(frozen=True)
class PlaceholderPrompts:
    """Token ids of templates with k placeholder positions per gap.

    Attributes:
      ids: [P, L] int32; placeholder positions hold the tokenizer's bos id (any
        id would do: those embeddings are replaced; bos never moves CLIP's pooling).
      mask: [P, L] bool, True at placeholder positions.
      slot: [P, L] int32, the learned token (0..k-1) at each placeholder, else 0.
      texts: the templates as text, <v*> standing for the k tokens.
    """

    ids: np.ndarray
    mask: np.ndarray
    slot: np.ndarray
    texts: list[str]


def placeholder_ids(tokenizer: Any, templates: Sequence[Template], k: int) -> PlaceholderPrompts:
    """Tokenizes templates with k placeholders in every gap, padded like diffusers does.

    Raises:
      AttackInputError: when a prompt with its placeholders exceeds the tokenizer's window.
    """
    if k < 0:
        raise AttackInputError(f"the number of learned tokens must be >= 0, got {k}")
    length = tokenizer.model_max_length
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = np.full((len(templates), length), pad, np.int32)
    mask = np.zeros((len(templates), length), bool)
    slot = np.zeros((len(templates), length), np.int32)
    for row, parts in enumerate(templates):
        tokens, places, slots = [bos], [False], [0]
        for i, part in enumerate(parts):
            words = tokenizer(part, add_special_tokens=False)["input_ids"] if part.strip() else []
            tokens += words
            places += [False] * len(words)
            slots += [0] * len(words)
            if i < len(parts) - 1:
                tokens += [bos] * k
                places += [True] * k
                slots += list(range(k))
        tokens.append(eos)
        places.append(False)
        slots.append(0)
        if len(tokens) > length:
            raise AttackInputError(
                f"{show(parts)!r} with {k} learned token(s) per {PLACEHOLDER} is {len(tokens)} "
                f"tokens, longer than the text encoder's {length}. Fix: fewer tokens "
                "(--tokens) or shorter prompts."
            )
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = places
        slot[row, : len(tokens)] = slots
    return PlaceholderPrompts(ids, mask, slot, [show(t) for t in templates])


def init_tokens(token_embedding: np.ndarray, tokenizer: Any, word: str, k: int) -> np.ndarray:
    """k copies of a word's input embedding (the mean of its tokens' rows), [k, D] float32.

    Textual inversion starts from a word's embedding; with the concept's own word
    an attack starts exactly at the erased prompt (for a one-token concept and k = 1).
    """
    ids = tokenizer(word, add_special_tokens=False)["input_ids"] if word.strip() else []
    if not ids:
        raise AttackInputError(
            f"the initial word {word!r} has no tokens. Fix: give a word, e.g. the concept."
        )
    row = np.asarray(token_embedding, np.float32)[np.asarray(ids)].mean(axis=0)
    return np.repeat(row[None], k, axis=0)
