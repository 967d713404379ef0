"""Shared model parts: CPU attention path and shape-only module construction."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unlearn_jax.benchmarks.tiny_model import save_tiny_model
from unlearn_jax.models import attention
from unlearn_jax.models.abstract import abstract_module
from unlearn_jax.models.clip import CLIPTextModel
from unlearn_jax.models.unet import UNet2DConditionModel
from unlearn_jax.models.vae import AutoencoderKL


@pytest.mark.parametrize("tq,tk", [(64, 64), (64, 77)])
def test_per_head_attention_equals_jax_attention(tq, tk):
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


def test_per_head_attention_bfloat16_keeps_float32_softmax():
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (2, 16, 2, 8), jnp.bfloat16) for key in keys)
    got = attention.per_head_attention(q, k, v, scale=8**-0.5)
    assert got.dtype == jnp.bfloat16
    want = jax.nn.dot_product_attention(q, k, v, scale=8**-0.5)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2)


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
    q = jnp.ones((2, 16, 2, 8))
    traced = lambda: str(
        jax.make_jaxpr(lambda x: attention.dot_product_attention(x, x, x, scale=1.0))(q)
    )
    assert jax.default_backend() == "cpu" and "scan" in traced()  # the per-head loop
    with attention.accelerator_attention():
        assert "scan" not in traced()  # what GPU/TPU run, e.g. for the planner
    assert "scan" in traced()
