"""Every preset config resolves and yields the batches its terms read; a few run one step.

The resolution checks need no model. The one-step runs compile a train step
each (about a minute on two CPU cores), so they are marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest
from tiny_unlearn import FORGET, REPO, RETAIN, make_config, save_micro_pipeline

from unlearn_jax.data.sources import Latents, Trajectories
from unlearn_jax.trainer import experiment
from unlearn_jax.trainer.batches import SHARED_KEYS, UnlearnData, stream_indices
from unlearn_jax.trainer.config_file import import_config_module, load_config
from unlearn_jax.unlearn.registry import BATCH_KEYS, PRESETS

PRESET_FILES = sorted(PRESETS)
L, D = 5, 6


def test_one_config_per_preset():
    files = {p.stem for p in (REPO / "configs").glob("*.py")}
    assert set(PRESETS) <= files, sorted(set(PRESETS) - files)


def fake_data(preset, n_forget=3, n_retain=4, per_prompt=2, steps=5):
    rng = np.random.default_rng(0)
    data = UnlearnData(
        preset=preset,
        forget_context=rng.normal(size=(len(FORGET), L, D)).astype(np.float32),
        anchor_context=np.zeros((1, L, D), np.float32),
        uncond_context=np.ones((1, L, D), np.float32),
        retain_context=rng.normal(size=(len(RETAIN), L, D)).astype(np.float32),
    )
    index = np.repeat(np.arange(len(FORGET), dtype=np.int32), per_prompt)
    if preset.forget == "esd":
        x_t = rng.normal(size=(index.size, steps, 8, 8, 4)).astype(np.float32)
        data.forget_trajectories = Trajectories(x_t, np.arange(steps, dtype=np.int32)[::-1], index)
    else:
        data.forget_latents = Latents(rng.normal(size=(index.size, 8, 8, 4)), index)
    r_index = np.repeat(np.arange(len(RETAIN), dtype=np.int32), 1)
    data.retain_latents = Latents(rng.normal(size=(r_index.size, 8, 8, 4)), r_index)
    return data


@pytest.mark.parametrize("name", PRESET_FILES)
def test_preset_config_resolves_and_batches_have_the_terms_keys(name, tmp_path):
    for arg in ("", ":runlocal"):
        config = load_config(f"{REPO / 'configs' / name}.py{arg}")
        assert config.unlearn.method == name
    # Only the model and the two prompt sets are needed.
    config = load_config(
        str(REPO / "configs" / f"{name}.py"),
        [
            ("model.path", str(tmp_path)),
            ("forget.prompts", repr(FORGET)),
            ("retain.prompts", repr(RETAIN)),
        ],
    )
    spec = experiment.resolve_run(config)
    preset = PRESETS[name]
    assert spec.preset is preset and spec.params_group == preset.params
    assert spec.fingerprint["unlearn.method"] == name

    data = fake_data(preset)
    batch = data.batch(step=3, batch_size=4, micro_steps=2, seed=0)
    assert set(batch["forget"]) == set(BATCH_KEYS[preset.forget])
    if preset.retain is not None:
        assert set(batch["retain"]) == set(BATCH_KEYS[preset.retain])
    for part, values in batch.items():
        for key, value in values.items():
            want = 1 if key in SHARED_KEYS else 2  # [micro_steps, micro_batch, ...]
            assert value.shape[0] == want, (part, key, value.shape)
    again = data.batch(step=3, batch_size=4, micro_steps=2, seed=0)
    other = data.batch(step=4, batch_size=4, micro_steps=2, seed=0)
    first_key = BATCH_KEYS[preset.forget][0]
    np.testing.assert_array_equal(batch["forget"][first_key], again["forget"][first_key])
    assert not np.array_equal(batch["forget"][first_key], other["forget"][first_key])


def test_stream_indices_are_epochs_of_permutations():
    n, batch = 7, 3
    order = np.concatenate([stream_indices(5, 0, step, batch, n) for step in range(7)])
    for epoch in range(3):
        assert sorted(order[epoch * n : (epoch + 1) * n]) == list(range(n))
    np.testing.assert_array_equal(stream_indices(5, 0, 4, batch, n), order[12:15])
    assert not np.array_equal(
        order[:n], np.concatenate([stream_indices(6, 0, s, batch, n) for s in range(3)])[:n]
    )


def test_base_config_args():
    base = import_config_module(REPO / "configs" / "base.py")
    assert base.get_config("runlocal,method=esd_u").unlearn.method == "esd_u"
    assert base.get_config("runlocal").train.steps < base.get_config().train.steps
    with pytest.raises(ValueError, match="unknown config arg 'fast'"):
        base.get_config("fast")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return save_micro_pipeline(tmp_path_factory.mktemp("micro_presets") / "pipe")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("esd_x", {}),
        ("salun", {"unlearn__params": "attn2"}),
        ("graddiff", {"train__grad_accum": 2, "train__remat": True, "train__dtype": "bfloat16"}),
    ],
)
def test_one_step_of_representative_presets(micro, tmp_path, name, overrides):
    result = experiment_run(micro, tmp_path, name, overrides)
    assert result["step"] == 1
    assert all(np.isfinite(v) for k, v in result.items() if k != "step")


def experiment_run(micro, workdir, name, overrides):
    from unlearn_jax.trainer.train import train_and_evaluate

    return train_and_evaluate(make_config(micro, name, train__steps=1, **overrides), workdir)
