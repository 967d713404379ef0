"""Parity of the Flax NNX UNet with diffusers' PyTorch UNet2DConditionModel.

Tiny random configs cover the SD 1.x layout (conv projections, heads as an
int), the SD 2.x layout (linear projections, per-block heads, upcast
attention), a 3-level model with plain Down/UpBlock2D, odd spatial sizes and
the non-default time-embedding options, and deeper transformer stacks. Every
torch parameter is re-drawn so that diffusers' zero-initialised layers (e.g.
`proj_out`) cannot hide a wiring bug.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.embeddings import get_timestep_embedding as torch_timestep_embedding
from flax import nnx

from unlearn_jax.models.convert import (
    WeightMismatchError,
    load_torch_state,
    param_keys,
    to_torch_state,
)
from unlearn_jax.models.unet import UNet2DConditionModel
from unlearn_jax.models.unet_blocks import get_timestep_embedding
from unlearn_jax.planning.models import SD15_UNET_CONFIG, SD21_UNET_CONFIG

CONFIGS = {
    "sd1": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    "sd2": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=16,
    ),
    # 18x18 input: the strides give 9 and 4 pixels, so the up path must
    # upsample to 9 (not 8) exactly as diffusers' `upsample_size` does.
    "three_level": dict(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        mid_block_scale_factor=1.414,
        center_input_sample=True,
    ),
    # Per-block depths [1, 2]: the up path and the mid block must read them reversed / last.
    "deep_transformer": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=[1, 2],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=[2, 4],
        norm_num_groups=8,
    ),
}
SIZES = {"three_level": 18}
TOKENS = 7


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraws every parameter; norm scales around 1, everything else around 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1 + 0.1 * noise if is_norm and name == "weight" else 0.05 * noise)


def abstract_unet(config: dict, **kwargs) -> UNet2DConditionModel:
    # Shapes only: avoids compiling one random initialiser per parameter shape.
    return nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0), **kwargs))


@nnx.jit
def forward(model, sample, timesteps, context):
    return model(sample, timesteps, context)


class Case:
    """A randomised torch UNet, its converted Flax twin and one reference output."""

    def __init__(self, name: str):
        torch.manual_seed(0)
        self.torch_model = TorchUNet(**CONFIGS[name]).eval()
        randomize_(self.torch_model, seed=len(name))
        self.state = {k: v.numpy() for k, v in self.torch_model.state_dict().items()}
        self.config = dict(self.torch_model.config)
        self.model = abstract_unet(self.config)
        load_torch_state(self.model, self.state, source=f"{name} torch weights")
        rng = np.random.default_rng(1)
        size = SIZES.get(name, 16)
        self.sample = rng.standard_normal((2, 4, size, size)).astype(np.float32)
        self.context = rng.standard_normal((2, TOKENS, self.config["cross_attention_dim"])).astype(
            np.float32
        )
        self.timesteps = np.array([3, 981]) if name != "deep_transformer" else 417.25
        with torch.no_grad():
            self.reference = self.torch_model(
                torch.from_numpy(self.sample),
                torch.tensor(self.timesteps),
                torch.from_numpy(self.context),
            ).sample.numpy()

    def run(self, model: UNet2DConditionModel | None = None) -> np.ndarray:
        out = forward(
            model or self.model,
            jnp.asarray(self.sample.transpose(0, 2, 3, 1)),
            jnp.asarray(self.timesteps),
            jnp.asarray(self.context),
        )
        return np.asarray(out, np.float32).transpose(0, 3, 1, 2)


_CASES: dict[str, Case] = {}


def get_case(name: str) -> Case:
    if name not in _CASES:
        _CASES[name] = Case(name)
    return _CASES[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name):
    case = get_case(name)
    out = case.run()
    scale = float(np.abs(case.reference).max())
    err = float(np.abs(out - case.reference).max())
    print(f"{name}: max |flax - torch| = {err:.3g} (output max {scale:.3g})")
    assert out.shape == case.reference.shape
    assert err <= 1e-4 * max(scale, 1.0)


def test_round_trip_is_bit_exact():
    case = get_case("sd2")
    back = to_torch_state(case.model)
    assert set(back) == set(case.state)
    for key, value in case.state.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_shape_mismatch_names_the_tensor():
    case = get_case("sd1")
    wrong = abstract_unet({**case.config, "cross_attention_dim": 48})
    with pytest.raises(WeightMismatchError, match=r"attn2\.to_k\.weight"):
        load_torch_state(wrong, case.state)


def test_num_attention_heads_sets_heads():
    # diffusers refuses `num_attention_heads` in this class; when given, it is
    # the head count (what SD configs spell `attention_head_dim`) and the head
    # width is channels // heads.
    config = {**CONFIGS["sd2"], "num_attention_heads": [2, 4], "attention_head_dim": 8}
    model = abstract_unet(config)
    attn = lambda block: block.attentions[0].transformer_blocks[0].attn1
    assert (attn(model.down_blocks[0]).heads, attn(model.down_blocks[0]).dim_head) == (2, 16)
    assert (attn(model.down_blocks[1]).heads, attn(model.down_blocks[1]).dim_head) == (4, 16)
    assert (attn(model.up_blocks[0]).heads, attn(model.mid_block).heads) == (4, 4)
    assert set(to_torch_state(model)) == set(get_case("sd2").state)


def test_bfloat16_compute_stays_close():
    case = get_case("sd2")
    model = abstract_unet(case.config, dtype=jnp.bfloat16)
    load_torch_state(model, case.state)
    out = case.run(model)
    scale = np.abs(case.reference).max()
    assert np.isfinite(out).all()
    assert np.abs(out - case.reference).max() <= 0.1 * scale


def test_remat_wraps_every_resnet_and_transformer():
    # Tracing only (compiling a UNet backward pass costs ~15 s on CPU); that
    # checkpointed gradients equal plain ones is jax.checkpoint's contract.
    config = dict(
        block_out_channels=(16,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    sample = jnp.zeros((1, 4, 4, 4))
    context = jnp.zeros((1, 3, 8))

    def count_remats(remat: bool) -> int:
        graphdef, params = nnx.split(abstract_unet(config, remat=remat))
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(sample, 5, context) ** 2)
        jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
        return len(re.findall(r"\b(?:remat2?|checkpoint)\[", str(jaxpr)))

    # down: 1 resnet + 1 transformer; mid: 2 + 1; up: 2 + 2.
    assert count_remats(False) == 0
    assert count_remats(True) >= 9


# The real SD-1.5 / SD-2.1 unet/config.json, as the planner (`unlearn-jax plan`) writes them.
SD15_CONFIG, SD21_CONFIG = SD15_UNET_CONFIG, SD21_UNET_CONFIG


@pytest.mark.parametrize(
    "config",
    [pytest.param(SD15_CONFIG, marks=pytest.mark.slow), SD21_CONFIG],  # ~6 s each
    ids=["sd15", "sd21"],
)
def test_real_sd_configs_have_diffusers_keys_and_shapes(config):
    # Full-size configs, shapes only (no memory): a real checkpoint must load.
    model = abstract_unet(config)
    with torch.device("meta"):
        torch_model = TorchUNet(**{k: v for k, v in config.items() if not k.startswith("_")})
    expected = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    got = {}
    for key, path in param_keys(model).items():
        shape = tuple(flat[path].get_value().shape)
        if path[-1] == "kernel":  # (H, W, I, O) -> (O, I, H, W); (I, O) -> (O, I)
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        got[key] = shape
    assert got == expected
    # 859,520,964 (SD 1.5) and 865,910,724 (SD 2.1) parameters, as published.
    assert sum(np.prod(s) for s in got.values()) == sum(np.prod(s) for s in expected.values())


@pytest.mark.parametrize(
    "option, value",
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text_time"),
        ("time_embedding_type", "fourier"),
        ("attention_type", "gated"),
        ("dual_cross_attention", True),
        ("resnet_time_scale_shift", "scale_shift"),
        ("down_block_types", ("AttnDownBlock2D", "DownBlock2D")),
    ],
)
def test_unsupported_option_is_named(option, value):
    config = {**CONFIGS["sd1"], option: value}
    with pytest.raises(ValueError, match=rf"{option}.*Stable Diffusion 1\.x/2\.x"):
        UNet2DConditionModel(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("flip, shift, dim", [(True, 0, 32), (False, 1, 33)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    ref = torch_timestep_embedding(torch.from_numpy(t), dim, flip, shift).numpy()
    out = np.asarray(get_timestep_embedding(jnp.asarray(t), dim, flip, shift))
    # float32 arguments reach ~1e3, where one ulp of exp() moves sin by ~6e-5.
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
