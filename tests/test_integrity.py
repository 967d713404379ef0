"""The integrity metric: exactly 0 for identical models, growing with the weight change,
and the CLI files that other tools read."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from unlearn_jax import cli
from unlearn_jax.metrics import image_quality, integrity, lpips
from unlearn_jax.models.pipeline import load_pipeline

PROMPTS = ["a red circle", "a blue square on a grey background", "a photo of a cat"]


@pytest.fixture(scope="module")
def distance():
    return lpips.lpips_distance("vgg")


def _perturbed(state: nnx.State, scale: float, seed: int = 0) -> nnx.State:
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


def _compare(pipe, state, perturbed_state, distance) -> integrity.IntegrityResult:
    """The production path of the trainer's evaluator: two image sets, then the metric."""
    settings = integrity.IntegritySettings(seeds=2, steps=4)
    images = [
        integrity.integrity_images(with_unet(pipe, s), PROMPTS, settings, progress=False)
        for s in (state, perturbed_state)
    ]
    return integrity.compare_images(*images, PROMPTS, 2, distance, {"steps": 4})


def with_unet(pipe, state):
    copy = nnx.clone(pipe.unet)
    nnx.update(copy, state)
    return dataclasses.replace(pipe, unet=copy)


def test_identical_models_give_exactly_zero(sd1_folder, distance):
    pipe = load_pipeline(sd1_folder)
    state = nnx.state(pipe.unet)
    result = _compare(pipe, state, state, distance)
    assert result.integrity_lpips == 0.0
    assert result.ci95 == (0.0, 0.0)
    assert np.array_equal(result.original, result.unlearned)
    assert result.ssim == pytest.approx(1.0, abs=1e-6)


def test_integrity_grows_with_weight_perturbation(sd1_folder, distance):
    pipe = load_pipeline(sd1_folder)
    state = nnx.state(pipe.unet)
    values = []
    for scale in (0.003, 0.03, 0.3):
        result = _compare(pipe, state, _perturbed(state, scale), distance)
        lo, hi = result.ci95
        assert lo <= result.integrity_lpips <= hi
        assert len(result.per_prompt) == len(PROMPTS)
        values.append(result.integrity_lpips)
    assert 0 < values[0] < values[1] < values[2], values


def test_bootstrap_interval():
    assert integrity.bootstrap_ci(np.array([0.5])) == (0.5, 0.5)
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 0.1, 400)
    lo, hi = integrity.bootstrap_ci(values)
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert lo < values.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(half_width, rel=0.15)


def test_psnr_and_ssim_against_numpy():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (2, 24, 24, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(image_quality.psnr(x, y), -10 * np.log10(mse), rtol=1e-5)

    # Direct (non-separable) 2-D Gaussian SSIM over the valid region.
    coords = np.arange(11) - 5.0
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def blur(img):
        out = np.zeros((img.shape[0] - 10, img.shape[1] - 10))
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[i, j] = (img[i : i + 11, j : j + 11] * w).sum()
        return out

    expected = []
    for b in range(2):
        per_channel = []
        for c in range(3):
            a, d = x[b, ..., c].astype(np.float64), y[b, ..., c].astype(np.float64)
            ma, md = blur(a), blur(d)
            saa, sdd, sad = blur(a * a) - ma**2, blur(d * d) - md**2, blur(a * d) - ma * md
            c1, c2 = 0.01**2, 0.03**2
            s = ((2 * ma * md + c1) * (2 * sad + c2)) / ((ma**2 + md**2 + c1) * (saa + sdd + c2))
            per_channel.append(s.mean())
        expected.append(np.mean(per_channel))
    np.testing.assert_allclose(image_quality.ssim(x, y), expected, rtol=1e-4)
    np.testing.assert_allclose(image_quality.ssim(x, x), 1.0, rtol=1e-6)


def test_integrity_cli_writes_contract_files(sd1_folder, tmp_path, capsys):
    out = tmp_path / "report"
    cli.main(
        [
            "integrity",
            "--original",
            str(sd1_folder),
            "--unlearned",
            str(sd1_folder),
            "--prompt",
            "a red circle",
            "--prompt",
            "a dog",
            "--seeds",
            "2",
            "--steps",
            "3",
            "--out",
            str(out),
        ]
    )
    report = json.loads((out / "integrity.json").read_text())
    assert report["integrity_lpips"] == 0.0
    assert [p["prompt"] for p in report["per_prompt"]] == ["a red circle", "a dog"]
    pairs = np.load(out / "pairs.npz")
    assert pairs["original"].shape == pairs["unlearned"].shape == (4, 16, 16, 3)
    assert pairs["original"].dtype == np.float32
    assert (out / "grid.png").stat().st_size > 0
    # A second run never overwrites the first one's results.
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        cli.main(
            [
                "integrity",
                "--original",
                str(sd1_folder),
                "--unlearned",
                str(sd1_folder),
                "--prompt",
                "a dog",
                "--out",
                str(out),
            ]
        )


def test_sample_cli_latents_match_generate(sd1_folder, tmp_path):
    noise = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "z.npy", noise)
    cli.main(
        [
            "sample",
            "--model",
            str(sd1_folder),
            "--prompt",
            "a cat",
            "--prompt",
            "a dog",
            "--steps",
            "3",
            "--latents",
            str(tmp_path / "z.npy"),
            "--out",
            str(tmp_path / "s"),
        ]
    )
    images = np.load(tmp_path / "s" / "images.npz")["images"]
    from unlearn_jax.diffusion.chunks import data_mesh
    from unlearn_jax.diffusion.text_to_image import generate

    expected = generate(
        load_pipeline(sd1_folder),
        ["a cat", "a dog"],
        steps=3,
        latents=noise.transpose(0, 2, 3, 1),
        progress=False,
        # The CLI's layout: its batch sharded over every device. When the CLI is this
        # process's first JAX user, it splits the CPU into devices; batch 1 per device
        # rounds differently from batch 2 on one.
        mesh=data_mesh(),
    )
    np.testing.assert_array_equal(images, expected)
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png")) == ["00000.png", "00001.png"]


def test_sample_cli_bad_input(sd1_folder, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(SystemExit, match="no prompts"):
        cli.main(
            [
                "sample",
                "--model",
                str(sd1_folder),
                "--prompts",
                str(tmp_path / "empty.txt"),
                "--out",
                str(tmp_path / "a"),
            ]
        )
    with pytest.raises(SystemExit):
        cli.main(
            [
                "sample",
                "--model",
                str(sd1_folder),
                "--prompt",
                "x",
                "--height",
                "18",
                "--out",
                str(tmp_path / "b"),
            ]
        )
