"""Shared model parts: CPU attention path, GroupNorm, convolutions of small maps and
shape-only module construction."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unlearn_jax.models import attention, convolution
from unlearn_jax.models.abstract import abstract_module
from unlearn_jax.models.activations import gelu
from unlearn_jax.models.clip import CLIPTextModel
from unlearn_jax.models.normalization import group_norm
from unlearn_jax.models.unet import UNet2DConditionModel
from unlearn_jax.models.vae import AutoencoderKL
from unlearn_jax.testing.tiny_model import save_tiny_model


@pytest.mark.parametrize("block_bytes", [attention.BLOCK_BYTES, 4 * 3 * 77 * 16])
@pytest.mark.parametrize("tq,tk", [(64, 64), (64, 77)])
def test_per_head_attention_equals_jax_attention(tq, tk, block_bytes, monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_BYTES", block_bytes)  # small: 4 query blocks
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (3, tq, 4, 8))
    k = jax.random.normal(keys[1], (3, tk, 4, 8))
    v = jax.random.normal(keys[2], (3, tk, 4, 8))
    want = jax.nn.dot_product_attention(q, k, v, scale=0.3)
    got = attention.per_head_attention(q, k, v, scale=0.3)
    np.testing.assert_allclose(got, want, atol=2e-6)
    # Gradients too: training on CPU goes through the loop.
    loss = lambda f: lambda q: jnp.sum(f(q, k, v, scale=0.3) ** 2)
    np.testing.assert_allclose(
        jax.grad(loss(attention.per_head_attention))(q),
        jax.grad(loss(jax.nn.dot_product_attention))(q),
        atol=2e-5,
    )


def test_query_blocks_divide_the_queries_and_fit_the_budget():
    assert attention.query_block(2, 4096, 4096) == 128  # 2 x 128 x 4096 x 4 bytes = 4 MiB
    assert attention.query_block(1, 256, 77) == 256  # one block: the whole head fits
    block = attention.query_block(7, 2304, 2304)  # 48x48 latents
    assert 2304 % block == 0 and 4 * 7 * block * 2304 <= attention.BLOCK_BYTES
    assert attention.query_block(10**6, 97, 10**6) == 1  # nothing fits: one query at a time


# The CPU attention under a jit whose batch is sharded over 2 CPU devices.
SHARDED_ATTENTION = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from unlearn_jax.models import attention
q = jax.random.normal(jax.random.key(0), (4, 256, 4, 8))
rows = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P("data"))
fn = jax.jit(lambda x: attention.dot_product_attention(x, x, x, scale=0.3), out_shardings=rows)
compiled = fn.lower(jax.device_put(q, rows)).compile()
hlo = compiled.as_text()
for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
    assert op not in hlo, op
got = compiled(jax.device_put(q, rows))
np.testing.assert_allclose(got, jax.nn.dot_product_attention(q, q, q, scale=0.3), atol=2e-6)
print("ok", len(got.sharding.device_set))
"""

# 'blockwise' (an accelerator program's attention with large logits) under batch_mesh.
SHARDED_BLOCKWISE = """
import jax, jax.numpy as jnp, numpy as np
from unlearn_jax.models import attention
from unlearn_jax.trainer import sharding
mesh = sharding.make_mesh(2, 1)
rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
q = jax.random.normal(jax.random.key(0), (4, 2048, 4, 16))
attend = lambda q: attention.dot_product_attention(q, q * 0.5, q, scale=0.3)
loss = jax.jit(jax.grad(lambda q: jnp.sum(attend(q) ** 2)), in_shardings=rows, out_shardings=rows)
with attention.accelerator_attention(), attention.batch_mesh(mesh):
    compiled = loss.lower(jax.device_put(q, rows)).compile()
    assert "while" in compiled.as_text()  # the 'blockwise' loop: 256 MiB of logits in all
hlo = compiled.as_text()
for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
    assert op not in hlo, op
got = compiled(jax.device_put(q, rows))
want = jax.grad(lambda q: jnp.sum(jax.nn.dot_product_attention(q, q * 0.5, q, scale=0.3) ** 2))(q)
np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
print("ok", len(got.sharding.device_set))
"""


@pytest.mark.parametrize("script", [SHARDED_ATTENTION, SHARDED_BLOCKWISE], ids=["cpu", "blockwise"])
def test_attention_keeps_each_device_on_its_own_rows(script):
    """No collective in a batch-sharded program: each device attends over its own examples,
    and the result equals one device's.

    A loop over the sharded batch axis would make XLA gather every example onto
    every device and compute all of them there (2 CPU devices then sampled 1.5x
    slower than they should). 'blockwise''s loops run under `shard_map` over the batch
    axes for the same reason: left to the partitioner, they were replicated.
    """
    env = {k: v for k, v in os.environ.items() if k != "UNLEARN_JAX_CPU_DEVICES"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "2"]


def test_per_head_attention_bfloat16_keeps_float32_softmax():
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (2, 16, 2, 8), jnp.bfloat16) for key in keys)
    got = attention.per_head_attention(q, k, v, scale=8**-0.5)
    assert got.dtype == jnp.bfloat16
    want = jax.nn.dot_product_attention(q, k, v, scale=8**-0.5)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2)


def test_gelu_is_torchs_erf_gelu():
    torch = pytest.importorskip("torch")
    x = np.linspace(-12, 12, 4001, dtype=np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(gelu(jnp.asarray(x)), want, rtol=1e-6, atol=1e-6)
    exact = lambda x: jax.nn.gelu(x, approximate=False)
    np.testing.assert_allclose(gelu(x), exact(x), atol=2e-6)
    d_gelu = jax.vmap(jax.grad(gelu))(jnp.asarray(x))
    np.testing.assert_allclose(d_gelu, jax.vmap(jax.grad(exact))(x), atol=1e-5)
    assert gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def _norm_and_input(dtype, mean: float):
    norm = group_norm(32, 8, 1e-6, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    norm.scale.value = jnp.asarray(rng.standard_normal(32), jnp.float32)
    norm.bias.value = jnp.asarray(rng.standard_normal(32), jnp.float32)
    x = (mean + 0.5 * rng.standard_normal((3, 6, 5, 32))).astype(np.float32)
    return norm, x


@pytest.mark.parametrize("mean", [0.0, 1e3])
def test_group_norm_equals_torch(mean):
    """torch's two-pass statistics: a large mean (E[x^2] - E[x]^2 would lose the
    variance of 0.25 next to 1e6) still normalises to torch's values."""
    torch = pytest.importorskip("torch")
    norm, x = _norm_and_input(jnp.float32, mean)
    want = torch.nn.functional.group_norm(
        torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),  # NCHW, as diffusers runs
        8,
        torch.tensor(np.array(norm.scale.value)),
        torch.tensor(np.array(norm.bias.value)),
        1e-6,
    )
    got = norm(jnp.asarray(x))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-3 if mean else 2e-6)


def test_group_norm_matches_nnx_values_gradients_and_bfloat16():
    norm, x = _norm_and_input(jnp.float32, 3.0)
    reference = nnx.GroupNorm(32, num_groups=8, epsilon=1e-6, use_fast_variance=False,
                              rngs=nnx.Rngs(0))  # fmt: skip
    nnx.update(reference, nnx.state(norm))

    def loss(module, x):
        return jnp.sum(jnp.sin(module(x)))

    (grads, d_x), (want_grads, want_d_x) = (
        nnx.grad(loss, argnums=(0, 1))(module, jnp.asarray(x)) for module in (norm, reference)
    )
    np.testing.assert_allclose(norm(x), reference(x), atol=1e-5)
    for got, want in zip(
        jax.tree.leaves((d_x, grads)), jax.tree.leaves((want_d_x, want_grads)), strict=True
    ):  # sums of ~100 terms: float32 rounding relative to the largest
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())

    # bfloat16 compute: input and parameters read in bfloat16 as nnx reads them, so the
    # two agree to bfloat16 rounding of the result (float32 weights would not).
    half, _ = _norm_and_input(jnp.bfloat16, 3.0)
    half_reference = nnx.GroupNorm(32, num_groups=8, epsilon=1e-6, use_fast_variance=False,
                                   dtype=jnp.bfloat16, rngs=nnx.Rngs(0))  # fmt: skip
    nnx.update(half_reference, nnx.state(half))
    out = half(jnp.asarray(x))
    assert out.dtype == jnp.bfloat16  # statistics in float32, the result in the compute dtype
    want = half_reference(jnp.asarray(x)).astype(np.float32)
    np.testing.assert_allclose(out.astype(np.float32), want, rtol=8e-3, atol=1e-2)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize(
    "cls,component",
    [(UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")],
)
def test_abstract_module_matches_eval_shape_with_real_rngs(tiny_folder, cls, component):
    config = json.loads((tiny_folder / component / "config.json").read_text())
    reference = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    fast = abstract_module(lambda rngs: cls(config, rngs=rngs))
    assert nnx.graphdef(fast) == nnx.graphdef(reference)
    want, got = nnx.state(reference), nnx.state(fast)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype) == (b.shape, b.dtype)


def test_accelerator_attention_traces_the_fused_path_on_cpu():
    q = jnp.ones((4, 256, 2, 8))  # 2 MiB of logits: the CPU's loop (`CPU_LOOP_LOGITS_BYTES`)
    traced = lambda: str(
        jax.make_jaxpr(lambda x: attention.dot_product_attention(x, x, x, scale=1.0))(q)
    )
    assert jax.default_backend() == "cpu" and "scan" in traced()  # the per-head loop
    with attention.accelerator_attention():
        assert "scan" not in traced()  # what GPU/TPU run, e.g. for the planner
    assert "scan" in traced()


@pytest.mark.parametrize(
    ("hw", "kernel", "padding"),
    [
        ((2, 2), (3, 3), ((1, 1), (1, 1))),  # VGG's last block at 32x32 images
        ((1, 1), (3, 3), ((1, 1), (1, 1))),
        ((3, 3), (5, 5), ((2, 2), (2, 2))),  # AlexNet's second conv at 32x32
        ((2, 4), (3, 3), ((0, 1), (2, 1))),  # uneven map and padding
        ((6, 6), (3, 3), ((1, 1), (1, 1))),  # large enough: XLA's own convolution
    ],
)
def test_small_maps_convolve_as_a_matmul_equal_to_xlas_convolution(hw, kernel, padding):
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (3, *hw, 8))
    w = jax.random.normal(keys[1], (*kernel, 8, 5))
    dims = ("NHWC", "HWIO", "NHWC")
    want = jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dims)
    got = jax.jit(convolution.conv_general_dilated, static_argnums=(2, 3, 6))(
        x, w, (1, 1), padding, None, None, dims
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(convolution.im2col_conv(x, w, padding), want, rtol=1e-5, atol=1e-5)
    # On CPU the small maps take the matmul form: XLA compiles no convolution for them.
    small = convolution.smaller_than_kernel(hw, kernel)
    assert small == (hw != (6, 6))
    compiled = (
        jax.jit(
            lambda x, w: convolution.conv_general_dilated(x, w, (1, 1), padding, None, None, dims)
        )
        .lower(x, w)
        .compile()
        .as_text()
    )
    assert ("convolution(" in compiled) == (not small)


def test_other_convolutions_are_xlas_own():
    """Strides, dilations, groups, string padding and lax's default NCHW layout go to
    lax.conv_general_dilated."""
    x = jax.random.normal(jax.random.key(1), (2, 2, 2, 4))
    w = jax.random.normal(jax.random.key(2), (3, 3, 4, 4))
    grouped = jax.random.normal(jax.random.key(3), (3, 3, 1, 4))
    cases = [
        dict(window_strides=(2, 2), padding=((1, 1), (1, 1))),
        dict(window_strides=(1, 1), padding="SAME"),
        dict(window_strides=(1, 1), padding=((2, 2), (2, 2)), rhs_dilation=(2, 2)),
        dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), feature_group_count=4),
    ]
    for case in cases:
        kernel = grouped if case.get("feature_group_count") else w
        fn = lambda x, k, case=case: convolution.conv_general_dilated(  # noqa: E731
            x, k, dimension_numbers=("NHWC", "HWIO", "NHWC"), **case
        )
        compiled = jax.jit(fn).lower(x, kernel).compile().as_text()
        assert "convolution(" in compiled, case
        want = jax.lax.conv_general_dilated(
            x, kernel, dimension_numbers=("NHWC", "HWIO", "NHWC"), **case
        )
        np.testing.assert_array_equal(fn(x, kernel), want)
    # Without dimension numbers lax means NCHW/OIHW: [2, 4, 2, 2] maps, 3x3 kernels.
    nchw, oihw = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)
    fn = lambda x, k: convolution.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)))  # noqa: E731
    assert "convolution(" in jax.jit(fn).lower(nchw, oihw).compile().as_text()
    want = jax.lax.conv_general_dilated(nchw, oihw, (1, 1), ((1, 1), (1, 1)))
    np.testing.assert_array_equal(fn(nchw, oihw), want)
