"""The attack objectives: pure losses of the attack's parameters on a frozen model, and the step.

Two attacks ask whether an unlearned model still draws the concept when the
prompt reaches it by another route than the erased word:

  embedding  (textual inversion, Pham et al. 2023): k new token embeddings
             v* [k, D] in the text encoder's *input* space. A forget prompt with
             the concept word replaced by k placeholder positions is encoded with
             v* spliced in there (`splice_tokens`); v* minimises the standard
             denoising loss of the unlearned UNet towards θ0's images of that prompt.
  context    a perturbation δ [P, L, D] of each forget prompt's context (the
             encoder *output*), kept inside a ball ‖δ_pl‖ <= ε ‖c_pl‖ per token
             (`project_context`), minimising the same denoising loss.

Both are `loss(attack_params, frozen, batch, rng) -> (loss, aux)`; the UNet and
the text encoder are frozen (arguments, never differentiated). The denoising
loss is `diffusion.forward.denoising_loss`, with its random streams.

Shapes: B examples per batch, P forget prompts, L tokens, D context width,
k learned tokens, latents NHWC [B, h, w, C].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unlearn_jax.diffusion.forward import DiffusionModel, denoising_loss

PyTree = Any
# text_fn(text_params, ids [B,L], mask [B,L] bool, slot [B,L] int32, tokens [k,D]) -> [B,L,D]
TextFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
AttackLoss = Callable[[jax.Array, PyTree, dict, jax.Array], tuple[jax.Array, dict]]
METHODS = ("embedding", "context")


def splice_tokens(
    token_embeds: jax.Array, mask: jax.Array, slot: jax.Array, tokens: jax.Array
) -> jax.Array:
    """Token embeddings with learned ones at the placeholder positions.

    Args:
      token_embeds: [B, L, D] the embedding table's rows for the prompt ids.
      mask: [B, L] bool, True at placeholder positions.
      slot: [B, L] int32, which learned token (0..k-1) a placeholder holds.
      tokens: [k, D] learned embeddings v*; k = 0 leaves `token_embeds` as it is.

    Returns:
      [B, L, D], `tokens[slot]` where `mask`, else `token_embeds`.
    """
    if tokens.shape[0] == 0:
        return token_embeds
    learned = jnp.take(tokens, jnp.clip(slot, 0, tokens.shape[0] - 1), axis=0)
    return jnp.where(mask[..., None], learned.astype(token_embeds.dtype), token_embeds)


@functools.cache
def clip_text_fn(text_graphdef: nnx.GraphDef) -> TextFn:
    """The `TextFn` of a CLIP text encoder structure: contexts [B,L,D] float32 with v* spliced in.

    Without placeholders (mask all False, or k = 0) it equals the encoder's normal
    output for `ids` bit for bit. One function per structure, so jits can share it.
    """

    def text_fn(text_params, ids, mask, slot, tokens):
        encoder = nnx.merge(text_graphdef, text_params)
        embeds = encoder.text_model.embeddings.token_embedding(ids)
        spliced = splice_tokens(embeds, mask, slot, tokens)
        return encoder(ids, inputs_embeds=spliced)[0].astype(jnp.float32)

    return text_fn


def embedding_attack_loss(
    tokens: jax.Array,
    frozen: dict[str, Any],
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: DiffusionModel,
    text_fn: TextFn,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Textual inversion's loss: E ||ε_θ(x_t, t, E(prompt with v*)) - ε||² on θ0's images.

    Args:
      tokens: [k, D] the learned embeddings v* (the only differentiated argument).
      frozen: 'unet' (the attacked UNet's parameters), 'text' (its text encoder's),
        'ids' [P, L] int32, 'mask' [P, L] bool, 'slot' [P, L] int32 (placeholder
        prompts, `attacks.prompts.placeholder_ids`).
      batch: 'x0' [B, h, w, C] θ0's latents, 'prompt_index' [B] int32 into the P prompts.
      rng: t and ε (the streams of `denoising.denoising_loss`).

    Returns:
      (mean squared error, {'mse': ...}).
    """
    index = batch["prompt_index"]
    context = text_fn(
        frozen["text"], frozen["ids"][index], frozen["mask"][index], frozen["slot"][index], tokens
    )
    return denoising_loss(model, frozen["unet"], {"x0": batch["x0"], "context": context}, rng)


def context_attack_loss(
    delta: jax.Array,
    frozen: dict[str, Any],
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: DiffusionModel,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """E ||ε_θ(x_t, t, c_p + δ_p) - ε||² on θ0's images of prompt p.

    Args:
      delta: [P, L, D] the perturbation of each forget prompt's context.
      frozen: 'unet' (attacked UNet parameters), 'context' [P, L, D] the prompts' contexts.
      batch: 'x0' [B, h, w, C], 'prompt_index' [B] int32.
      rng: t and ε, as `denoising.denoising_loss` draws them.

    Returns:
      (mean squared error, {'mse': ...}).
    """
    index = batch["prompt_index"]
    context = frozen["context"][index] + delta[index]
    return denoising_loss(model, frozen["unet"], {"x0": batch["x0"], "context": context}, rng)


def project_context(delta: jax.Array, context: jax.Array, epsilon: float) -> jax.Array:
    """δ scaled into the ball ‖δ_pl‖₂ <= ε ‖c_pl‖₂, token by token.

    Args:
      delta: [P, L, D] perturbation.
      context: [P, L, D] the unperturbed contexts c.
      epsilon: the bound relative to each token's own norm (0 = no perturbation).

    Returns:
      [P, L, D]: δ where it is inside the ball, else δ scaled onto its surface.
    """
    bound = epsilon * jnp.linalg.norm(context, axis=-1, keepdims=True)
    norm = jnp.linalg.norm(delta, axis=-1, keepdims=True)
    scale = jnp.minimum(1.0, bound / jnp.maximum(norm, 1e-12))
    return delta * scale


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["step", "params", "opt_state"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class AttackState:
    """The attack's trainable state.

    Attributes:
      step: int32 scalar, updates taken.
      params: v* [k, D] (embedding) or δ [P, L, D] (context).
      opt_state: the optax state of `params`.
    """

    step: jax.Array
    params: jax.Array
    opt_state: PyTree

    def to_checkpoint(self) -> dict[str, Any]:
        """A plain dict for orbax."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}

    @classmethod
    def from_checkpoint(cls, tree: dict[str, Any]) -> AttackState:
        return cls(tree["step"], tree["params"], tree["opt_state"])


def init_attack_state(params: jax.Array, optimizer: optax.GradientTransformation) -> AttackState:
    """Step 0 of an attack from its initial parameters."""
    return AttackState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_attack_step(
    loss_fn: AttackLoss,
    optimizer: optax.GradientTransformation,
    project: Callable[[jax.Array, PyTree], jax.Array] | None = None,
) -> Callable[[AttackState, PyTree, dict, jax.Array], tuple[AttackState, dict]]:
    """`step(state, frozen, batch, key) -> (state, metrics)`, to be jitted (state donated).

    The step's randomness is `fold_in(key, state.step)`, so an attack resumed from a
    checkpoint continues exactly as the uninterrupted one. `project(params, frozen)`
    runs after each update (the context attack's norm ball).
    """

    def step(state: AttackState, frozen: PyTree, batch: dict, key: jax.Array):
        rng = jax.random.fold_in(key, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, batch, rng
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if project is not None:
            params = project(params, frozen)
        metrics = {"loss": loss, **aux, "grad_norm": optax.global_norm(grads)}
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in metrics.values()]))
        metrics["finite"] = finite & jnp.all(jnp.isfinite(params))
        return AttackState(state.step + 1, params, opt_state), metrics

    return step
