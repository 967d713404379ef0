"""Generated prompt sets (objects, styles, COCO-style captions) and the SD-scale configs.

No model is needed except in the one slow test, which runs one train step of
configs/sd14_object.py:runlocal on the micro pipeline with a generated set.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tiny_unlearn import REPO

from unlearn_jax.data import captions, prompt_sets
from unlearn_jax.data.anchors import replace_concept
from unlearn_jax.data.prompts import load_prompts
from unlearn_jax.metrics.forget_rate import forget_rate
from unlearn_jax.trainer import experiment
from unlearn_jax.trainer.config_file import load_config
from unlearn_jax.unlearn.registry import PRESETS

PARTS = ("forget", "retain", "eval_forget", "eval_retain")
SD_CONFIGS = ("sd14_object", "sd15_style", "sd21_object")
SETS = {
    "imagenette": lambda: prompt_sets.imagenette_objects("tench", general_retain=20),
    "van_gogh": lambda: prompt_sets.artist_style(general_retain=20),
    "coco": lambda: prompt_sets.coco_captions(200, 50, seed=3),
}


def normalized(prompts):
    return {" ".join(p.lower().split()) for p in prompts}


@pytest.mark.parametrize("name", sorted(SETS))
def test_sets_are_deterministic_and_splits_are_disjoint(name):
    built = SETS[name]()
    assert built == SETS[name]()
    assert built.retain and built.eval_retain
    for part in PARTS:
        prompts = getattr(built, part)
        assert len(set(prompts)) == len(prompts), (part, "duplicates")
        assert all(p == p.strip() and p and "\n" not in p for p in prompts)
    forget, retain = normalized(built.forget), normalized(built.retain)
    eval_forget, eval_retain = normalized(built.eval_forget), normalized(built.eval_retain)
    assert not forget & retain
    assert not eval_retain & (retain | forget)  # held out: never trained on
    assert not eval_forget & (forget | retain)
    assert not eval_retain & eval_forget


def test_imagenette_forgets_one_class_and_keeps_the_other_nine():
    built = prompt_sets.imagenette_objects("English Springer")  # case-insensitive
    assert "an image of an English springer" in built.forget
    assert "a photo of a tench" in built.retain
    assert not any("springer" in p for p in built.retain + built.eval_retain)
    assert all("springer" in p for p in built.forget + built.eval_forget)
    assert (len(built.forget), len(built.retain)) == (8, 72)
    assert (len(built.eval_forget), len(built.eval_retain)) == (6, 54)
    # The label set: the ten classes, the concept's index for forget_rate.
    assert built.labels == prompt_sets.IMAGENETTE_CLASSES
    assert built.labels[built.concept_index[0]] == "English springer"
    one_hot = lambda images: np.eye(10)[[1, 1, 0, 4]]
    assert forget_rate(np.zeros((4, 8, 8, 3)), one_hot, built.concept_index) == 0.5
    with pytest.raises(ValueError, match="not an Imagenette class.*tench"):
        prompt_sets.imagenette_objects("goldfish")


def test_style_set_holds_neighbouring_artists_over_the_same_subjects():
    built = prompt_sets.artist_style()
    assert "a vase of sunflowers in the style of Vincent van Gogh" in built.forget
    assert not any("Gogh" in p for p in built.retain + built.eval_retain)
    for artist in prompt_sets.NEIGHBOUR_ARTISTS:
        mine = [p for p in built.retain if p.endswith(artist)]
        assert len(mine) == len(prompt_sets.STYLE_SUBJECTS)
        assert all(any(s in p for p in mine) for s in prompt_sets.STYLE_SUBJECTS)
    assert not set(prompt_sets.STYLE_SUBJECTS) & set(prompt_sets.STYLE_EVAL_SUBJECTS)
    assert all(
        any(s in p for s in prompt_sets.STYLE_EVAL_SUBJECTS)
        for p in built.eval_forget + built.eval_retain
    )
    assert built.labels[0] == "Vincent van Gogh" and built.concept_index == (0,)
    # Another artist: it leaves the neighbours, and the names follow.
    monet = prompt_sets.artist_style("Claude Monet")
    assert "Claude Monet" not in monet.labels[1:] and "Vincent van Gogh" not in monet.labels


@pytest.mark.parametrize("concept", prompt_sets.IMAGENETTE_CLASSES)
def test_object_anchors_replace_the_class_by_its_parent(concept):
    built = prompt_sets.imagenette_objects(concept, general_retain=5)
    parent = prompt_sets.IMAGENETTE_ANCHORS[concept]
    assert parent.lower() not in {c.lower() for c in prompt_sets.IMAGENETTE_CLASSES}
    assert len(built.forget_anchors) == len(built.forget) == 8
    assert len(set(built.forget_anchors)) == 8
    for prompt, anchor in zip(built.forget, built.forget_anchors):
        # The same prompt with the class (and its article) replaced: Concept Ablation's pair.
        article, parent_article = (
            prompt_sets.with_article(concept),
            prompt_sets.with_article(parent),
        )
        assert anchor == replace_concept(prompt, article, parent_article)
        assert concept.lower() not in anchor.lower()
    tench = prompt_sets.imagenette_objects("tench")
    assert (
        tench.forget[1] == "a photo of a tench" and tench.forget_anchors[1] == "a photo of a fish"
    )
    springer = prompt_sets.imagenette_objects("English springer").forget_anchors
    assert springer[0] == "an image of a dog"


def test_style_anchors_drop_the_style_phrase():
    built = prompt_sets.artist_style()
    assert len(built.forget_anchors) == len(built.forget) == 24
    pairs = dict(zip(built.forget, built.forget_anchors))
    assert pairs["a vase of sunflowers in the style of Vincent van Gogh"] == "a vase of sunflowers"
    assert pairs["a painting of a village church by Vincent van Gogh"] == (
        "a painting of a village church"
    )
    assert not any("Gogh" in a or "style of" in a for a in built.forget_anchors)
    assert not set(built.forget_anchors) & set(built.retain)
    assert prompt_sets.coco_captions(20, 5).forget_anchors == ()
    with pytest.raises(ValueError, match="1 forget anchors for 2 forget prompts"):
        prompt_sets.PromptSet("x", forget=("a", "b"), retain=("c",), forget_anchors=("d",))


def test_general_captions_are_seeded_held_out_and_never_name_the_concept():
    a, b = captions.coco_style_split(100, 40, seed=0), captions.coco_style_split(100, 40)
    assert a == b and not set(a[0]) & set(a[1])
    other = captions.coco_style_split(100, 40, seed=1)
    assert other != a and sorted(other[0] + other[1]) != sorted(a[0] + a[1])
    with pytest.raises(ValueError, match="the templates make"):
        captions.coco_style_split(10_000, 1)
    # Captions naming the concept are left out (whole words).
    kept = captions.coco_style_split(50, 50, exclude=["kite", "bus"])
    assert not any("kite" in c.split() or "bus" in c.split() for c in kept[0] + kept[1])
    mixed = prompt_sets.imagenette_objects("tench", general_retain=30)
    assert len(mixed.retain) == 72 + 30 and len(mixed.eval_retain) == 54 + 30


def fake_coco(path, captions_per_image):
    """A COCO-format captions file: images 0..N-1, five captions each by default."""
    annotations, next_id = [], 0
    for image_id, image_captions in enumerate(captions_per_image):
        for caption in image_captions:
            annotations.append({"image_id": image_id, "id": next_id, "caption": caption})
            next_id += 1
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(len(captions_per_image))]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_coco_captions_reader_on_a_fake_file(tmp_path):
    rows = [[f"A  photo number {i}, variant {j}.\n" for j in range(5)] for i in range(30)]
    rows[7] = ["A tench in a net."] * 5  # names the concept: skipped when excluded
    rows[8] = rows[9] = ["The same caption for two images."] * 5  # one string, one split
    path = fake_coco(tmp_path / "captions_val2017.json", rows)
    train, held_out = captions.read_coco_captions(path, 20, 6, seed=0, exclude=["tench"])
    assert (train, held_out) == captions.read_coco_captions(path, 20, 6, seed=0, exclude=["tench"])
    assert len(train) == 20 and len(held_out) == 6 and not set(train) & set(held_out)
    assert all("  " not in c and not c.endswith(".") for c in train + held_out)
    assert not any("tench" in c for c in train + held_out)
    numbers = lambda caps: {c.split(",")[0] for c in caps if c.startswith("A photo")}
    assert not numbers(train) & numbers(held_out)  # one caption per image, disjoint images
    assert captions.read_coco_captions(path, 20, 6, seed=1) != (train, held_out)
    with pytest.raises(ValueError, match="usable distinct captions"):
        captions.read_coco_captions(path, 25, 5, exclude=["tench"])
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        captions.read_coco_captions(tmp_path / "bad.json", 1, 1)

    # Through the command line, as the general part of an object set.
    out = tmp_path / "tench"
    assert (
        prompt_sets.main(
            ["imagenette", "--general", "3", "--coco-captions", str(path), "--out", str(out)]
        )
        == 0
    )
    retain = load_prompts(out / "retain.txt", "retain.prompts")
    assert len(retain) == 75 and retain[-3:] == train[:3]
    assert json.loads((out / "prompt_set.json").read_text())["counts"]["retain"] == 75


def test_cli_writes_files_the_trainer_loads(tmp_path):
    out = tmp_path / "prompts"
    command = [sys.executable, "-m", "unlearn_jax.data.prompt_sets", "imagenette"]
    command += ["--concept", "golf ball", "--general", "10", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    built = prompt_sets.imagenette_objects("golf ball", general_retain=10)
    names = {p.name for p in out.iterdir()}
    extra = {"forget_anchors.txt", "labels.txt", "labels.json", "prompt_set.json"}
    assert names == {f"{p}.txt" for p in PARTS} | extra
    for part in (*PARTS, "forget_anchors"):
        assert load_prompts(str(out / f"{part}.txt"), part) == list(getattr(built, part))
    manifest = json.loads((out / "prompt_set.json").read_text())
    assert manifest["counts"]["forget_anchors"] == manifest["counts"]["forget"] == 8
    labels = json.loads((out / "labels.json").read_text())
    assert labels["labels"][labels["concept_index"][0]] == "golf ball"
    assert labels["template"].format("golf ball") == "a photo of a golf ball"
    assert (out / "labels.txt").read_text().splitlines() == list(prompt_sets.IMAGENETTE_CLASSES)

    # Re-running is idempotent; different content is refused unless --force.
    again = ["imagenette", "--concept", "golf ball", "--general", "10", "--out", str(out)]
    assert prompt_sets.main(again) == 0
    assert prompt_sets.main(["imagenette", "--concept", "tench", "--out", str(out)]) == 1
    assert prompt_sets.main(["imagenette", "--concept", "tench", "--out", str(out), "--force"]) == 0
    assert load_prompts(out / "forget.txt", "f")[0] == "an image of a tench"

    # The coco set has no forget part: only its retain files (and the manifest).
    prompt_sets.main(
        ["coco", "--num-train", "30", "--num-eval", "10", "--out", str(tmp_path / "c")]
    )
    names = {p.name for p in (tmp_path / "c").iterdir()}
    assert names == {"retain.txt", "eval_retain.txt", "prompt_set.json"}


@pytest.fixture(scope="module")
def prompt_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_prompts")
    prompt_sets.imagenette_objects("tench", general_retain=100).write(root / "imagenette_tench")
    prompt_sets.artist_style(general_retain=100).write(root / "van_gogh")
    objects, styles = root / "imagenette_tench", root / "van_gogh"
    return {"sd14_object": objects, "sd21_object": objects, "sd15_style": styles}


@pytest.mark.parametrize("name", SD_CONFIGS)
def test_sd_configs_load_and_resolve_without_weights(name, prompt_dirs, tmp_path):
    folder = prompt_dirs[name]
    for arg in ("", ":runlocal", ":method=esd_x", ":runlocal,method=salun"):
        config = load_config(f"{REPO / 'configs' / name}.py{arg}")
        method = arg.partition("method=")[2] or "distill_project"
        assert config.unlearn.method == method
        assert config.forget.prompts.endswith("forget.txt")
        assert config.forget.anchor_prompts.endswith("forget_anchors.txt")
        assert config.forget.anchor == ""  # the anchors are per prompt
        assert config.eval.prompts.endswith("eval_retain.txt")  # held out, not the retain set
        if "runlocal" in arg:
            assert config.sample.height is None and config.train.dtype == "float32"
            assert config.train.steps <= 4
        else:
            assert config.sample.height == (768 if name == "sd21_object" else 512)
    # The esd_x preset's own hyperparameters come along.
    assert load_config(f"{REPO / 'configs' / name}.py:method=esd_x").unlearn.hparams.eta == 1.0
    with pytest.raises(ValueError, match="unknown method 'esd'; valid: neggrad"):
        load_config(f"{REPO / 'configs' / name}.py:method=esd")

    # With the model path and the generated prompt folder, the trainer's checks pass.
    for arg in (f":prompts={folder}", f":runlocal,method=esd_x,prompts={folder}"):
        config = load_config(f"{REPO / 'configs' / name}.py{arg}", [("model.path", str(tmp_path))])
        spec = experiment.resolve_run(config)
        assert spec.forget_prompts == load_prompts(folder / "forget.txt", "forget.prompts")
        anchors = load_prompts(folder / "forget_anchors.txt", "forget.anchor_prompts")
        assert spec.anchor_prompts == anchors and len(anchors) == len(spec.forget_prompts)
        assert spec.fingerprint["forget.anchor_prompts"] == anchors
        assert spec.eval_prompts == load_prompts(folder / "eval_retain.txt", "eval.prompts")
        assert spec.eval_forget_prompts == load_prompts(folder / "eval_forget.txt", "f")
        assert not set(spec.eval_prompts) & set(spec.retain_prompts)
        assert spec.preset is PRESETS[config.unlearn.method]
    if name == "sd21_object":
        assert config.train.remat is False  # runlocal
        full = load_config(f"{REPO / 'configs' / name}.py:prompts={folder}")
        assert full.train.remat and full.train.batch_size % full.train.grad_accum == 0
    if name == "sd15_style":
        assert spec.anchor_prompts[3] == "a painting of a vase of sunflowers"
    else:
        assert spec.anchor_prompts[0] == "an image of a fish"


@pytest.mark.slow
def test_one_step_of_sd14_object_runlocal_on_the_micro_model(prompt_dirs, tmp_path):
    from tiny_unlearn import save_micro_pipeline

    from unlearn_jax.trainer.train import train_and_evaluate

    model = save_micro_pipeline(tmp_path / "pipe")
    folder = prompt_dirs["sd14_object"]
    overrides = [
        ("model.path", str(model)),
        ("train.steps", "1"),
        ("train.progress", "false"),
        ("eval.final", "false"),
    ]
    spec = f"{REPO / 'configs' / 'sd14_object'}.py:runlocal,prompts={folder}"
    config = load_config(spec, overrides)
    result = train_and_evaluate(config, tmp_path / "run")
    assert result["step"] == 1 and all(np.isfinite(v) for v in result.values())
