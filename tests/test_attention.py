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
    assert choose("cpu") == "per_head"  # 20 MiB of logits
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
    for loop_above, form in ((0, "per_head"), (2**30, "xla")):  # the dispatcher's CPU branches
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(attention, "CPU_LOOP_LOGITS_BYTES", loop_above)
            dispatched = lambda *a: attention.dot_product_attention(*a, scale=scale)
            assert ("scan" in str(jax.make_jaxpr(dispatched)(q, k, v))) == (form == "per_head")
            np.testing.assert_allclose(dispatched(q, k, v), want, atol=3e-6, err_msg=form)


def test_cpu_loops_over_heads_only_for_logits_beyond_the_caches():
    """'per_head' on CPU above `CPU_LOOP_LOGITS_BYTES` of float32 logits per device, else 'xla'."""
    limit = attention.CPU_LOOP_LOGITS_BYTES
    choose = lambda batch, tq, tk, **kw: attention.choose_implementation(
        "cpu", jnp.float32, (batch, tq, 4, 8), (batch, tk, 4, 8), **kw
    )
    rows = limit // (4 * 4 * 64 * 64)  # [rows, 4 heads, 64, 64] float32 logits = the limit
    assert choose(rows, 64, 64) == "xla"  # at the limit (the embedded model's train step: half)
    assert choose(rows + 1, 64, 64) == "per_head"
    assert choose(2 * rows, 64, 64, local_batch=rows) == "xla"  # per device, as sharded
    assert choose(2 * rows, 64, 16) == "xla"  # cross-attention to 16 tokens
    assert choose(1, 4096, 4096) == "per_head"  # SD's 64x64 latents: 256 MiB per example


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
    # The kernels need equal head dims; XLA's logits (1 GiB) would be too large.
    assert choose(4096, 4096, 40, 80) == "blockwise"
    assert choose(512, 512, 40, 80) == "xla"
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


def test_blockwise_choice_where_xla_would_hold_large_logits():
    """'blockwise' replaces 'xla' when the float32 logits per device exceed LOGITS_BYTES."""
    sd15 = (1, 4096, 8, 40)  # SD-1.5's 64x64 self-attention: 512 MiB of logits per example
    choose = lambda backend, q=sd15, v=sd15, dtype=jnp.bfloat16, **kw: (
        attention.choose_implementation(backend, dtype, q, v, **kw)
    )
    assert choose("cpu", accelerator_program=True) == "blockwise"  # the planner's programs
    assert choose("cpu", q=(1, 4096, 8, 40), v=(1, 77, 8, 40), accelerator_program=True) == "xla"
    assert choose("gpu", dtype=jnp.float32, compute_capability=H100) == "blockwise"
    assert choose("gpu", compute_capability=H100) == "cudnn"  # the fused kernel comes first
    assert choose("tpu") == "tpu_flash"
    assert choose("tpu", q=(1, 4000, 8, 40), v=(1, 4000, 8, 40)) == "blockwise"  # not 128s
    assert choose("cpu") == "per_head"  # the CPU's own loop bounds its forward's memory
    # 32x32 latents: 32 MiB per example. Per device it is the local batch that counts.
    small = dict(q=(8, 1024, 8, 80), v=(8, 1024, 8, 80), accelerator_program=True)
    assert choose("cpu", **small, local_batch=1) == "xla"
    assert choose("cpu", **small) == "blockwise"  # 8 examples on one device: 256 MiB


def test_blockwise_blocks_fit_the_budget():
    block = attention.blockwise_block
    assert block(1, 8, 4096, 4096) == 512  # 8 x 512 x 4096 x 4 bytes = 64 MiB
    assert block(4, 8, 77, 77) == 77  # everything fits: one block
    assert block(1, 8, 15625, 15625) == 125  # a divisor near the budget: no padding
    assert block(2, 8, 16129, 16129) == 64  # 127^2: padded blocks of a multiple of 8
    assert block(1, 1, 97, 10**9) == 1  # nothing fits: one query at a time
    for args in [(1, 8, 4096, 4096), (3, 5, 1000, 777), (2, 8, 16129, 16129)]:
        assert 4 * args[0] * args[1] * block(*args) * args[3] <= attention.LOGITS_BYTES


@pytest.mark.parametrize("tq,block", [(96, 32), (100, 24), (64, 64)])  # 24: padded blocks
def test_blockwise_equals_numpy_and_xla_gradients(tq, block):
    keys = jax.random.split(jax.random.key(4), 4)
    q = jax.random.normal(keys[0], (2, tq, 3, 16))
    k, v = (jax.random.normal(key, (2, 77, 3, 16)) for key in keys[1:3])
    weights = jax.random.normal(keys[3], (2, tq, 3, 16))
    blockwise = lambda q, k, v: attention.blockwise_attention(q, k, v, 0.25, block)
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=0.25, implementation="xla")
    np.testing.assert_allclose(
        jax.jit(blockwise)(q, k, v), numpy_attention(q, k, v, 0.25), atol=3e-6
    )
    weighted = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * weights)
    got = jax.jit(jax.grad(weighted(blockwise), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(weighted(xla), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)
    # bfloat16: the forward is XLA's arithmetic; gradients to bfloat16 precision.
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = blockwise(qb, kb, vb)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out), np.float32(xla(qb, kb, vb)), atol=1e-2)
    got = jax.grad(weighted(blockwise), argnums=(0, 1, 2))(qb, kb, vb)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(g), w, atol=0.05 * float(np.abs(w).max()))


def test_blockwise_gradient_keeps_one_block_of_logits():
    """The gradient program never holds the whole [Tq, Tk] logits, and its temporaries
    are a fraction of XLA's form, whose backward keeps the probabilities."""
    q = jnp.ones((1, 2048, 4, 16))
    loss = lambda f: jax.grad(lambda q: jnp.sum(f(q, q * 2, q) ** 2))
    blockwise = jax.jit(loss(lambda q, k, v: attention.blockwise_attention(q, k, v, 0.3, 256)))
    xla = jax.jit(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=0.3)))
    assert "2048x2048" not in blockwise.lower(q).as_text()
    assert "2048x2048" in xla.lower(q).as_text()
    temp = lambda f: f.lower(q).compile().memory_analysis().temp_size_in_bytes
    assert temp(blockwise) < 0.3 * temp(xla)  # 64 MiB of logits per head set vs 8 MiB blocks


def test_loop_flops_count_every_iteration():
    """The planner's FLOPs: XLA's cost analysis counts a loop body once; `flops_of` adds
    the other iterations from the jaxpr, within 1% of XLA's count of the loop unrolled."""
    from unlearn_jax.planning import costs, programs

    keys = jax.random.split(jax.random.key(5), 3)
    q, k, v = (jax.random.normal(key, (2, 512, 4, 40), jnp.bfloat16) for key in keys)
    flops = lambda f, *args: costs.flops_of(programs.compile_planned(jax.jit(f), *args)[0])
    attend = lambda block: lambda q, k, v: attention.blockwise_attention(q, k, v, 0.3, block)
    one_block = flops(attend(512), q, k, v)
    assert flops(attend(64), q, k, v) == pytest.approx(one_block, rel=0.01)  # 8 iterations
    without = costs.xla_flops(programs.compile_planned(jax.jit(attend(64)), q, k, v)[0])
    assert without < 0.2 * one_block  # what XLA alone counts: one of the 8 blocks

    def body(w, x):
        return w, jnp.sum(jnp.tanh(x @ w) * 2 + 1, axis=0)

    w, xs = jnp.ones((64, 64)), jnp.ones((16, 32, 64))
    looped = lambda w, xs: jnp.sum(jax.lax.scan(body, w, xs)[1] ** 2)
    unrolled = lambda w, xs: jnp.sum(jnp.stack([body(w, x)[1] for x in xs]) ** 2)
    assert flops(jax.grad(looped), w, xs) == pytest.approx(
        flops(jax.grad(unrolled), w, xs), rel=0.01
    )
