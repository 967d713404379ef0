"""DPM-Solver++(2M) and Euler against diffusers' PyTorch schedulers, step by step and end to end."""

from __future__ import annotations

import json
import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unlearn_jax import cli, command_args
from unlearn_jax.diffusion import (
    SCHEDULERS,
    dpm_solver_schedule,
    euler_schedule,
    make_plan,
    sample,
    text_to_image,
)
from unlearn_jax.diffusion.chunks import data_mesh
from unlearn_jax.metrics import lpips
from unlearn_jax.models.pipeline import load_pipeline

diffusers.utils.logging.set_verbosity_error()  # from_config warns about PNDM-only keys

# Stable Diffusion 1.x's PNDM config, as users swap other schedulers in with from_config.
SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}
REFERENCE = {
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
}
# None: no timestep_spacing in the file, so the solver's own default
# ('linspace') applies, not DDIM's ('leading').
SPACINGS = (None, "leading", "trailing", "linspace")
SOLVERS = tuple(REFERENCE)


def _config(spacing: str | None = None, **options) -> dict:
    config = {**SD_CONFIG, **options}
    if spacing is not None:
        config["timestep_spacing"] = spacing
    return config


def _reference(solver: str, config: dict, steps: int):
    scheduler = REFERENCE[solver].from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [1, 7, 25, 50])
def test_timesteps_and_sigmas_match_diffusers(solver, spacing, karras, steps):
    config = _config(spacing, use_karras_sigmas=karras)
    ref = _reference(solver, config, steps)
    if solver == "dpmpp_2m":
        timesteps, sigmas, _ = dpm_solver_schedule(config, steps)
        np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
    else:
        timesteps, sigmas, init_noise_sigma, _ = euler_schedule(config, steps)
        assert timesteps.dtype == np.float32
        # Fractional Karras timesteps interpolate log sigma; torch's sqrt is 1 ulp off.
        np.testing.assert_allclose(timesteps, ref.timesteps.numpy(), rtol=0, atol=2e-4)
        np.testing.assert_allclose(init_noise_sigma, float(ref.init_noise_sigma), rtol=3e-7)
    assert sigmas.dtype == np.float32 and sigmas[-1] == 0.0
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=3e-7, atol=0)


# (solver, prediction_type, spacing, karras, steps, extra config); steps >= 15 and
# final_sigmas_type='sigma_min' make DPM-Solver's last step second order.
STEP_CASES = [
    (solver, prediction, spacing, karras, steps, {})
    for solver in SOLVERS
    for prediction in ("epsilon", "v_prediction")
    for spacing, steps in (("leading", 10), ("trailing", 16), ("linspace", 25))
    for karras in (False, True)
] + [
    ("dpmpp_2m", "epsilon", "leading", False, 16, {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", "epsilon", "leading", False, 8, {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", "sample", None, False, 6, {}),
    ("euler", "epsilon", "linspace", False, 12, {"final_sigmas_type": "sigma_min"}),
    ("euler", "v_prediction", "trailing", False, 12, {"rescale_betas_zero_snr": True}),
    ("dpmpp_2m", "v_prediction", "trailing", False, 12, {"rescale_betas_zero_snr": True}),
]


@jax.jit
def _model_input_and_step(plan, carry, model_output, i):
    return plan.model_input(carry, i), plan.step(carry, model_output, i, eta=0.0, noise=None)


def _to_nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _case_id(case) -> str:
    *settings, extra = case
    return "-".join([*map(str, settings), *(f"{k}={v}" for k, v in extra.items())])


@pytest.mark.parametrize("case", STEP_CASES, ids=_case_id)
def test_every_step_matches_diffusers(case):
    """Same random model outputs through both schedulers: every step's latents agree."""
    solver, prediction, spacing, karras, steps, extra = case
    config = _config(spacing, prediction_type=prediction, use_karras_sigmas=karras, **extra)
    ref = _reference(solver, config, steps)
    plan = make_plan(solver, config, steps)
    rng = np.random.default_rng(steps)
    noise = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)  # NHWC
    carry = plan.init(jnp.asarray(noise))
    reference = _to_nchw(noise) * ref.init_noise_sigma
    np.testing.assert_allclose(_to_nchw(plan.final(carry)), reference, rtol=1e-6)
    assert plan.num_steps == len(ref.timesteps) == steps
    # Errors are relative to the largest latents so far: a step that cancels
    # large terms (e.g. zero-SNR Euler, sigma 4096 -> 10) keeps their rounding.
    scale = reference.abs().max().item()
    for i, t in enumerate(ref.timesteps):
        np.testing.assert_allclose(plan.timestep(i), t.numpy(), rtol=0, atol=2e-4)
        output = rng.standard_normal(noise.shape).astype(np.float32)
        latents = _to_nchw(plan.final(carry))
        model_input, carry = _model_input_and_step(plan, carry, jnp.asarray(output), i)
        expected_input = ref.scale_model_input(latents, t)  # on our latents: the scaling alone
        np.testing.assert_allclose(_to_nchw(model_input), expected_input, rtol=1e-6, atol=0)
        reference = ref.step(_to_nchw(output), t, reference).prev_sample
        scale = max(scale, reference.abs().max().item())
        ours = _to_nchw(plan.final(carry))
        np.testing.assert_allclose(
            ours, reference, rtol=1e-5, atol=1e-6 * scale, err_msg=f"step {i}"
        )


def _analytic_model(calls: list | None = None):
    """A smooth model that depends on the (possibly fractional) timestep and the context."""

    def model_fn(params, latents, timesteps, context):
        if calls is not None:
            calls.append(timesteps.dtype)
        phase = jnp.cos(timesteps.astype(jnp.float32) / 700.0)[:, None, None, None]
        mu = jnp.tanh(context.mean(axis=1) @ params["proj"])[:, None, None, :]
        return phase * jnp.tanh(latents @ params["mix"]) + mu

    return model_fn


def _inputs(batch: int = 3):
    keys = jax.random.split(jax.random.key(0), 5)
    params = {
        "proj": jax.random.normal(keys[0], (8, 4)),
        "mix": jax.random.normal(keys[1], (4, 4)),
    }
    latents = jax.random.normal(keys[2], (batch, 6, 6, 4))
    cond = jax.random.normal(keys[3], (batch, 5, 8))
    uncond = jax.random.normal(keys[4], (5, 8))
    return params, latents, cond, uncond


@pytest.mark.parametrize(
    "solver, prediction, karras",
    [
        ("dpmpp_2m", "epsilon", False),
        ("dpmpp_2m", "v_prediction", True),
        ("euler", "epsilon", True),
    ],
)
def test_scan_equals_debug_loop(solver, prediction, karras):
    calls: list = []
    model_fn = _analytic_model(calls)
    params, latents, cond, uncond = _inputs()
    config = _config(prediction_type=prediction, use_karras_sigmas=karras)
    plan = make_plan(solver, config, 9)
    compiled = sample(model_fn, params, plan, latents, cond, uncond, guidance_scale=4.0)
    eager = sample(model_fn, params, plan, latents, cond, uncond, guidance_scale=4.0, debug=True)
    assert compiled.shape == latents.shape and compiled.dtype == jnp.float32
    assert np.abs(np.asarray(compiled)).max() > 0.1
    # The analytic model is no consistent denoiser: compare relative to the result's scale.
    np.testing.assert_allclose(compiled, eager, rtol=1e-6, atol=1e-7 * np.abs(eager).max())
    # Euler calls the model at fractional timesteps; the others at integers.
    assert set(calls) == {jnp.dtype(jnp.float32 if solver == "euler" else jnp.int32)}
    with pytest.raises(ValueError, match="eta=0.5 is a DDIM option"):
        sample(model_fn, params, plan, latents, cond, uncond, eta=0.5, key=jax.random.key(0))


@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler"])
def test_bf16_model_output_keeps_float32_arithmetic(solver):
    """A bf16 model output is widened once; the solver's arithmetic stays float32."""
    base = _analytic_model()
    rounded = lambda *args: base(*args).astype(jnp.bfloat16)
    widened = lambda *args: rounded(*args).astype(jnp.float32)
    params, latents, cond, uncond = _inputs()
    plan = make_plan(solver, SD_CONFIG, 6)
    bf16 = sample(rounded, params, plan, latents, cond, uncond, guidance_scale=3.0)
    f32 = sample(widened, params, plan, latents, cond, uncond, guidance_scale=3.0)
    assert bf16.dtype == jnp.float32
    np.testing.assert_array_equal(bf16, f32)


def _program_text(plan, debug: bool) -> tuple[str, str]:
    """(jaxpr, StableHLO) of a whole guided sampler call, with every number replaced by '#'."""
    model_fn = _analytic_model()
    params, latents, cond, uncond = _inputs()

    def run(params, plan, latents, cond, uncond):
        return sample(
            model_fn, params, plan, latents, cond, uncond, guidance_scale=3.0, debug=debug
        )

    args = (params, plan, latents, cond, uncond)
    jaxpr = str(jax.make_jaxpr(run)(*args))
    hlo = jax.jit(run).lower(*args).as_text()
    return re.sub(r"\d+", "#", jaxpr), re.sub(r"\d+", "#", hlo)


@pytest.mark.parametrize("solver", SCHEDULERS)
def test_program_does_not_grow_with_steps(solver):
    """The step count is a scan length: 10 and 30 steps trace to the same program."""
    ten = _program_text(make_plan(solver, SD_CONFIG, 10), debug=False)
    thirty = _program_text(make_plan(solver, SD_CONFIG, 30), debug=False)
    assert ten == thirty
    # The check can fail: the debug loop unrolls the steps.
    unrolled_ten = _program_text(make_plan(solver, SD_CONFIG, 10), debug=True)
    unrolled_thirty = _program_text(make_plan(solver, SD_CONFIG, 30), debug=True)
    assert len(unrolled_thirty[0]) > 2 * len(unrolled_ten[0])


def test_plan_options_and_bad_names():
    karras_by_config = make_plan("euler", _config(use_karras_sigmas=True), 12)
    karras_by_argument = make_plan("euler", SD_CONFIG, 12, use_karras_sigmas=True)
    np.testing.assert_array_equal(karras_by_config.sigmas, karras_by_argument.sigmas)
    assert not np.array_equal(karras_by_config.sigmas, make_plan("euler", SD_CONFIG, 12).sigmas)
    with pytest.raises(ValueError, match="unknown scheduler 'pndm'; choose one of: ddim, dpmpp_2m"):
        make_plan("pndm", SD_CONFIG, 10)
    with pytest.raises(ValueError, match=r"dpmpp_2m: unsupported solver_order=3 \(supported: 2\)"):
        make_plan("dpmpp_2m", _config(solver_order=3), 10)
    with pytest.raises(ValueError, match="interpolation_type='log_linear'"):
        make_plan("euler", _config(interpolation_type="log_linear"), 10)


PROMPTS = ["a red circle on a grey background", "a photo of a dog"]


@pytest.mark.parametrize(
    ("variant", "solver", "karras", "per_prompt"),
    [("sd1", "dpmpp_2m", False, 2), ("sd2", "euler", True, 1)],
)
def test_images_match_diffusers_pipeline(variant, solver, karras, per_prompt, request):
    """The whole text-to-image path (SD1 epsilon, SD2 v-prediction) from identical noise."""
    folder = request.getfixturevalue(f"{variant}_folder")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder))
    ref.scheduler = REFERENCE[solver].from_config(ref.scheduler.config, use_karras_sigmas=karras)
    ref.set_progress_bar_config(disable=True)
    pipe = load_pipeline(folder)
    pipe.scheduler_config = {**pipe.scheduler_config, "use_karras_sigmas": karras}

    n = len(PROMPTS) * per_prompt
    noise = np.random.default_rng(0).standard_normal((n, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = ref(
            PROMPTS,
            num_images_per_prompt=per_prompt,
            num_inference_steps=12,
            guidance_scale=7.5,
            latents=torch.from_numpy(noise),
            output_type="np",
        ).images
    images = text_to_image.generate(
        pipe,
        PROMPTS,
        num_images_per_prompt=per_prompt,
        steps=12,
        guidance=7.5,
        latents=noise.transpose(0, 2, 3, 1),
        batch_size=n,
        progress=False,
        scheduler=solver,
    )
    assert images.shape == expected.shape == (n, 16, 16, 3)
    diff = np.abs(images - expected).max()
    assert diff < 5e-4, diff  # measured 2-5e-6 in float32


def test_sample_cli_scheduler_flag(sd1_folder, tmp_path, capsys):
    args = ["sample", "--model", str(sd1_folder), "--prompt", "a cat", "--prompt", "a dog"]
    cli.main([*args, "--steps", "3", "--scheduler", "euler", "--out", str(tmp_path / "s")])
    images = np.load(tmp_path / "s" / "images.npz")["images"]
    pipe = load_pipeline(sd1_folder)
    # On the CLI's mesh: run alone, the CLI splits the CPU into devices, and batch 1 per
    # device rounds differently from batch 2 on one.
    kwargs = dict(steps=3, progress=False, mesh=data_mesh())
    expected = text_to_image.generate(pipe, ["a cat", "a dog"], scheduler="euler", **kwargs)
    np.testing.assert_array_equal(images, expected)
    ddim = text_to_image.generate(pipe, ["a cat", "a dog"], **kwargs)
    assert np.abs(images - ddim).max() > 1e-3  # the flag reached the sampler

    with pytest.raises(SystemExit):
        cli.main([*args, "--scheduler", "pndm", "--out", str(tmp_path / "bad")])
    message = capsys.readouterr().err
    assert "invalid choice: 'pndm'" in message
    assert all(name in message for name in SCHEDULERS)
    assert command_args.SCHEDULERS == SCHEDULERS
    with pytest.raises(ValueError, match="unknown scheduler 'pndm'; choose one of"):
        text_to_image.generate(pipe, ["a cat"], steps=2, scheduler="pndm")


def test_integrity_cli_scheduler_flag(sd1_folder, tmp_path, monkeypatch):
    # A stand-in LPIPS (mean squared difference): this test is about the sampler flag.
    monkeypatch.setattr(lpips, "load_lpips", lambda net: net)
    fake = lambda net: lambda a, b: jnp.mean((jnp.asarray(a) - b) ** 2, axis=(1, 2, 3))
    monkeypatch.setattr(lpips, "make_lpips_fn", fake)
    out = tmp_path / "integrity"
    cli.main(
        [
            "integrity",
            "--original",
            str(sd1_folder),
            "--unlearned",
            str(sd1_folder),
            "--prompt",
            "a dog",
            "--seeds",
            "2",
            "--steps",
            "3",
            "--scheduler",
            "euler",
            "--out",
            str(out),
        ]
    )
    report = json.loads((out / "integrity.json").read_text())
    assert report["integrity_lpips"] == 0.0
    assert report["settings"]["sampler"] == "euler"
    pairs = np.load(out / "pairs.npz")
    expected = text_to_image.generate(
        load_pipeline(sd1_folder),
        ["a dog"],
        num_images_per_prompt=2,
        steps=3,
        progress=False,
        scheduler="euler",
        mesh=data_mesh(),  # the CLI's layout (see test_sample_cli_scheduler_flag)
    )
    np.testing.assert_array_equal(pairs["original"], expected)
