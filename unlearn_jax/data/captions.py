"""General-purpose captions: COCO-style captions made from templates, and real COCO files.

`coco_style_captions` writes everyday-scene captions from the templates of
`prompt_vocab` (no COCO caption is copied); `coco_style_split` and
`read_coco_captions` draw seeded, disjoint (train, eval) lists from them or
from a local `captions_*.json`, leaving out captions that name given terms.
`prompt_sets` uses them as general retain prompts and as the `coco` set.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unlearn_jax.data.prompt_vocab import PEOPLE, SCENES


def mentions(text: str, terms: Sequence[str]) -> bool:
    """Whether `text` names any of `terms` (case-insensitive, whole words)."""
    return any(re.search(rf"\b{re.escape(t.lower())}\b", text.lower()) for t in terms)


def coco_style_captions() -> list[str]:
    """Every caption the COCO-style templates make, sorted and unique (about 1,500).

    Three forms per scene: '<person> <action> <place>', '<thing> <place>' and
    '<person> <action> next to <thing>'.
    """
    captions = set()
    for scene in SCENES.values():
        places, actions, things = scene["places"], scene["actions"], scene["things"]
        for person, action, place in itertools.product(PEOPLE, actions, places):
            captions.add(f"{person} {action} {place}")
        for thing, place in itertools.product(things, places):
            captions.add(f"{thing} {place}")
        for person, action, thing in itertools.product(PEOPLE[::2], actions, things):
            captions.add(f"{person} {action} next to {thing}")
    return sorted(captions)


def coco_style_split(
    num_train: int, num_eval: int, *, seed: int = 0, exclude: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """(train, eval) COCO-style captions: a seeded permutation, disjoint, in permutation order.

    Captions naming any of `exclude` (whole words, case-insensitive) are left out first.

    Raises:
      ValueError: more captions asked for than the templates make.
    """
    pool = [c for c in coco_style_captions() if not mentions(c, exclude)]
    if num_train < 0 or num_eval < 0 or num_train + num_eval > len(pool):
        raise ValueError(
            f"asked for {num_train} + {num_eval} COCO-style captions; the templates make "
            f"{len(pool)}. Fix: ask for fewer, or give real captions with --coco-captions."
        )
    order = np.random.default_rng(seed).permutation(len(pool))
    picked = [pool[i] for i in order[: num_train + num_eval]]
    return picked[:num_train], picked[num_train:]


def _normalize_caption(text: str) -> str:
    return " ".join(str(text).split()).rstrip(" .")


def read_coco_captions(
    path: str | Path,
    num_train: int,
    num_eval: int,
    *,
    seed: int = 0,
    exclude: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """(train, eval) captions sampled from a COCO captions file (`captions_*2017.json`).

    One caption per image (chosen with the seed), images in a seeded order; the
    first `num_train` usable images give the train captions, the next ones the
    eval captions, so the two never share an image nor a caption string.
    Captions are whitespace-normalized without the final period; captions
    naming any of `exclude` (whole words, case-insensitive) are skipped.

    Raises:
      ValueError: the file has no 'annotations' list, or too few usable captions.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise ValueError(
            f"{path} is not a COCO captions file: no 'annotations' list (expected e.g. "
            "annotations/captions_val2017.json)"
        )
    by_image: dict[Any, list[tuple[Any, str]]] = {}
    for ann in annotations:
        caption = _normalize_caption(ann.get("caption", ""))
        if caption and not caption.startswith("#") and not mentions(caption, exclude):
            by_image.setdefault(ann["image_id"], []).append((ann.get("id", 0), caption))
    rng = np.random.default_rng(seed)
    images = sorted(by_image)
    train: list[str] = []
    held_out: list[str] = []
    seen: set[str] = set()
    for i in rng.permutation(len(images)):
        options = sorted(by_image[images[i]])
        caption = options[int(rng.integers(len(options)))][1]
        if caption.lower() in seen:
            continue
        seen.add(caption.lower())
        if len(train) < num_train:
            train.append(caption)
        elif len(held_out) < num_eval:
            held_out.append(caption)
        else:
            break
    if len(train) < num_train or len(held_out) < num_eval:
        raise ValueError(
            f"{path} holds {len(train) + len(held_out)} usable distinct captions; asked for "
            f"{num_train} + {num_eval}. Fix: ask for fewer."
        )
    return train, held_out
