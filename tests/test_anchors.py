"""Anchor prompts of the remap family: concept substitution, resolution, and config errors."""

from __future__ import annotations

import re

import pytest
from tiny_unlearn import FORGET, REPO, RETAIN

from unlearn_jax.data.anchors import (
    AnchorError,
    ConceptNotFoundError,
    replace_concept,
    resolve_anchor_prompts,
)
from unlearn_jax.trainer import experiment
from unlearn_jax.trainer.config_file import load_config

CIRCLES = ["a small red circle on a white background", "A Circle", "CIRCLE on grey"]


@pytest.mark.parametrize(
    "prompt, concept, anchor, want",
    [
        ("a small red circle on a white background", "circle", "square",
         "a small red square on a white background"),
        ("A Circle", "circle", "square", "A Square"),
        ("CIRCLE on grey", "circle", "square", "SQUARE on grey"),
        ("a circle, then a circle.", "circle", "square", "a square, then a square."),
        ("a circle-shaped clock", "circle", "square", "a square-shaped clock"),
        ("a photo of a grumpy cat", "grumpy cat", "dog", "a photo of a dog"),
        ("a photo of a grumpy   cat", "Grumpy Cat", "dog", "a photo of a dog"),
        ("Grumpy Cat on a sofa", "grumpy cat", "big dog", "Big Dog on a sofa"),
        ("Grumpy cat on a sofa", "grumpy cat", "big dog", "Big dog on a sofa"),
        # Written exactly like the concept: the anchor exactly as written.
        ("a painting by Vincent van Gogh", "Vincent van Gogh", "Claude Monet",
         "a painting by Claude Monet"),
        ("a painting by vincent van gogh", "Vincent van Gogh", "Claude Monet",
         "a painting by claude monet"),
        ("a (circle)", "circle", "square", "a (square)"),
    ],
)  # fmt: skip
def test_replace_concept_whole_words_case_kept(prompt, concept, anchor, want):
    assert replace_concept(prompt, concept, anchor) == want


@pytest.mark.parametrize("prompt", ["three circles", "a semicircle", "circled", "a c.ircle"])
def test_replace_concept_needs_whole_words(prompt):
    with pytest.raises(ConceptNotFoundError, match=f"{prompt!r}.*reword.*forget.anchor_prompts"):
        replace_concept(prompt, "circle", "square")


def test_the_default_and_a_single_anchor_are_shared():
    assert resolve_anchor_prompts(CIRCLES) == ["", "", ""]
    assert resolve_anchor_prompts(CIRCLES, anchor=" square ") == ["square"] * 3
    # concept alone (it also names the concept for the forget classifier) changes nothing.
    assert resolve_anchor_prompts(CIRCLES, anchor="square", concept="circle") == ["square"] * 3
    assert resolve_anchor_prompts(CIRCLES, concept="circle") == [""] * 3


def test_concept_swap_and_explicit_lists_and_files(tmp_path):
    want = ["a small red square on a white background", "A Square", "SQUARE on grey"]
    got = resolve_anchor_prompts(CIRCLES, concept="circle", anchor_concept="square")
    assert got == want
    # A list may hold the empty prompt on purpose.
    listed = resolve_anchor_prompts(CIRCLES, anchor_prompts=["a square", "", " a ring "])
    assert listed == ["a square", "", "a ring"]
    path = tmp_path / "anchors.txt"
    path.write_text("# anchors\na square\n\na ring\na star\n", encoding="utf-8")
    assert resolve_anchor_prompts(CIRCLES, anchor_prompts=str(path)) == [
        "a square",
        "a ring",
        "a star",
    ]
    assert resolve_anchor_prompts(CIRCLES, anchor_prompts=path) == ["a square", "a ring", "a star"]
    # "" (an override that clears the field) is no list.
    assert resolve_anchor_prompts(CIRCLES, anchor_prompts="", anchor="x") == ["x"] * 3


def test_concept_missing_names_the_prompts_and_the_fix():
    prompts = ["a red circle", "three circles", "a semicircle"]
    with pytest.raises(ConceptNotFoundError) as info:
        resolve_anchor_prompts(prompts, concept="circle", anchor_concept="square")
    message = str(info.value)
    assert "2 of 3 forget prompt(s)" in message
    assert "'three circles'" in message and "'a semicircle'" in message
    assert "'a red circle'" not in message
    assert "reword" in message and "forget.anchor_prompts" in message
    assert isinstance(info.value, ValueError)


def test_wrong_length_names_both_counts_and_the_file(tmp_path):
    path = tmp_path / "anchors.txt"
    path.write_text("a square\n\na ring\n", encoding="utf-8")  # the blank line is skipped
    with pytest.raises(AnchorError) as info:
        resolve_anchor_prompts(CIRCLES, anchor_prompts=str(path))
    message = str(info.value)
    assert f"file {path}" in message and "holds 2 anchor(s)" in message
    assert "forget.prompts holds 3 prompt(s)" in message
    assert "Blank lines" in message and "give a list" in message
    with pytest.raises(AnchorError, match=r"the config\) holds 1 anchor\(s\) but .* 3 prompt"):
        resolve_anchor_prompts(CIRCLES, anchor_prompts=["a square"])
    with pytest.raises(AnchorError, match="holds 0 anchor"):
        resolve_anchor_prompts(CIRCLES, anchor_prompts=[])
    with pytest.raises(AnchorError, match=r"forget.anchor_prompts file .*missing.txt does not"):
        resolve_anchor_prompts(CIRCLES, anchor_prompts=str(tmp_path / "missing.txt"))


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(anchor="square", anchor_prompts=["a", "b", "c"]),
         r"forget.anchor='square' .* and forget.anchor_prompts .* both set.*Fix"),
        (dict(anchor="square", concept="circle", anchor_concept="ring"),
         r"forget.anchor='square' .* and forget.anchor_concept .* both set.*Fix"),
        (dict(anchor_prompts=["a", "b", "c"], concept="circle", anchor_concept="ring"),
         "forget.anchor_prompts and forget.anchor_concept are both set.*Fix"),
        (dict(anchor_concept="square"), "forget.concept is empty.*Fix: set --config.forget"),
        (dict(concept="circle", anchor_concept=" CIRCLE"), "equals forget.concept.*Fix"),
        (dict(anchor_prompts=["x", "a  Circle", "y"]),
         r"1 anchor\(s\) equal their forget prompt \(1: 'A Circle'\).*Fix"),
    ],
)  # fmt: skip
def test_conflicting_fields_are_refused(fields, match):
    with pytest.raises(AnchorError, match=match):
        resolve_anchor_prompts(CIRCLES, **fields)


# ---------------------------------------------------------------- through resolve_run


def config(tmp_path, **fields):
    overrides = [
        ("model.path", str(tmp_path)),
        ("forget.prompts", repr(FORGET)),
        ("retain.prompts", repr(RETAIN)),
    ]
    overrides += [(k.replace("__", "."), v) for k, v in fields.items()]
    return load_config(str(REPO / "configs" / "distill.py"), overrides)


def test_resolve_run_carries_one_anchor_per_forget_prompt(tmp_path):
    spec = experiment.resolve_run(config(tmp_path))
    assert spec.anchor_prompts == ["", ""]
    assert "forget.anchor_prompts" not in spec.fingerprint  # workdirs of older runs resume
    assert spec.fingerprint["forget.anchor"] == ""
    spec = experiment.resolve_run(config(tmp_path, forget__anchor="a shape"))
    assert spec.anchor_prompts == ["a shape", "a shape"]
    assert "forget.anchor_prompts" not in spec.fingerprint
    # forget.concept alone (the forget classifier's concept) leaves everything as it was.
    plain = experiment.resolve_run(config(tmp_path, forget__concept="circle"))
    assert plain.anchor_prompts == ["", ""]
    assert plain.fingerprint == experiment.resolve_run(config(tmp_path)).fingerprint

    circles = repr(["a red circle", "a Circle on grey"])
    swapped = experiment.resolve_run(
        config(
            tmp_path,
            forget__prompts=circles,
            forget__concept="circle",
            forget__anchor_concept="square",
        )
    )
    assert swapped.anchor_prompts == ["a red square", "a Square on grey"]
    assert swapped.fingerprint["forget.anchor_prompts"] == swapped.anchor_prompts
    assert swapped.fingerprint["forget.anchor"] == ""
    listed = experiment.resolve_run(config(tmp_path, forget__anchor_prompts="['a dog', '']"))
    assert listed.anchor_prompts == ["a dog", ""]
    assert listed.fingerprint["forget.anchor_prompts"] == ["a dog", ""]
    path = tmp_path / "anchors.txt"
    path.write_text("a blue ring\na photo of a dog\n", encoding="utf-8")
    from_file = experiment.resolve_run(config(tmp_path, forget__anchor_prompts=str(path)))
    assert from_file.anchor_prompts == ["a blue ring", "a photo of a dog"]


def test_resolve_run_refuses_bad_anchors_with_a_fix(tmp_path):
    with pytest.raises(ConceptNotFoundError, match="1 of 2 .*'a photo of a cat'.*reword"):
        experiment.resolve_run(
            config(tmp_path, forget__concept="circle", forget__anchor_concept="square")
        )
    path = tmp_path / "anchors.txt"
    path.write_text("a blue ring\n", encoding="utf-8")
    with pytest.raises(AnchorError, match=f"file {re.escape(str(path))}.* 1 anchor.* 2 prompt"):
        experiment.resolve_run(config(tmp_path, forget__anchor_prompts=str(path)))
    with pytest.raises(AnchorError, match="forget.anchor='square' .* both set"):
        experiment.resolve_run(
            config(
                tmp_path,
                forget__anchor="square",
                forget__concept="circle",
                forget__anchor_concept="ring",
            )
        )
    with pytest.raises(AnchorError, match="forget.concept is empty"):
        experiment.resolve_run(config(tmp_path, forget__anchor_concept="square"))
