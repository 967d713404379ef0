"""Anchor prompts c_a of the remap family: one per forget prompt, as Concept Ablation pairs them.

The remap term regresses ε_θ(x_t^f, t, c_f) onto sg[ε_θ'(x_t^f, t, c_a(c_f))]. The
anchor should differ from its forget prompt in the concept only: a bare word
("square") or the empty prompt says nothing about colour, size or background,
so θ0's prediction for it on a noised forget image largely keeps the forget
image (measured on the embedded world: distill with one shared anchor "square"
stalls at a 48% forget rate, with "a small red circle on a white background" ->
"a small red square on a white background" it reaches 0% at integrity LPIPS 0.05).

Three ways to set them (config section `forget`), resolved by
`resolve_anchor_prompts`:

  anchor                    one prompt for every forget prompt ("" = the empty
                            prompt, the default; the behaviour before per-prompt anchors)
  anchor_prompts            a list, or a text file with one anchor per line, in the
                            order of forget.prompts (same length)
  concept + anchor_concept  each forget prompt with the concept's whole words replaced,
                            case kept: "a Circle" -> "a Square" (`replace_concept`)

`concept` alone changes nothing here (it also names the concept for the
forget-rate classifier).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from unlearn_jax.data.prompts import PromptSpec, looks_like_path, read_prompt_file

_SHOWN = 3  # offending prompts named in a message


class AnchorError(ValueError):
    """The anchor fields of a config are inconsistent, or do not fit the forget prompts."""


class ConceptNotFoundError(AnchorError):
    """A forget prompt does not contain forget.concept as whole word(s)."""


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def concept_pattern(concept: str) -> re.Pattern:
    """The regex matching `concept` as whole word(s), any case, any run of spaces between words.

    A word boundary is any non-word character or the string's end: "circle" matches in
    "a circle.", "circle-shaped" and "the circle's edge", not in "circles" or "semicircle".
    """
    words = concept.split()
    if not words:
        raise AnchorError("forget.concept is empty; nothing to replace")
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def _capitalized(word: str) -> str:
    return word[:1].upper() + word[1:]


def _with_case_of(found: str, concept: str, anchor_concept: str) -> str:
    """`anchor_concept` written in the case of `found` (a match of `concept` in a prompt)."""
    if found == concept:  # as the user wrote both: take the anchor as written
        return anchor_concept
    if found.isupper():
        return anchor_concept.upper()
    if found.islower():
        return anchor_concept.lower()
    words = found.split()
    if len(words) > 1 and all(w[:1].isupper() for w in words):  # "Grumpy Cat" -> "Big Dog"
        return " ".join(_capitalized(w) for w in anchor_concept.split())
    if found[:1].isupper():  # "Circle" -> "Square"
        return _capitalized(anchor_concept)
    return anchor_concept


def replace_concept(prompt: str, concept: str, anchor_concept: str) -> str:
    """`prompt` with every whole-word occurrence of `concept` replaced by `anchor_concept`.

    Matching ignores case and the amount of whitespace between a multi-word
    concept's words; the replacement takes the case of what it replaces:
    "circle"->"square", "Circle"->"Square", "CIRCLE"->"SQUARE" (and a match
    written exactly like `concept` gets `anchor_concept` exactly as written).

    Raises:
      ConceptNotFoundError: `prompt` does not contain `concept` as whole word(s).
    """
    pattern = concept_pattern(concept)
    anchor, count = pattern.subn(
        lambda m: _with_case_of(m.group(0), " ".join(concept.split()), anchor_concept), prompt
    )
    if not count:
        raise ConceptNotFoundError(
            f"forget prompt {prompt!r} does not contain forget.concept {concept!r} as whole "
            "word(s) (e.g. 'circles' or 'semicircle' do not count for 'circle'). Fix: reword "
            "the prompt so that it names the concept, or give the anchors explicitly with "
            "forget.anchor_prompts (one per forget prompt)."
        )
    return anchor


def _load_anchor_list(spec: PromptSpec) -> tuple[list[str], str]:
    """(anchors, where they came from) of forget.anchor_prompts: a list, a file or one prompt."""
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if looks_like_path(text):
            path = Path(text).expanduser()
            if not path.is_file():
                raise AnchorError(
                    f"forget.anchor_prompts file {path} does not exist. Fix: give a text file "
                    "with one anchor per forget prompt (`python -m unlearn_jax.data.prompt_sets` "
                    "writes forget_anchors.txt beside forget.txt), a list in the config, or "
                    "--config.forget.anchor_prompts='' to use forget.anchor for every prompt."
                )
            return read_prompt_file(path), f"file {path}"
        return [text.strip()], "the config"
    # In a list the empty prompt is a legitimate anchor (written on purpose).
    return [str(a).strip() for a in spec], "the config"


def _explicit_anchors(forget_prompts: Sequence[str], spec: PromptSpec) -> list[str]:
    anchors, source = _load_anchor_list(spec)
    if len(anchors) != len(forget_prompts):
        hint = ""
        if source.startswith("file"):
            hint = (
                " Blank lines and lines starting with '#' are skipped in a prompt file, so an "
                "empty anchor cannot be written there: give a list in the config for that "
                "(e.g. --config.forget.anchor_prompts=\"['a dog', '']\")."
            )
        raise AnchorError(
            f"forget.anchor_prompts ({source}) holds {len(anchors)} anchor(s) but "
            f"forget.prompts holds {len(forget_prompts)} prompt(s); they pair one to one, in "
            f"order. Fix: give exactly one anchor per forget prompt.{hint}"
        )
    pairs = enumerate(zip(forget_prompts, anchors))
    same = [i for i, (prompt, anchor) in pairs if _normalized(prompt) == _normalized(anchor)]
    if same:
        shown = ", ".join(f"{i}: {forget_prompts[i]!r}" for i in same[:_SHOWN])
        raise AnchorError(
            f"forget.anchor_prompts ({source}): {len(same)} anchor(s) equal their forget prompt "
            f"({shown}{' ...' if len(same) > _SHOWN else ''}); the remap target would be the "
            "concept itself. Fix: write each anchor as its forget prompt with the concept "
            "replaced (or removed)."
        )
    return anchors


def resolve_anchor_prompts(
    forget_prompts: Sequence[str],
    *,
    anchor: str = "",
    anchor_prompts: PromptSpec = None,
    concept: str = "",
    anchor_concept: str = "",
) -> list[str]:
    """The anchor c_a of each forget prompt, in the order of `forget_prompts`.

    Args:
      forget_prompts: the forget set [Pf].
      anchor: forget.anchor, one anchor for all ("" = the empty prompt).
      anchor_prompts: forget.anchor_prompts: None, a list of Pf anchors (entries may
        be "" = the empty prompt), or a text file with one anchor per line.
      concept, anchor_concept: forget.concept / forget.anchor_concept; with both set,
        anchor i = `replace_concept(forget_prompts[i], concept, anchor_concept)`.
    Returns:
      [Pf] anchors (all equal to `anchor` unless per-prompt anchors are given).
    Raises:
      AnchorError: conflicting fields, a list/file of the wrong length, an anchor equal
        to its forget prompt, anchor_concept without concept or equal to it;
        ConceptNotFoundError (a subclass) for forget prompts without the concept.
    """
    anchor = (anchor or "").strip()
    concept, anchor_concept = (concept or "").strip(), (anchor_concept or "").strip()
    has_list = _given(anchor_prompts)
    if anchor and (has_list or anchor_concept):
        other = "forget.anchor_prompts" if has_list else "forget.anchor_concept"
        raise AnchorError(
            f"forget.anchor={anchor!r} (one anchor for every forget prompt) and {other} "
            "(one per forget prompt) are both set. Fix: keep one of them, e.g. "
            "--config.forget.anchor='' to use the per-prompt anchors."
        )
    if has_list and anchor_concept:
        raise AnchorError(
            "forget.anchor_prompts and forget.anchor_concept are both set, and both make one "
            "anchor per forget prompt. Fix: keep one of them (e.g. "
            "--config.forget.anchor_concept='' to use the listed anchors)."
        )
    if has_list:
        return _explicit_anchors(forget_prompts, anchor_prompts)
    if not anchor_concept:
        return [anchor] * len(forget_prompts)  # concept alone does not touch the anchors
    if not concept:
        raise AnchorError(
            f"forget.anchor_concept={anchor_concept!r} is set but forget.concept is empty: "
            "there is nothing to replace. Fix: set --config.forget.concept to the words to "
            "forget as they appear in the forget prompts (e.g. 'circle')."
        )
    if _normalized(concept) == _normalized(anchor_concept):
        raise AnchorError(
            f"forget.anchor_concept={anchor_concept!r} equals forget.concept={concept!r}: every "
            "anchor would be its own forget prompt. Fix: choose a different anchor concept "
            "(a parent class or a neighbour, e.g. 'dog' for 'grumpy cat')."
        )
    anchors, missing = [], []
    for prompt in forget_prompts:
        try:
            anchors.append(replace_concept(prompt, concept, anchor_concept))
        except ConceptNotFoundError:
            missing.append(prompt)
    if missing:
        shown = ", ".join(repr(p) for p in missing[:_SHOWN])
        raise ConceptNotFoundError(
            f"{len(missing)} of {len(forget_prompts)} forget prompt(s) do not contain "
            f"forget.concept {concept!r} as whole word(s): {shown}"
            f"{' ...' if len(missing) > _SHOWN else ''} ('circles' or 'semicircle' do not count "
            "for 'circle'). Fix: reword those prompts so that they name the concept, or give "
            "the anchors explicitly with forget.anchor_prompts (one per forget prompt)."
        )
    return anchors


def _given(anchor_prompts: PromptSpec) -> bool:
    # None and "" (an override that clears the field) both mean: not set.
    if isinstance(anchor_prompts, str):
        return bool(anchor_prompts.strip())
    return anchor_prompts is not None


def uses_prompt_anchors(anchor_prompts: PromptSpec, anchor_concept: str | None) -> bool:
    """Whether forget.anchor_prompts / forget.anchor_concept ask for per-prompt anchors."""
    return _given(anchor_prompts) or bool((anchor_concept or "").strip())
