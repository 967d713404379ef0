"""Parity of the Flax NNX AutoencoderKL with diffusers' PyTorch AutoencoderKL (tiny, random)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx

from unlearn_jax.models.convert import WeightMismatchError, load_torch_state, to_torch_state
from unlearn_jax.models.vae import AutoencoderKL, normalize_vae_keys

TWO_LEVEL = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "latent_channels": 4,
    "sample_size": 32,
}
THREE_LEVEL = {
    "block_out_channels": [16, 32, 48],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "norm_num_groups": 16,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 32,
    "scaling_factor": 0.13025,
}
# The optional switches, off: no quant convs, no mid-block attention.
BARE = {
    **TWO_LEVEL,
    "block_out_channels": [16, 32],
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
}
CONFIGS = {"two_level": TWO_LEVEL, "three_level": THREE_LEVEL, "bare": BARE}
TOL = 1e-4  # float32 rounding of ~30 conv layers; measured max diff is ~1e-6


def randomized_torch_vae(config: dict, seed: int) -> TorchAutoencoderKL:
    """A diffusers VAE whose every parameter is random (norm scales and biases included)."""
    torch.manual_seed(seed)
    vae = TorchAutoencoderKL(**config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:  # keep activations O(1) through the stack
                p.copy_(noise / np.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return vae


def torch_state(vae: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in vae.state_dict().items()}


def nnx_vae(config: dict, tensors: dict[str, np.ndarray], dtype=jnp.float32) -> AutoencoderKL:
    # Abstract init (as the pipeline loader does): the random init would be overwritten.
    vae = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0), dtype=dtype))
    load_torch_state(vae, tensors, source="test tensors")
    return vae


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    config = CONFIGS[request.param]
    ref = randomized_torch_vae(config, seed=len(request.param))
    return config, ref, nnx_vae(config, torch_state(ref))


def test_encode_decode_match_diffusers(pair):
    config, ref, vae = pair
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    latents = rng.normal(size=(2, 32 // factor, 32 // factor, 4)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(nchw(images)).latent_dist
        want_mean, want_logvar = nhwc(dist.mean), nhwc(dist.logvar)
        want_image = nhwc(ref.decode(nchw(latents)).sample)
        want_recon = nhwc(ref(nchw(images), sample_posterior=False).sample)

    run = nnx.jit(lambda m, x, z: (m.encode(x), m.decode(z), m(x)))
    posterior, got_image, got_recon = run(vae, jnp.asarray(images), jnp.asarray(latents))
    diffs = {
        "mean": np.abs(np.asarray(posterior.mean) - want_mean).max(),
        "logvar": np.abs(np.asarray(posterior.logvar) - want_logvar).max(),
        "decode": np.abs(np.asarray(got_image) - want_image).max(),
        "reconstruct": np.abs(np.asarray(got_recon) - want_recon).max(),
    }
    print("max abs diff vs diffusers:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert posterior.mean.shape == want_mean.shape
    assert got_image.shape == (2, 32, 32, 3)
    # Scale-aware: outputs are O(1)-O(10) after random weights.
    assert diffs["mean"] < TOL * max(1.0, np.abs(want_mean).max())
    assert diffs["logvar"] < TOL * max(1.0, np.abs(want_logvar).max())
    assert diffs["decode"] < TOL * max(1.0, np.abs(want_image).max())
    assert diffs["reconstruct"] < TOL * max(1.0, np.abs(want_recon).max())


def test_round_trip_is_bit_identical(pair):
    _, ref, vae = pair
    want = torch_state(ref)
    got = to_torch_state(vae)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_posterior_sample_and_jit(pair):
    config, _, vae = pair
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    posterior = nnx.jit(lambda m, x: m.encode(x))(vae, images)
    key = jax.random.key(3)
    draw = posterior.sample(key)
    noise = jax.random.normal(key, posterior.mean.shape)
    np.testing.assert_allclose(draw, posterior.mean + posterior.std * noise, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(posterior.logvar) <= 20.0)
    assert vae.scaling_factor == config.get("scaling_factor", 0.18215)


@pytest.mark.parametrize("as_conv", [False, True], ids=["linear", "conv1x1"])
def test_old_attention_names_load(as_conv):
    ref = randomized_torch_vae(TWO_LEVEL, seed=7)
    new = torch_state(ref)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in new.items():
        for new_name, old_name in old_names.items():
            marker = f".attentions.0.{new_name}."
            if marker in key:
                key = key.replace(marker, f".attentions.0.{old_name}.")
                if as_conv and value.ndim == 2:
                    value = value[:, :, None, None]
        old[key] = value
    assert any(".query." in k for k in old) and not any(".to_q." in k for k in old)
    vae_new, vae_old = nnx_vae(TWO_LEVEL, new), nnx_vae(TWO_LEVEL, normalize_vae_keys(old))
    images = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (1, 8, 8, 3)), jnp.float32)
    run = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(run(vae_old, images), run(vae_new, images))
    assert sorted(to_torch_state(vae_old)) == sorted(new)  # what we write uses the new names


def test_normalize_refuses_old_and_new_names_together():
    tensors = {
        "encoder.mid_block.attentions.0.query.weight": np.zeros((4, 4)),
        "encoder.mid_block.attentions.0.to_q.weight": np.zeros((4, 4)),
    }
    with pytest.raises(ValueError, match="query"):
        normalize_vae_keys(tensors)


def test_wrong_shape_names_the_tensor():
    tensors = torch_state(randomized_torch_vae(TWO_LEVEL, seed=3))
    tensors["decoder.up_blocks.1.resnets.0.conv1.weight"] = np.zeros((64, 64, 3, 3), np.float32)
    with pytest.raises(WeightMismatchError, match=r"up_blocks\.1\.resnets\.0\.conv1\.weight"):
        nnx_vae(TWO_LEVEL, tensors)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "AttnDownEncoder"),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "must match"),
        ({"act_fn": "tanh"}, "tanh"),
        ({"norm_num_groups": 12}, "norm_num_groups"),
        ({"norm_type": "spatial"}, "norm_type"),
    ],
)
def test_unsupported_options_raise(change, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderKL({**TWO_LEVEL, **change}, rngs=nnx.Rngs(0))


def test_bfloat16_compute_stays_close():
    ref = randomized_torch_vae(TWO_LEVEL, seed=5)
    tensors = torch_state(ref)
    vae32 = nnx_vae(TWO_LEVEL, tensors)
    vae16 = nnx_vae(TWO_LEVEL, tensors, dtype=jnp.bfloat16)
    images = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (1, 8, 8, 3)), jnp.float32)
    run = nnx.jit(lambda m, x: m(x))
    out32, out16 = run(vae32, images), run(vae16, images)
    assert out16.dtype == jnp.bfloat16
    scale = float(jnp.abs(out32).max())
    assert float(jnp.abs(out16.astype(jnp.float32) - out32).max()) < 0.05 * scale
