"""Prompt sets for Stable-Diffusion-scale experiments, generated from templates.

Every set is a deterministic function of its arguments (no network; a file only
when real COCO captions are given) and comes in five parts plus a label set:

  forget       prompts of the concept to unlearn            -> forget.prompts
  forget_anchors  one anchor per forget prompt, same order  -> forget.anchor_prompts
               (the remap family's c_a: the prompt with the concept replaced or removed)
  retain       prompts to keep, e.g. neighbouring concepts  -> retain.prompts
  eval_forget  held-out phrasings of the concept            -> eval.forget_prompts
  eval_retain  held-out retain prompts, never trained on    -> eval.prompts (integrity)
  labels       class names for a zero-shot forget classifier (CLIP, see
               `metrics.forget_rate.clip_zero_shot_classifier(model, tok, labels, template)`),
               with the concept's index(es) for `forget_rate(..., concept_index)`.

Sets (`SETS`):

  imagenette  forget one of the 10 Imagenette classes ("an image of a tench"),
              retain the other 9 under the same templates; evaluation uses
              templates that are not trained on. Anchors: the class replaced by
              its parent class or a neighbour ("an image of a fish", IMAGENETTE_ANCHORS).
  van_gogh    forget an artist's style ("<subject> in the style of Vincent van
              Gogh"); retain = neighbouring artists over the same subjects (the
              hard retain set); evaluation uses held-out subjects. Anchors: the
              style phrase removed ("a painting of a village church by Vincent van
              Gogh" -> "a painting of a village church").
  coco        COCO-style captions of everyday scenes, written from templates
              here (no COCO caption is copied), or sampled from a real
              `captions_*.json`; a seeded train/eval split, disjoint
              (both made by `data.captions`). No forget part, so no anchors.

`general_retain=N` (CLI `--general N`) adds N COCO-style captions to the retain
set and N others to eval_retain, so integrity is also measured on prompts
unrelated to the concept (captions naming the concept are left out).

Command line (writes forget.txt, forget_anchors.txt, retain.txt, eval_forget.txt,
eval_retain.txt, labels.txt, labels.json and prompt_set.json; files of an empty part
are not written):

  python -m unlearn_jax.data.prompt_sets imagenette --concept tench --general 100 \
      --out prompts/imagenette_tench
  python -m unlearn_jax.data.prompt_sets van_gogh --out prompts/van_gogh
  python -m unlearn_jax.data.prompt_sets coco --num-train 300 --num-eval 100 --seed 0 \
      --out prompts/coco
  # Real COCO captions (annotations/captions_val2017.json from cocodataset.org), local file:
  python -m unlearn_jax.data.prompt_sets coco --coco-captions captions_val2017.json \
      --num-train 1000 --num-eval 500 --out prompts/coco_val2017

An existing output file is only replaced with identical content, unless --force.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from unlearn_jax.data.captions import coco_style_split, read_coco_captions
from unlearn_jax.data.prompt_vocab import (
    IMAGENETTE_ANCHORS,
    IMAGENETTE_CLASSES,
    NEIGHBOUR_ARTISTS,
    OBJECT_EVAL_TEMPLATES,
    OBJECT_LABEL_TEMPLATE,
    OBJECT_TEMPLATES,
    STYLE_ANCHOR_TEMPLATES,
    STYLE_ARTIST,
    STYLE_EVAL_SUBJECTS,
    STYLE_EVAL_TEMPLATES,
    STYLE_LABEL_TEMPLATE,
    STYLE_SUBJECTS,
    STYLE_TEMPLATES,
)


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """A generated prompt set (see the module docstring for the parts).

    Attributes:
      name: the set's name ('imagenette', 'van_gogh', 'coco').
      forget, retain, eval_forget, eval_retain: prompts, in a fixed order.
      forget_anchors: the anchor of each forget prompt (same length and order), or ()
        for a set without anchors.
      labels: class names of the forget classifier's label set (may be empty).
      concept_index: indices into `labels` that count as the concept.
      label_template: text prompt of each label, one '{}' for the label.
      settings: the arguments that made the set (written to prompt_set.json).
    """

    name: str
    forget: tuple[str, ...]
    retain: tuple[str, ...]
    eval_forget: tuple[str, ...] = ()
    eval_retain: tuple[str, ...] = ()
    forget_anchors: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    concept_index: tuple[int, ...] = ()
    label_template: str = OBJECT_LABEL_TEMPLATE
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.forget_anchors and len(self.forget_anchors) != len(self.forget):
            raise ValueError(
                f"{len(self.forget_anchors)} forget anchors for {len(self.forget)} forget "
                "prompts; there must be one anchor per forget prompt"
            )

    def files(self) -> dict[str, str]:
        """{file name: content} of every non-empty part (one prompt per line)."""
        lines = lambda items: "".join(f"{item}\n" for item in items)
        parts = {
            "forget.txt": self.forget,
            "forget_anchors.txt": self.forget_anchors,
            "retain.txt": self.retain,
            "eval_forget.txt": self.eval_forget,
            "eval_retain.txt": self.eval_retain,
            "labels.txt": self.labels,
        }
        out = {name: lines(items) for name, items in parts.items() if items}
        if self.labels:
            labels = {
                "labels": list(self.labels),
                "concept_index": list(self.concept_index),
                "template": self.label_template,
            }
            out["labels.json"] = json.dumps(labels, indent=2, ensure_ascii=False) + "\n"
        counts = {name.removesuffix(".txt"): len(items) for name, items in parts.items()}
        manifest = {"name": self.name, "settings": self.settings, "counts": counts}
        out["prompt_set.json"] = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        return out

    def write(self, out_dir: str | Path, *, force: bool = False) -> dict[str, Path]:
        """Writes `files()` into `out_dir` (created); returns {file name: path}.

        Raises:
          FileExistsError: a file exists with other content and `force` is False.
        """
        out_dir = Path(out_dir)
        files = self.files()
        if not force:
            clashes = [
                name
                for name, text in files.items()
                if (out_dir / name).exists()
                and (out_dir / name).read_text(encoding="utf-8") != text
            ]
            if clashes:
                raise FileExistsError(
                    f"{out_dir} already holds a different {', '.join(clashes)}; refusing to "
                    "replace it. Fix: choose a new --out folder, or pass --force."
                )
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, text in files.items():
            (out_dir / name).write_text(text, encoding="utf-8")
            paths[name] = out_dir / name
        return paths


def with_article(noun: str) -> str:
    """'tench' -> 'a tench', 'English springer' -> 'an English springer' (by first letter)."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _fill(templates: Sequence[str], noun: str) -> list[str]:
    """Each template with `noun`: {a} with its article, {c} bare."""
    return [t.format(a=with_article(noun), c=noun) for t in templates]


def _concept_terms(concept: str) -> list[str]:
    """Words that name a concept in a caption: the phrase and its last word ('Gogh', 'saw')."""
    words = concept.split()
    return [concept] + ([words[-1]] if len(words) > 1 and len(words[-1]) > 3 else [])


def _with_general(
    prompt_set: PromptSet,
    general_retain: int,
    seed: int,
    exclude: Sequence[str],
    coco_captions: str | Path | None,
) -> PromptSet:
    if general_retain <= 0:
        return prompt_set
    if coco_captions is not None:
        train, held_out = read_coco_captions(
            coco_captions, general_retain, general_retain, seed=seed, exclude=exclude
        )
    else:
        train, held_out = coco_style_split(
            general_retain, general_retain, seed=seed, exclude=exclude
        )
    return dataclasses.replace(
        prompt_set,
        retain=prompt_set.retain + tuple(train),
        eval_retain=prompt_set.eval_retain + tuple(held_out),
    )


# ---------------------------------------------------------------------------
# The sets
# ---------------------------------------------------------------------------


def imagenette_objects(
    concept: str = "tench",
    *,
    general_retain: int = 0,
    seed: int = 0,
    coco_captions: str | Path | None = None,
) -> PromptSet:
    """Forget one Imagenette class; retain the other nine.

    forget/retain use OBJECT_TEMPLATES (8 per class), eval_forget/eval_retain the
    held-out OBJECT_EVAL_TEMPLATES (6 per class): 8 forget, 72 retain, 6 eval_forget,
    54 eval_retain prompts, plus `general_retain` COCO-style captions in each retain part.
    forget_anchors: the forget templates filled with the class's IMAGENETTE_ANCHORS
    entry ("a photo of a tench" -> "a photo of a fish").
    Labels: the 10 classes, concept_index the forgotten one.

    Raises:
      ValueError: `concept` is not an Imagenette class (case-insensitive).
    """
    by_name = {c.lower(): c for c in IMAGENETTE_CLASSES}
    if concept.lower() not in by_name:
        raise ValueError(
            f"{concept!r} is not an Imagenette class; choose one of: "
            f"{', '.join(IMAGENETTE_CLASSES)}"
        )
    concept = by_name[concept.lower()]
    others = [c for c in IMAGENETTE_CLASSES if c != concept]
    prompt_set = PromptSet(
        name="imagenette",
        forget=tuple(_fill(OBJECT_TEMPLATES, concept)),
        retain=tuple(p for c in others for p in _fill(OBJECT_TEMPLATES, c)),
        eval_forget=tuple(_fill(OBJECT_EVAL_TEMPLATES, concept)),
        eval_retain=tuple(p for c in others for p in _fill(OBJECT_EVAL_TEMPLATES, c)),
        forget_anchors=tuple(_fill(OBJECT_TEMPLATES, IMAGENETTE_ANCHORS[concept])),
        labels=IMAGENETTE_CLASSES,
        concept_index=(IMAGENETTE_CLASSES.index(concept),),
        label_template=OBJECT_LABEL_TEMPLATE,
        settings=dict(concept=concept, general_retain=general_retain, seed=seed),
    )
    return _with_general(prompt_set, general_retain, seed, _concept_terms(concept), coco_captions)


def artist_style(
    artist: str = STYLE_ARTIST,
    *,
    neighbours: Sequence[str] = NEIGHBOUR_ARTISTS,
    general_retain: int = 0,
    seed: int = 0,
    coco_captions: str | Path | None = None,
) -> PromptSet:
    """Forget `artist`'s style; retain neighbouring artists' styles over the same subjects.

    forget: STYLE_SUBJECTS x STYLE_TEMPLATES (24). retain: each neighbour over
    STYLE_SUBJECTS, the template alternating (12 per artist). eval_forget: the
    held-out STYLE_EVAL_SUBJECTS x STYLE_EVAL_TEMPLATES (16); eval_retain: each
    neighbour over the held-out subjects (8 per artist). forget_anchors: each forget
    prompt with the style phrase removed (STYLE_ANCHOR_TEMPLATES). Labels: the artist
    (index 0) and the neighbours.
    """
    neighbours = [n for n in neighbours if n.lower() != artist.lower()]
    if not neighbours:
        raise ValueError("artist_style needs at least one neighbouring artist for the retain set")

    def prompts(subjects, templates, who):
        return [t.format(s=s, artist=who) for s in subjects for t in templates]

    def rotated(subjects, templates):
        return [
            templates[(i + j) % len(templates)].format(s=s, artist=who)
            for i, who in enumerate(neighbours)
            for j, s in enumerate(subjects)
        ]

    prompt_set = PromptSet(
        name="van_gogh",
        forget=tuple(prompts(STYLE_SUBJECTS, STYLE_TEMPLATES, artist)),
        retain=tuple(rotated(STYLE_SUBJECTS, STYLE_TEMPLATES)),
        eval_forget=tuple(prompts(STYLE_EVAL_SUBJECTS, STYLE_EVAL_TEMPLATES, artist)),
        eval_retain=tuple(rotated(STYLE_EVAL_SUBJECTS, STYLE_EVAL_TEMPLATES)),
        forget_anchors=tuple(prompts(STYLE_SUBJECTS, STYLE_ANCHOR_TEMPLATES, artist)),
        labels=(artist, *neighbours),
        concept_index=(0,),
        label_template=STYLE_LABEL_TEMPLATE,
        settings=dict(
            artist=artist, neighbours=neighbours, general_retain=general_retain, seed=seed
        ),
    )
    return _with_general(prompt_set, general_retain, seed, _concept_terms(artist), coco_captions)


def coco_captions(
    num_train: int = 300,
    num_eval: int = 100,
    *,
    seed: int = 0,
    coco_captions: str | Path | None = None,
) -> PromptSet:
    """General retain captions: retain (train) and eval_retain (held out); no forget part.

    From the COCO-style templates, or from a real COCO captions file when
    `coco_captions` is given (`read_coco_captions`).
    """
    if coco_captions is not None:
        train, held_out = read_coco_captions(coco_captions, num_train, num_eval, seed=seed)
    else:
        train, held_out = coco_style_split(num_train, num_eval, seed=seed)
    settings = dict(num_train=num_train, num_eval=num_eval, seed=seed)
    if coco_captions is not None:
        settings["coco_captions"] = str(Path(coco_captions).name)
    return PromptSet(
        name="coco",
        forget=(),
        retain=tuple(train),
        eval_retain=tuple(held_out),
        settings=settings,
    )


SETS: dict[str, Callable[..., PromptSet]] = {
    "imagenette": imagenette_objects,
    "van_gogh": artist_style,
    "coco": coco_captions,
}


def build(name: str, **kwargs) -> PromptSet:
    """The set `name` of SETS built with `kwargs`; ValueError listing the names otherwise."""
    if name not in SETS:
        raise ValueError(f"unknown prompt set {name!r}; valid: {', '.join(SETS)}")
    return SETS[name](**kwargs)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unlearn_jax.data.prompt_sets",
        description="Write a generated prompt set (forget/retain/eval files and a label set).",
    )
    parser.add_argument("name", choices=sorted(SETS), help="which set")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--concept",
        default=None,
        help="imagenette: the class to forget (default tench); van_gogh: the artist "
        f"(default {STYLE_ARTIST})",
    )
    parser.add_argument(
        "--general",
        type=int,
        default=0,
        help="imagenette/van_gogh: add N COCO-style captions to retain and N to eval_retain",
    )
    parser.add_argument("--num-train", type=int, default=300, help="coco: retain captions")
    parser.add_argument("--num-eval", type=int, default=100, help="coco: held-out captions")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of COCO captions")
    parser.add_argument(
        "--coco-captions",
        type=Path,
        default=None,
        help="a local COCO captions file (e.g. captions_val2017.json) to sample real captions "
        "from instead of the templates",
    )
    parser.add_argument("--force", action="store_true", help="replace differing files in --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    common = dict(seed=args.seed, coco_captions=args.coco_captions)
    if args.name == "coco":
        prompt_set = coco_captions(args.num_train, args.num_eval, **common)
    elif args.name == "imagenette":
        prompt_set = imagenette_objects(
            args.concept or "tench", general_retain=args.general, **common
        )
    else:
        prompt_set = artist_style(
            args.concept or STYLE_ARTIST, general_retain=args.general, **common
        )
    try:
        paths = prompt_set.write(args.out, force=args.force)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
