"""Bad input to the trainer fails fast, before any compilation, with a message naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_unlearn import REPO, make_config, save_micro_pipeline

from unlearn_jax.data.prompts import PromptOverlapWarning, PromptSetError
from unlearn_jax.trainer import experiment
from unlearn_jax.trainer.config_file import load_config
from unlearn_jax.trainer.train import train_and_evaluate


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return save_micro_pipeline(tmp_path_factory.mktemp("micro_inputs") / "pipe")


def test_unknown_method_lists_the_valid_ones(micro, tmp_path):
    cfg = make_config(micro, unlearn__method="forget_everything")
    with pytest.raises(ValueError, match=r"unknown unlearning method.*esd_x.*distill_project"):
        train_and_evaluate(cfg, tmp_path)
    assert not (tmp_path / "run.json").exists()  # nothing written for a bad config


@pytest.mark.parametrize(
    ("group", "message"),
    [("attn7", r"selects none.*full, xattn, noxattn"), ("attn2(", "nor a valid regex")],
)
def test_unknown_parameter_group(micro, tmp_path, group, message):
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(make_config(micro, unlearn__params=group), tmp_path)
    assert not (tmp_path / "run.json").exists()


def test_empty_and_missing_prompt_sets(micro, tmp_path):
    with pytest.raises(PromptSetError, match="forget.prompts is empty"):
        experiment.resolve_run(make_config(micro, forget__prompts="[]"))
    empty = tmp_path / "forget.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(PromptSetError, match="holds no prompts"):
        experiment.resolve_run(make_config(micro, forget__prompts=str(empty)))
    with pytest.raises(PromptSetError, match="does not exist"):
        experiment.resolve_run(make_config(micro, retain__prompts=str(tmp_path / "none.txt")))
    cfg = make_config(micro)
    cfg.model.path = None
    with pytest.raises(ValueError, match="model.path is not set"):
        experiment.resolve_run(cfg)


def test_prompt_file_and_overlap_warning(micro, tmp_path):
    retain = tmp_path / "retain.txt"
    retain.write_text("a blue square\n\n# held\nA  Red circle\n")
    with pytest.warns(PromptOverlapWarning, match="1 prompt.*'a red circle'"):
        spec = experiment.resolve_run(make_config(micro, retain__prompts=str(retain)))
    assert spec.retain_prompts == ["a blue square", "A  Red circle"]


def test_forget_only_methods_need_no_retain_set(micro):
    cfg = make_config(micro, "esd_x")
    cfg.retain.prompts = None
    spec = experiment.resolve_run(cfg)
    assert spec.retain_prompts == [] and spec.params_group == "xattn"


def test_bad_config_values(micro, tmp_path):
    with pytest.raises(ValueError, match="optim.name 'lion' is unknown"):
        train_and_evaluate(make_config(micro, optim__name="lion"), tmp_path / "a")
    assert not (tmp_path / "a" / "run.json").exists()
    with pytest.raises(ValueError, match="multiple of train.grad_accum"):
        experiment.resolve_run(make_config(micro, train__batch_size=3, train__grad_accum=2))
    with pytest.raises(ValueError, match="unlearn.hparams has unknown field"):
        cfg = make_config(micro)
        cfg.unlearn.hparams.nonsense = 1.0
        experiment.resolve_run(cfg)
    with pytest.raises(ValueError, match="no field 'optim.learning_rate'"):
        load_config(str(REPO / "configs/base.py"), [("optim.learning_rate", "1e-4")])
    with pytest.raises(ValueError, match="expected a bool"):
        load_config(str(REPO / "configs/base.py"), [("train.remat", "maybe")])
