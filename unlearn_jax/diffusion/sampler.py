"""The sampler with classifier-free guidance: one `lax.scan` inside one `jit`.

The sampler is generic over the solver (DDIM, DPM-Solver++(2M), Euler: a plan
implementing `solvers.SolverPlan`, whose carry may hold solver state) and over
a pure model function

    model_fn(params, latents [B,h,w,C] f32, timesteps [B], context [B,L,D]) -> [B,h,w,C]

returning the epsilon / v / x_0 prediction (as `plan.prediction_type` says), in
NHWC layout; timesteps are int32, or float32 where a solver uses fractional ones
(Euler). `params` is an explicit argument (any pytree, e.g. an NNX state) rather
than closed over, so that ONE compiled sampler serves the original and the
unlearned model: swapping parameters of the same structure never retraces.
`model_fn` itself is a static argument of the jit, hashed by identity: define
it once (module level or once per run), not as a fresh lambda per call.

Randomness (only used when eta > 0): the noise of step i for example j is
`normal(fold_in(fold_in(key, example_ids[j]), i))`, so it depends neither on
the batch composition nor on sharding; chunked streaming therefore reproduces
one big batch exactly.

Text embeddings are inputs, computed once by the caller. The initial latents
are the caller's standard normal noise; the plan applies its init_noise_sigma.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax.diffusion.solvers import SolverPlan

Array = jax.Array
Params = Any
ModelFn = Callable[[Params, Array, Array, Array], Array]


def uses_guidance(guidance_scale: float) -> bool:
    """diffusers' `do_classifier_free_guidance`: scale <= 1 runs the conditional model only."""
    return guidance_scale > 1.0


def guided_model_output(
    model_fn: ModelFn,
    params: Params,
    latents: Array,
    t: Array,
    cond_context: Array,
    uncond_context: Array | None,
    guidance_scale: Array | float,
    use_guidance: bool,
) -> Array:
    """Model output with classifier-free guidance, from one batched model call.

    Args:
      model_fn, params: the model (see module docstring).
      latents: [B,h,w,C] float32.
      t: scalar timestep shared by the batch: integer (passed on as int32) or
        float32 (fractional, passed on as is).
      cond_context: [B,L,D] prompt embeddings.
      uncond_context: [L,D] or [B,L,D] empty-prompt embeddings; unused (may be
        None) when use_guidance is False.
      guidance_scale: w in eps_u + w (eps_c - eps_u).
      use_guidance: static; False skips the unconditional half entirely.

    Returns:
      [B,h,w,C] float32 guided prediction.
    """
    batch = latents.shape[0]
    t = jnp.asarray(t)
    t_dtype = t.dtype if jnp.issubdtype(t.dtype, jnp.floating) else jnp.int32
    if not use_guidance:
        timesteps = jnp.full((batch,), t, t_dtype)
        return model_fn(params, latents, timesteps, cond_context).astype(jnp.float32)
    if uncond_context is None:
        raise ValueError("guidance_scale > 1 needs uncond_context")
    uncond_context = jnp.broadcast_to(uncond_context, cond_context.shape).astype(cond_context.dtype)
    # Interleave (uncond_j, cond_j) pairs instead of concatenating the halves as
    # diffusers does: with the batch sharded over devices each device then keeps
    # its own rows, and no all-to-all is needed. The per-row result is the same.
    pair = lambda u, c: jnp.stack([u, c], axis=1).reshape((2 * batch,) + u.shape[1:])
    output = model_fn(
        params,
        pair(latents, latents),
        jnp.full((2 * batch,), t, t_dtype),
        pair(uncond_context, cond_context),
    ).astype(jnp.float32)
    output = output.reshape((batch, 2) + output.shape[1:])
    output_uncond, output_cond = output[:, 0], output[:, 1]
    return output_uncond + guidance_scale * (output_cond - output_uncond)


def step_noise(key: Array, example_ids: Array, step: Array | int, shape: tuple[int, ...]) -> Array:
    """Standard normal noise of sampler step `step` for each example.

    Args:
      key: the sampler's PRNG key (split from the root key for this purpose).
      example_ids: [B] int32 global index of each example.
      step: the sampler step index i (0 = first, noisiest step).
      shape: per-example shape (h, w, C).

    Returns:
      [B, *shape] float32.
    """

    def one(example_id: Array) -> Array:
        step_key = jax.random.fold_in(jax.random.fold_in(key, example_id), step)
        return jax.random.normal(step_key, shape, jnp.float32)

    return jax.vmap(one)(example_ids)


def _denoise_step(
    model_fn: ModelFn,
    params: Params,
    plan: SolverPlan,
    cond_context: Array,
    uncond_context: Array | None,
    guidance_scale: Array,
    key: Array,
    example_ids: Array,
    eta: float,
    use_guidance: bool,
    carry: Any,
    step: Array,
) -> Any:
    """Sampler step `step`: the solver's carry before it -> after it."""
    latents, t = plan.model_input(carry, step), plan.timestep(step)
    model_output = guided_model_output(
        model_fn, params, latents, t, cond_context, uncond_context, guidance_scale, use_guidance
    )
    noise = step_noise(key, example_ids, step, model_output.shape[1:]) if eta > 0 else None
    return plan.step(carry, model_output, step, eta=eta, noise=noise)


def _sample_loop(
    model_fn: ModelFn,
    params: Params,
    plan: SolverPlan,
    latents: Array,
    cond_context: Array,
    uncond_context: Array | None,
    guidance_scale: Array,
    key: Array,
    example_ids: Array,
    *,
    eta: float,
    use_guidance: bool,
    debug: bool,
    trajectory: bool = False,
) -> Array:
    """The whole denoising loop; `debug` runs it step by step in Python, eagerly.

    `trajectory`: return the model's input latents of every step, [B, steps, h, w, C]
    (what ESD trains on), instead of the final latents.
    """
    step_fn = functools.partial(
        _denoise_step,
        model_fn,
        params,
        plan,
        cond_context,
        uncond_context,
        guidance_scale,
        key,
        example_ids,
        eta,
        use_guidance,
    )

    def scan_step(carry, step):
        return step_fn(carry, step), (plan.model_input(carry, step) if trajectory else None)

    carry = plan.init(latents)
    if debug:
        inputs = []
        for step in range(plan.num_steps):
            carry, x = scan_step(carry, jnp.int32(step))
            inputs.append(x)
        return jnp.stack(inputs, axis=1) if trajectory else plan.final(carry)
    steps = jnp.arange(plan.num_steps, dtype=jnp.int32)
    carry, inputs = jax.lax.scan(scan_step, carry, steps)
    return jnp.swapaxes(inputs, 0, 1) if trajectory else plan.final(carry)


# One trace per (model_fn, solver kind, eta, use_guidance, shapes/dtypes/shardings);
# params, plan arrays (the step count is only the scan's length), guidance scale,
# key and example ids are all traced inputs.
sample_jit = jax.jit(
    functools.partial(_sample_loop, debug=False),
    static_argnames=("model_fn", "eta", "use_guidance", "trajectory"),
)


def checked_options(
    plan: SolverPlan,
    guidance_scale: float,
    eta: float,
    key: Array | None,
    uncond_context: Any,
) -> tuple[bool, Array, Any]:
    """Validates the sampler options; returns (use_guidance, key, uncond_context) as traced.

    Without guidance the empty-prompt embedding is dropped (never shipped to the
    device nor traced); without eta noise the key is a placeholder.
    """
    use_guidance = uses_guidance(guidance_scale)
    if use_guidance and uncond_context is None:
        raise ValueError("guidance_scale > 1 needs uncond_context")
    if eta != 0 and not plan.supports_eta:
        raise ValueError(
            f"eta={eta} is a DDIM option; {type(plan).__name__} is deterministic (use eta=0)"
        )
    if eta > 0 and key is None:
        raise ValueError("eta > 0 needs a PRNG key")
    if key is None:
        key = placeholder_key()  # unused: eta == 0 draws no noise
    return use_guidance, key, uncond_context if use_guidance else None


def placeholder_key() -> Array:
    """A key equal to `jax.random.key(0)` (its data is all zeros), made without running
    the seed's hash: XLA:CPU compiles that program in 0.1-0.4 s, on the start-up path of
    every deterministic sampling run."""
    spec = _key_data_spec(jax.config.jax_default_prng_impl)
    return jax.random.wrap_key_data(np.zeros(spec.shape, spec.dtype))


@functools.cache
def _key_data_spec(impl: str) -> jax.ShapeDtypeStruct:
    """Shape and dtype of a key's data under the PRNG implementation `impl` (traced once)."""
    del impl  # the cache key: jax.random.key follows the configured default
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))


def sample(
    model_fn: ModelFn,
    params: Params,
    plan: SolverPlan,
    latents: Array,
    cond_context: Array,
    uncond_context: Array | None = None,
    *,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    key: Array | None = None,
    example_ids: Array | None = None,
    debug: bool = False,
    trajectory: bool = False,
) -> Array:
    """Run a solver with classifier-free guidance from given initial noise.

    Args:
      model_fn: pure model function (see module docstring); static, by identity.
      params: model parameters pytree, passed to model_fn.
      plan: the solver and its timesteps (`solvers.make_plan`, `ddim.ddim_plan`, ...).
      latents: [B,h,w,C] initial standard normal noise.
      cond_context: [B,L,D] prompt embeddings.
      uncond_context: [L,D] or [B,L,D] empty-prompt embeddings; needed iff
        guidance_scale > 1.
      guidance_scale: CFG weight w; <= 1 skips the unconditional model call
        (the value only decides that statically; other values reuse the trace).
      eta: DDIM eta, static (0 = deterministic, the default for integrity);
        other solvers are deterministic and accept only 0.
      key: PRNG key for the eta > 0 noise; required iff eta > 0.
      example_ids: [B] int32 global example indices for the per-example noise
        streams; defaults to arange(B).
      debug: run an eager Python loop over steps instead of the compiled scan
        (same step function; for stepping through with a debugger or prints).
      trajectory: return every step's model input instead (static).

    Returns:
      [B,h,w,C] float32 final latents x_0; with `trajectory`, [B,steps,h,w,C]: the
      latents the model saw at each step (the first is the scaled initial noise).
    """
    batch = latents.shape[0]
    use_guidance, key, uncond_context = checked_options(
        plan, guidance_scale, eta, key, uncond_context
    )
    if example_ids is None:
        example_ids = jnp.arange(batch, dtype=jnp.int32)
    args = (
        params,
        plan,
        latents,
        cond_context,
        uncond_context,
        jnp.float32(guidance_scale),
        key,
        example_ids,
    )
    options = dict(eta=float(eta), use_guidance=use_guidance, trajectory=trajectory)
    if debug:
        return _sample_loop(model_fn, *args, debug=True, **options)
    return sample_jit(model_fn, *args, **options)


ddim_sample = sample  # the name callers used before other solvers existed; any plan works
