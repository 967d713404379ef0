"""Attention's implementation choice (`attention.choose_implementation`) and the
numerics of every form this machine can run, against a NumPy reference.

The 'cudnn' form needs a CUDA GPU: here it can only be selected (the rules are
pure functions of backend, dtype, shapes and compute capability), not run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unlearn_jax.models import attention

H100, A100, V100 = (9, 0), (8, 0), (7, 0)


def numpy_attention(q, k, v, scale):
    """softmax(q k^T * scale) v in float64: q [B,Tq,H,D], k [B,Tk,H,D], v [B,Tk,H,Dv]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def shapes(head_dim, tq=4096, tk=77, heads=8):
    return (2, tq, heads, head_dim), (2, tk, heads, head_dim)


@pytest.mark.parametrize(
    "head_dim,capability,dtype,want",
    [
        (40, H100, jnp.bfloat16, "cudnn"),  # SD-1.5's first level
        (80, H100, jnp.float16, "cudnn"),
        (160, H100, jnp.bfloat16, "cudnn"),  # SD-1.5's third level: <= 256 from Hopper
        (160, A100, jnp.bfloat16, "xla"),  # ... but <= 128 on Ampere
        (64, A100, jnp.bfloat16, "cudnn"),  # SD-2.1's heads
        (512, H100, jnp.bfloat16, "xla"),  # SD's one-head VAE attention
        (40, H100, jnp.float32, "xla"),  # cuDNN's flash attention: fp16/bf16 only
        (4, H100, jnp.bfloat16, "xla"),  # not a multiple of 8
        (36, H100, jnp.bfloat16, "xla"),
        (40, V100, jnp.bfloat16, "xla"),  # before Ampere
        (40, None, jnp.bfloat16, "xla"),  # a GPU that is no CUDA device (ROCm)
    ],
)
def test_gpu_choice(head_dim, capability, dtype, want):
    q_shape, v_shape = shapes(head_dim)
    got = attention.choose_implementation(
        "gpu", dtype, q_shape, v_shape, compute_capability=capability
    )
    assert got == want


def test_choice_on_other_backends_and_for_accelerator_programs():
    q_shape, v_shape = shapes(40)
    choose = lambda backend, **kw: attention.choose_implementation(
        backend, jnp.bfloat16, q_shape, v_shape, **kw
    )
    assert choose("cpu") == "per_head"
    assert choose("tpu") == "xla"
    assert choose("cpu", accelerator_program=True) == "xla"  # the planner's programs
    # FLOP counts on a GPU: XLA counts a cuDNN custom call as 0 FLOPs.
    assert choose("gpu", compute_capability=H100, accelerator_program=True) == "xla"
    # Different q and v head dims: cuDNN would need its MLA kernels; XLA.
    assert (
        attention.choose_implementation(
            "gpu", jnp.bfloat16, (2, 64, 8, 64), (2, 77, 8, 32), compute_capability=H100
        )
        == "xla"
    )
    assert attention.cudnn_max_head_dim(H100) == 256 and attention.cudnn_max_head_dim(A100) == 128


def test_this_machine_has_no_cuda_gpu():
    # (test_model_parts checks that the CPU traces the per-head loop, and XLA's form
    # inside accelerator_attention.)
    assert jax.default_backend() == "cpu" and attention.cuda_compute_capability() is None


@pytest.mark.parametrize("tq,tk,head_dim,value_dim", [(64, 64, 8, 8), (64, 77, 40, 40)])
def test_runnable_forms_equal_numpy(tq, tk, head_dim, value_dim):
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (3, tq, 4, head_dim))
    k = jax.random.normal(keys[1], (3, tk, 4, head_dim))
    v = jax.random.normal(keys[2], (3, tk, 4, value_dim))
    scale = head_dim**-0.5
    want = numpy_attention(q, k, v, scale)
    per_head = attention.per_head_attention(q, k, v, scale=scale)
    np.testing.assert_allclose(per_head, want, atol=3e-6)
    xla = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    np.testing.assert_allclose(xla, want, atol=3e-6)
    with attention.accelerator_attention():  # the dispatcher's 'xla' branch
        np.testing.assert_allclose(
            jax.jit(lambda *a: attention.dot_product_attention(*a, scale=scale))(q, k, v),
            want,
            atol=3e-6,
        )
    np.testing.assert_allclose(  # the dispatcher's 'per_head' branch
        attention.dot_product_attention(q, k, v, scale=scale), want, atol=3e-6
    )


def test_bfloat16_forms_agree_with_numpy_to_bfloat16_precision():
    keys = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(key, (2, 64, 2, 16)).astype(jnp.bfloat16) for key in keys)
    want = numpy_attention(q, k, v, 0.25)
    for got in (
        attention.per_head_attention(q, k, v, scale=0.25),
        jax.nn.dot_product_attention(q, k, v, scale=0.25, implementation="xla"),
    ):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2)


def test_tpu_choice():
    choose = lambda tq, tk, d=40, dv=40: attention.choose_implementation(
        "tpu", jnp.bfloat16, (2, tq, 8, d), (2, tk, 8, dv)
    )
    assert choose(4096, 4096) == "tpu_flash"  # SD-1.5's 64x64 self-attention
    assert choose(1024, 1024, 80, 80) == "tpu_flash"  # 32x32
    assert choose(256, 256, 160, 160) == "xla"  # 16x16: > 128 only in multiples of 128
    assert choose(256, 256, 256, 256) == "tpu_flash"
    assert choose(4096, 77) == "xla"  # cross-attention to the 77 text tokens
    assert choose(64, 64) == "xla"  # 8x8 latents: less than one 128-row block
    assert choose(4096, 4096, 40, 80) == "xla"  # the kernels need equal head dims
    assert choose(4096, 4096) != attention.choose_implementation(  # the planner's FLOPs
        "tpu", jnp.bfloat16, (2, 4096, 8, 40), (2, 4096, 8, 40), accelerator_program=True
    )


def test_tpu_flash_equals_numpy_and_xla_gradients_in_the_tpu_interpreter():
    """The Pallas kernels (forward and backward) run in Pallas's TPU interpreter on CPU:
    values against NumPy, gradients against XLA's form; through the dispatcher as a TPU
    program (`accelerator_attention('tpu')`) traces it."""
    from jax.experimental.pallas import tpu as pltpu

    keys = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(key, (2, 256, 2, 40)) for key in keys)
    scale = 40**-0.5
    squares = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) ** 2)
    flash = lambda q, k, v: attention.dot_product_attention(q, k, v, scale=scale)
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    with pltpu.force_tpu_interpret_mode(), attention.accelerator_attention("tpu"):
        text = jax.jit(flash).lower(q, k, v).as_text()
        got = jax.jit(flash)(q, k, v)
        grads = jax.jit(jax.grad(squares(flash), argnums=(0, 1, 2)))(q, k, v)
    # Blocks of 128 queries x 128 keys, never the whole [256, 256] logits that XLA's has.
    assert "256x256" not in text and "256x256" in jax.jit(xla).lower(q, k, v).as_text()
    np.testing.assert_allclose(got, numpy_attention(q, k, v, scale), atol=3e-6)
    want = jax.grad(squares(xla), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)
