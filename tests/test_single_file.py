"""Single-file SD checkpoints (LDM layout): round trips, parity with diffusers' own
single-file loader, shape-read architectures, EMA, dtypes, and refusals by name.

The "wild" files below are what checkpoints in circulation look like besides
the three networks: schedule buffers, an EMA copy of the UNet, CLIP's
`position_ids`, OpenCLIP's `text_projection`/`logit_scale` and its unused last
layer, metadata, half precision.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from flax import nnx
from safetensors.numpy import load_file, save_file

from unlearn_jax.models import convert, ldm_detect, ldm_keys
from unlearn_jax.models.abstract import abstract_module
from unlearn_jax.models.clip import CLIPTextModel, is_clip_buffer, normalize_clip_keys
from unlearn_jax.models.convert import WeightMismatchError
from unlearn_jax.models.pipeline import load_pipeline
from unlearn_jax.models.single_file import (
    SingleFileOptions,
    ldm_tables,
    plan_single_file,
    torch_shapes,
)
from unlearn_jax.models.single_file_export import save_single_file
from unlearn_jax.models.unet import UNet2DConditionModel
from unlearn_jax.models.vae import AutoencoderKL
from unlearn_jax.models.weights import CorruptWeightsError, MissingWeightsError
from unlearn_jax.trainer.restore import convert_model

NETS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def folders(sd1_folder, sd2_folder):
    return {"sd1": sd1_folder, "sd2": sd2_folder}


@pytest.fixture(scope="module")
def exported(folders, tmp_path_factory):
    """Our single-file export of each tiny diffusers folder."""
    root = tmp_path_factory.mktemp("single")
    return {
        v: save_single_file(load_pipeline(f), root / f"{v}.safetensors") for v, f in folders.items()
    }


def wild_file(src, dst, variant: str, dtype=np.float32):
    """`src` (an LDM file) with the extra tensors real checkpoints carry, cast to `dtype`."""
    tensors = load_file(str(src))
    rng = np.random.default_rng(0)
    for key in [k for k in tensors if k.startswith(ldm_keys.UNET_PREFIX)]:
        noise = rng.standard_normal(tensors[key].shape).astype(np.float32)
        tensors[ldm_keys.ema_key(key)] = tensors[key] + 0.01 * noise
    tensors["model_ema.decay"] = np.array(0.9999, np.float32)
    tensors["model_ema.num_updates"] = np.array(1234, np.int32)
    tensors["alphas_cumprod"] = np.linspace(0.999, 0.01, 1000, dtype=np.float32)
    tensors["betas"] = np.linspace(0.00085, 0.012, 1000, dtype=np.float32)
    if variant == "sd2":
        p = ldm_keys.SD2_TEXT_PREFIX
        width = tensors[p + "ln_final.weight"].shape[0]
        tensors[p + "text_projection"] = rng.standard_normal((width, width)).astype(np.float32)
        tensors[p + "logit_scale"] = np.array(4.6, np.float32)
        last = max(int(k.split(".")[4]) for k in tensors if ".resblocks." in k)
        for k in [k for k in tensors if f".resblocks.{last}." in k]:  # OpenCLIP's unused layer
            tensors[k.replace(f".resblocks.{last}.", f".resblocks.{last + 1}.")] = tensors[k] * 2
    out = {
        k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()
    }
    save_file(out, str(dst), metadata={"format": "pt", "modelspec.title": "tiny"})
    return dst


def _params(module) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in convert.to_torch_state(module).items()}


def _assert_same_params(a, b):
    for name in NETS:
        pa, pb = _params(getattr(a, name)), _params(getattr(b, name))
        assert pa.keys() == pb.keys(), name
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k], err_msg=f"{name}: {k}")


def _bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _assert_same_file(a, b, *, drop=()):
    ta, tb = load_file(str(a)), load_file(str(b))
    ta = {k: v for k, v in ta.items() if not k.startswith(drop)} if drop else ta
    assert ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))[:10]
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        np.testing.assert_array_equal(_bytes(ta[k]), _bytes(tb[k]), err_msg=k)


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_folder_to_single_file_to_ours_equals_the_folder(variant, folders, exported):
    folder = folders[variant]
    from_file = load_pipeline(exported[variant], single_file_options=SingleFileOptions(folder))
    from_folder = load_pipeline(folder)
    _assert_same_params(from_file, from_folder)
    assert from_file.scheduler_config == from_folder.scheduler_config
    prompts = ["a red circle", "a photo of a dog in the style of a painting"]
    np.testing.assert_array_equal(from_file.tokenize(prompts), from_folder.tokenize(prompts))


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_single_file_round_trip_is_bit_identical(variant, dtype, folders, exported, tmp_path):
    src = wild_file(exported[variant], tmp_path / "wild.safetensors", variant, dtype)
    pipe = load_pipeline(src, single_file_options=SingleFileOptions(folders[variant]))
    # Every key, dtype, shape, byte and the metadata, EMA copy included when kept.
    kept = save_single_file(pipe, tmp_path / "kept.safetensors", keep_ema=True)
    _assert_same_file(src, kept)
    assert ldm_detect.read_header(kept).metadata == ldm_detect.read_header(src).metadata
    # By default the original's EMA copy (the UNet before unlearning) is not written.
    plain = save_single_file(pipe, tmp_path / "plain.safetensors")
    _assert_same_file(src, plain, drop=(ldm_keys.EMA_PREFIX,))


def test_our_export_reads_back_to_the_same_file_bytes(folders, exported, tmp_path):
    pipe = load_pipeline(exported["sd2"], single_file_options=SingleFileOptions(folders["sd2"]))
    again = save_single_file(pipe, tmp_path / "again.safetensors")
    assert again.read_bytes() == exported["sd2"].read_bytes()


def test_folder_export_of_a_single_file_model_is_the_folder(folders, exported, tmp_path):
    options = SingleFileOptions(folders["sd1"])
    out = convert_model(exported["sd1"], tmp_path / "folder", format="folder", options=options)
    _assert_same_params(load_pipeline(out), load_pipeline(folders["sd1"]))
    StableDiffusionPipeline.from_pretrained(str(out))  # diffusers loads it as well


def test_unet_only_keeps_the_rest_of_the_original_bytes(folders, exported, tmp_path):
    src = wild_file(exported["sd1"], tmp_path / "wild.safetensors", "sd1", np.float16)
    pipe = load_pipeline(src, single_file_options=SingleFileOptions(folders["sd1"]))
    kernel = pipe.unet.conv_in.kernel
    kernel.set_value(kernel.get_value() + 1.0)  # "unlearning"
    out = save_single_file(pipe, tmp_path / "out.safetensors", components=("unet",))
    a, b = load_file(str(src)), load_file(str(out))
    assert set(b) == {k for k in a if not k.startswith(ldm_keys.EMA_PREFIX)}
    changed = [k for k in b if not np.array_equal(_bytes(a[k]), _bytes(b[k]))]
    assert changed == ["model.diffusion_model.input_blocks.0.0.weight"]
    assert b[changed[0]].dtype == np.float16


def test_pickled_checkpoint_needs_allow_pickle(folders, exported, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    state = {k: torch.from_numpy(v) for k, v in load_file(str(exported["sd1"])).items()}
    torch.save({"state_dict": state, "global_step": 7}, ckpt)
    options = SingleFileOptions(folders["sd1"])
    with pytest.raises(MissingWeightsError, match="--allow-pickle"):
        load_pipeline(ckpt, single_file_options=options)
    pipe = load_pipeline(ckpt, single_file_options=options, allow_pickle=True)
    _assert_same_params(pipe, load_pipeline(folders["sd1"]))
    out = save_single_file(pipe, tmp_path / "from_ckpt.safetensors")
    _assert_same_file(exported["sd1"], out)


# ---------------------------------------------------------------------------
# diffusers itself
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_diffusers_from_single_file_loads_our_export_and_draws_the_same(variant, folders, exported):
    folder = folders[variant]
    ref = StableDiffusionPipeline.from_pretrained(str(folder))
    ours = StableDiffusionPipeline.from_single_file(
        str(exported[variant]), config=str(folder), local_files_only=True
    )
    for name in NETS:
        a, b = getattr(ref, name).state_dict(), getattr(ours, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert ours.scheduler.config.prediction_type == ref.scheduler.config.prediction_type

    def draw(pipe):
        for p in (pipe.unet, pipe.vae, pipe.text_encoder):
            p.eval()
        out = pipe(
            ["a red circle", "a blue square"],
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        return out.images

    np.testing.assert_allclose(draw(ours), draw(ref), atol=1e-5, rtol=0)


def _diffusers_weights(pipe, name: str) -> dict[str, np.ndarray]:
    state = {k: v.float().numpy() for k, v in getattr(pipe, name).state_dict().items()}
    if name == "text_encoder":
        state = {k: v for k, v in normalize_clip_keys(state).items() if not is_clip_buffer(k)}
    return state


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("ema", [False, True])
def test_wild_file_loads_as_diffusers_converts_it(variant, ema, folders, exported, tmp_path):
    src = wild_file(exported[variant], tmp_path / "wild.safetensors", variant)
    ref = StableDiffusionPipeline.from_single_file(
        str(src), config=str(folders[variant]), local_files_only=True, extract_ema=ema
    )
    ours = load_pipeline(src, single_file_options=SingleFileOptions(folders[variant], ema=ema))
    for name in NETS:
        theirs, mine = _diffusers_weights(ref, name), _params(getattr(ours, name))
        assert theirs.keys() == mine.keys(), name
        for k in mine:
            np.testing.assert_array_equal(mine[k], theirs[k], err_msg=f"{name}: {k}")
    if ema:  # the EMA copy really is what was loaded
        ema_value = load_file(str(src))[ldm_keys.ema_key("model.diffusion_model.out.2.bias")]
        np.testing.assert_array_equal(np.asarray(ours.unet.conv_out.bias.get_value()), ema_value)


# ---------------------------------------------------------------------------
# Architecture from the shapes
# ---------------------------------------------------------------------------

_SD_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
_SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
)
REAL = {  # the configs of stable-diffusion-v1-5 and stable-diffusion-2-1 (diffusers folders)
    "sd1": dict(
        unet={**_SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8},
        vae=_SD_VAE,
        text_encoder=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
        ),
    ),
    "sd2": dict(
        unet={
            **_SD_UNET,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },
        vae=_SD_VAE,
        text_encoder=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            hidden_act="gelu",
        ),
    ),
}
_CLASSES = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}


def _abstract(configs) -> dict[str, nnx.Module]:
    return {
        n: abstract_module(lambda rngs, c=c, n=n: c(configs[n], rngs=rngs))
        for n, c in _CLASSES.items()
    }


def _ldm_shapes(layout, modules) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, table in ldm_tables(layout, modules).items():
        sizes = torch_shapes(modules[name])
        shapes.update({k: ldm_keys.ldm_shape(e, sizes) for k, e in table.items()})
    return shapes


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_real_sd_architecture_is_read_from_the_shapes(variant):
    modules = _abstract(REAL[variant])
    shapes = _ldm_shapes(variant, modules)
    if variant == "sd2":  # as released: OpenCLIP's 24th layer, unused, and its projection
        for k in [k for k in shapes if ".resblocks.22." in k]:
            shapes[k.replace(".resblocks.22.", ".resblocks.23.")] = shapes[k]
        shapes[ldm_keys.SD2_TEXT_PREFIX + "text_projection"] = (1024, 1024)
    assert ldm_detect.identify(shapes, "f") == variant
    configs = ldm_detect.infer_configs(shapes, variant, "epsilon", "f")
    inferred = _abstract(configs)
    for name in NETS:
        for key, value in REAL[variant][name].items():
            assert json.dumps(configs[name][key]) == json.dumps(value), (name, key)
        assert torch_shapes(inferred[name]) == torch_shapes(modules[name]), name
    assert configs["scheduler"]["prediction_type"] == "epsilon"


def test_tiny_sizes_need_a_config_folder(exported):
    with pytest.raises(ldm_detect.AmbiguousArchitectureError, match="--model-config"):
        plan_single_file(exported["sd1"], SingleFileOptions(prediction_type="epsilon"))


def test_prediction_type_is_never_guessed(exported, folders):
    with pytest.raises(ldm_detect.AmbiguousArchitectureError, match="--prediction-type"):
        plan_single_file(exported["sd2"])
    # With a config folder, its scheduler says it; the flag, if given, wins.
    plan = plan_single_file(exported["sd2"], SingleFileOptions(folders["sd2"]))
    assert plan.configs["scheduler"]["prediction_type"] == "v_prediction"
    plan = plan_single_file(exported["sd2"], SingleFileOptions(folders["sd2"], "epsilon"))
    assert plan.configs["scheduler"]["prediction_type"] == "epsilon"


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


def _file(path, names, shape=(4, 4)):
    save_file({n: np.zeros(shape, np.float16) for n in names}, str(path))
    return path


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], r"a LoRA"),
        (["unet.down_blocks.0.attn.to_q.lora_A.weight"], r"a LoRA"),
        (
            [
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "model.diffusion_model.input_blocks.0.0.weight",
            ],
            r"an SDXL checkpoint",
        ),
        (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"], "VAE-only"),
        (["first_stage_model.encoder.conv_in.weight"], r"a VAE-only file"),
        (["emb_params"], r"textual-inversion embedding"),
        (["model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"], r"a Flux"),
        (["down_blocks.0.resnets.0.conv1.weight"], r"a diffusers component file"),
        (["model.diffusion_model.input_blocks.0.0.weight"], r"incomplete checkpoint.*no VAE"),
        (["some.other.weight"], r"an unknown checkpoint"),
    ],
)
def test_non_sd_files_are_named(names, message, tmp_path):
    path = _file(tmp_path / "x.safetensors", names)
    with pytest.raises(ldm_detect.NotStableDiffusionError, match=message) as info:
        plan_single_file(path, SingleFileOptions(prediction_type="epsilon"))
    assert "not a Stable Diffusion 1.x/2.x checkpoint" in str(info.value)


def test_truncated_and_foreign_files_say_so(exported, tmp_path):
    data = exported["sd1"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CorruptWeightsError, match=r"is truncated.*\(67%\).*again"):
        plan_single_file(cut, SingleFileOptions(prediction_type="epsilon"))
    cut.write_bytes(data[:100])
    with pytest.raises(CorruptWeightsError, match=r"is truncated: its header alone"):
        plan_single_file(cut)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a model")
    with pytest.raises(CorruptWeightsError, match="not a safetensors file"):
        plan_single_file(text)
    zipped = tmp_path / "renamed.safetensors"
    torch.save({"a": torch.zeros(2)}, zipped)
    with pytest.raises(CorruptWeightsError, match=r"pickled PyTorch checkpoint.*--allow-pickle"):
        plan_single_file(zipped)


def test_mismatched_tensors_are_listed_by_their_file_names(folders, exported, tmp_path):
    tensors = load_file(str(exported["sd2"]))
    del tensors["first_stage_model.decoder.mid.attn_1.q.bias"]
    tensors["model.diffusion_model.input_blocks.9.0.in_layers.0.weight"] = np.zeros(3, np.float32)
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    tensors[key] = tensors[key][:-3]
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightMismatchError) as info:
        load_pipeline(
            tmp_path / "bad.safetensors", single_file_options=SingleFileOptions(folders["sd2"])
        )
    text = str(info.value)
    assert "missing tensors (1): first_stage_model.decoder.mid.attn_1.q.bias" in text
    assert (
        "unexpected tensors (1): model.diffusion_model.input_blocks.9.0.in_layers.0.weight" in text
    )
    assert f"{key}: file has (141, 48), config expects (144, 48)" in text


def test_ema_asked_of_a_file_without_one(folders, exported):
    with pytest.raises(ValueError, match=r"holds no EMA weights.*drop --ema"):
        plan_single_file(exported["sd1"], SingleFileOptions(folders["sd1"], ema=True))


def test_exports_never_overwrite_and_unet_only_needs_a_single_file(folders, exported, tmp_path):
    pipe = load_pipeline(folders["sd1"])
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_single_file(pipe, exported["sd1"])
    with pytest.raises(ValueError, match=r"name it model.safetensors"):
        save_single_file(pipe, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match=r"--unet-only .*diffusers folder"):
        save_single_file(pipe, tmp_path / "u.safetensors", components=("unet",))
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_cli_export_converts_both_ways(folders, exported, tmp_path, capsys):
    from unlearn_jax import cli

    out = tmp_path / "model.safetensors"
    cli.main(
        ["export", "--model", str(folders["sd1"]), "--format", "single-file", "--out", str(out)]
    )
    assert out.read_bytes() == exported["sd1"].read_bytes()
    back = tmp_path / "folder"
    cli.main(
        ["export", "--model", str(out), "--model-config", str(folders["sd1"]), "--out", str(back)]
    )
    _assert_same_params(load_pipeline(back), load_pipeline(folders["sd1"]))
    assert (
        json.loads((back / "model_index.json").read_text())["_class_name"]
        == "StableDiffusionPipeline"
    )


# ---------------------------------------------------------------------------
# A run on a single-file model, exported back to one
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_file(tmp_path_factory):
    from tiny_unlearn import save_micro_pipeline

    root = tmp_path_factory.mktemp("micro_single")
    folder = save_micro_pipeline(root / "micro")
    return folder, convert_model(folder, root / "micro.safetensors")


def test_sample_reads_a_single_file_like_its_folder(micro_file, tmp_path):
    from unlearn_jax import cli

    folder, file = micro_file
    common = ["--prompt", "a red circle", "--steps", "2", "--batch-size", "1"]
    cli.main(["sample", "--model", str(folder), *common, "--out", str(tmp_path / "a")])
    cli.main(
        ["sample", "--model", str(file), "--model-config", str(folder), *common]
        + ["--out", str(tmp_path / "b")]
    )
    a, b = np.load(tmp_path / "a" / "images.npz"), np.load(tmp_path / "b" / "images.npz")
    np.testing.assert_array_equal(a["images"], b["images"])


def test_a_run_without_steps_exports_the_original_file_bit_for_bit(micro_file, tmp_path):
    from tiny_unlearn import make_config

    from unlearn_jax.trainer import experiment
    from unlearn_jax.trainer.checkpoints import check_run_record
    from unlearn_jax.trainer.train import export

    folder, file = micro_file
    config = make_config(file, model__config=str(folder), train__steps=0)
    spec = experiment.resolve_run(config)
    assert spec.fingerprint["model.config"] == str(folder)
    record = json.loads(config.to_json_best_effort())
    check_run_record(tmp_path / "run", spec.fingerprint, record, force_resume=False)
    out = export(tmp_path / "run", tmp_path / "out.safetensors", format="single-file")
    assert out.read_bytes() == file.read_bytes()
    unet_only = tmp_path / "unet_only.safetensors"
    export(tmp_path / "run", unet_only, format="single-file", unet_only=True)
    assert unet_only.read_bytes() == file.read_bytes()


@pytest.mark.slow  # ~3 min on 2 busy cores: data generation and a compiled train step
def test_unlearning_a_single_file_exports_the_unet_on_top_of_it(micro_file, tmp_path):
    from tiny_unlearn import make_config

    from unlearn_jax import cli
    from unlearn_jax.trainer.train import train_and_evaluate

    folder, file = micro_file
    config = make_config(file, model__config=str(folder), train__steps=1, checkpoint__every=1)
    train_and_evaluate(config, tmp_path / "run")
    out = tmp_path / "unlearned.safetensors"
    cli.main(
        ["export", "--workdir", str(tmp_path / "run"), "--format", "single-file"]
        + ["--unet-only", "--out", str(out)]
    )
    a, b = load_file(str(file)), load_file(str(out))
    assert a.keys() == b.keys()
    changed = {k for k in a if not np.array_equal(_bytes(a[k]), _bytes(b[k]))}
    assert changed and all(k.startswith(ldm_keys.UNET_PREFIX) for k in changed)
    # diffusers opens the result with the original's configs.
    pipe = StableDiffusionPipeline.from_single_file(
        str(out), config=str(folder), local_files_only=True
    )
    key = sorted(changed)[0].removeprefix(ldm_keys.UNET_PREFIX)
    assert key  # a trained tensor, now in diffusers' UNet under its diffusers name
    ours = load_pipeline(out, single_file_options=SingleFileOptions(folder))
    np.testing.assert_array_equal(
        _params(ours.unet)["conv_in.weight"], pipe.unet.state_dict()["conv_in.weight"].numpy()
    )
