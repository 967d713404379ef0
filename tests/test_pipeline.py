"""Pipeline loading: parity of components loaded from a diffusers folder, the
bit-exact export round trip, and a clear error for each kind of bad input."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.numpy import load_file, save_file

from unlearn_jax.models import weights
from unlearn_jax.models.convert import WeightMismatchError
from unlearn_jax.models.diffusers_folder import PipelineError, save_pipeline
from unlearn_jax.models.pipeline import load_pipeline


def _copy(folder, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return dst


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_components_match_diffusers(variant, sd1_folder, sd2_folder):
    folder = sd1_folder if variant == "sd1" else sd2_folder
    ref = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe = load_pipeline(folder)
    prompts = ["a red circle", "", "a photo of a dog in the style of a painting"]

    ids = pipe.tokenize(prompts)
    ref_ids = ref.tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=ref.tokenizer.model_max_length,
        return_tensors="np",
    )
    np.testing.assert_array_equal(ids, ref_ids.input_ids)

    ctx = np.asarray(pipe.encode_prompts(prompts))
    with torch.no_grad():
        ref_ctx = ref.text_encoder(torch.from_numpy(ids).long())[0].numpy()
    np.testing.assert_allclose(ctx, ref_ctx, atol=2e-5, rtol=0)

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    t = np.array([999, 500, 1], dtype=np.int32)
    out = np.asarray(pipe.unet(jnp.asarray(latents), jnp.asarray(t), jnp.asarray(ctx)))
    with torch.no_grad():
        ref_out = (
            ref.unet(
                torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                torch.from_numpy(t),
                torch.from_numpy(ref_ctx),
            )
            .sample.numpy()
            .transpose(0, 2, 3, 1)
        )
    np.testing.assert_allclose(out, ref_out, atol=1e-4, rtol=0)

    decoded = np.asarray(pipe.vae.decode(jnp.asarray(latents)))
    with torch.no_grad():
        ref_dec = ref.vae.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample
    np.testing.assert_allclose(decoded, ref_dec.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_export_round_trip_is_bit_identical(dtype, tmp_path):
    from tiny_sd import save_tiny_pipeline

    src = save_tiny_pipeline(tmp_path / "src", "sd1", seed=3, torch_dtype=dtype)
    out = save_pipeline(load_pipeline(src), tmp_path / "out")
    for component, stem in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ]:
        a = load_file(str(src / component / f"{stem}.safetensors"))
        b = load_file(str(out / component / f"{stem}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8), err_msg=k)
    for f in src.rglob("*.json"):
        assert (out / f.relative_to(src)).read_text() == f.read_text()
    # diffusers loads the export.
    StableDiffusionPipeline.from_pretrained(str(out))


def test_export_refuses_to_overwrite(sd1_folder, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_pipeline(load_pipeline(sd1_folder), tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_not_a_pipeline_folder(sd1_folder, tmp_path):
    with pytest.raises(PipelineError, match="no model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(PipelineError, match="pass its parent"):
        load_pipeline(sd1_folder / "unet")


def test_missing_component(sd1_folder, tmp_path):
    folder = _copy(sd1_folder, tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(PipelineError, match="lacks the component.*vae"):
        load_pipeline(folder)


def test_missing_weights_file(sd1_folder, tmp_path):
    folder = _copy(sd1_folder, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(weights.MissingWeightsError, match=r"no weights found in .*unet"):
        load_pipeline(folder)


def test_shape_mismatch_names_tensor(sd1_folder, tmp_path):
    folder = _copy(sd1_folder, tmp_path)
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 40  # the weights were made for 32
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightMismatchError, match=r"attn2\.to_k\.weight: file has \(.*, 32\)"):
        load_pipeline(folder)


def test_missing_and_unexpected_tensors_listed(sd1_folder, tmp_path):
    folder = _copy(sd1_folder, tmp_path)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors["decoder.extra.weight"] = np.zeros(3, np.float32)
    del tensors["decoder.conv_out.bias"]
    save_file(tensors, str(path))
    with pytest.raises(WeightMismatchError) as err:
        load_pipeline(folder)
    assert "missing tensors (1): decoder.conv_out.bias" in str(err.value)
    assert "unexpected tensors (1): decoder.extra.weight" in str(err.value)


def test_pickle_refused_unless_allowed(sd1_folder, tmp_path):
    folder = _copy(sd1_folder, tmp_path)
    st = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(
        {k: torch.from_numpy(v) for k, v in load_file(str(st)).items()},
        folder / "unet" / "diffusion_pytorch_model.bin",
    )
    st.unlink()
    with pytest.raises(weights.MissingWeightsError, match="allow-pickle"):
        load_pipeline(folder)
    pipe = load_pipeline(folder, allow_pickle=True)
    ref = load_pipeline(sd1_folder)
    np.testing.assert_array_equal(pipe.unet.conv_in.kernel[...], ref.unet.conv_in.kernel[...])


def test_fp16_variant(sd1_folder, tmp_path):
    folder = _copy(sd1_folder, tmp_path)
    st = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file(
        {k: v.astype(np.float16) for k, v in load_file(str(st)).items()},
        str(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"),
    )
    st.unlink()
    with pytest.raises(weights.MissingWeightsError, match="--variant fp16"):
        load_pipeline(folder)
    pipe = load_pipeline(folder, variant="fp16")
    assert pipe.unet.conv_in.kernel[...].dtype == jnp.float32
    assert pipe.file_dtypes["unet"] == np.float16


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match="not a local folder.*offline machine"):
        load_pipeline("no-such-org/no-such-model")
    with pytest.raises(PipelineError, match="no such folder"):
        load_pipeline("./definitely/not/here")
