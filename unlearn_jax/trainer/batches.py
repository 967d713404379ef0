"""Training batches for a preset, as a pure function of (seed, step).

Examples are drawn epoch by epoch without replacement: position p of the
example stream (p = step * batch_size + k) is example `perm_e[p mod N]` of
the permutation of epoch e = p div N, seeded by (seed, stream, e). The batch
of a step therefore depends only on the seed and the step number: a resumed
run sees exactly the batches an uninterrupted one would.

A batch is {'forget': {...}, 'retain': {...}} holding the keys the preset's
terms read (`registry.BATCH_KEYS`). Per-example arrays are laid out
[micro_steps, micro_batch, ...] for gradient accumulation and sharded over the
mesh; among them the remap family's 'anchor_context' [micro_steps, micro_batch,
L, D]: each example's anchor c_a, gathered by its forget prompt (one anchor per
forget prompt, see `unlearn_jax.data.anchors`). The keys in `SHARED_KEYS` (the
empty-prompt embedding) are [1, L, D], replicated and broadcast by the losses.
When the text encoder trains, every context is the prompt's token ids ([P, L]
int32, in a batch [micro_steps, micro_batch, L]) instead of its embedding (the
model encodes them itself, see `text_encoder`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from unlearn_jax.data.sources import Latents, Trajectories
from unlearn_jax.unlearn.registry import BATCH_KEYS, Preset

SHARED_KEYS = ("uncond_context",)
FORGET_DATA_STREAM = 0
RETAIN_DATA_STREAM = 1

Batch = dict[str, dict[str, np.ndarray]]


def stream_indices(seed: int, stream: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Example indices [batch_size] of `step`: epoch-wise permutations of range(n)."""
    positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs = positions // n
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        permutation = np.random.default_rng([seed, stream, int(epoch)]).permutation(n)
        rows = epochs == epoch
        out[rows] = permutation[positions[rows] % n]
    return out


@dataclasses.dataclass
class UnlearnData:
    """Everything the train loop draws batches from, on the host.

    Attributes:
      preset: the method (which terms, hence which keys).
      forget_context: [Pf, L, D] embeddings of the forget prompts.
      anchor_context: [A, L, D] embeddings of the A distinct anchors c_a.
      uncond_context: [1, L, D] embedding of the empty prompt.
      anchor_index: [Pf] int, the row of anchor_context paired with each forget
        prompt; None: row 0 for every prompt (one shared anchor).
      forget_latents: x0 of the forget set (non-ESD forget terms), else None.
      forget_trajectories: ESD's x_t source, else None.
      retain_context: [Pr, L, D] embeddings of the retain prompts (None without retain term).
      retain_latents: x0 of the retain set (retain_dm / retain_distill), else None.
    """

    preset: Preset
    forget_context: np.ndarray
    anchor_context: np.ndarray
    uncond_context: np.ndarray
    forget_latents: Latents | None = None
    forget_trajectories: Trajectories | None = None
    retain_context: np.ndarray | None = None
    retain_latents: Latents | None = None
    anchor_index: np.ndarray | None = None

    def anchors_of(self, prompt_index: np.ndarray) -> np.ndarray:
        """Anchor contexts [B, L, D] (token ids: [B, L]) of forget prompts `prompt_index` [B]."""
        if self.anchor_index is None:
            rows = np.zeros_like(prompt_index)
        else:
            rows = self.anchor_index[prompt_index]
        return self.anchor_context[rows]

    def _forget(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        if self.preset.forget == "esd":
            traj = self.forget_trajectories
            steps = traj.x_t.shape[1]
            run, step = idx // steps, idx % steps
            prompt_index = traj.prompt_index[run]
            values = {"x_t": traj.x_t[run, step], "t": traj.timesteps[step]}
        else:
            prompt_index = self.forget_latents.prompt_index[idx]
            values = {"x0": self.forget_latents.x0[idx]}
        values.update(context=self.forget_context[prompt_index], uncond_context=self.uncond_context)
        keys = BATCH_KEYS[self.preset.forget]
        if "anchor_context" in keys:
            values["anchor_context"] = self.anchors_of(prompt_index)
        return {k: values[k] for k in keys}

    def _retain(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        values = {
            "x0": self.retain_latents.x0[idx],
            "context": self.retain_context[self.retain_latents.prompt_index[idx]],
            "uncond_context": self.uncond_context,
        }
        return {k: values[k] for k in BATCH_KEYS[self.preset.retain]}

    @property
    def forget_size(self) -> int:
        """Number of distinct forget examples (ESD: trajectories x steps)."""
        if self.preset.forget == "esd":
            return int(np.prod(self.forget_trajectories.x_t.shape[:2]))
        return self.forget_latents.x0.shape[0]

    @property
    def needs_retain_data(self) -> bool:
        return self.preset.retain is not None and bool(BATCH_KEYS[self.preset.retain])

    def batch(self, step: int, batch_size: int, micro_steps: int, seed: int) -> Batch:
        """The batch of `step`: per-example arrays [micro_steps, batch_size // micro_steps, ...]."""
        if batch_size % micro_steps:
            raise ValueError(
                f"train.batch_size={batch_size} must be divisible by train.grad_accum={micro_steps}"
            )
        idx = stream_indices(seed, FORGET_DATA_STREAM, step, batch_size, self.forget_size)
        out = {"forget": _split_micro(self._forget(idx), micro_steps)}
        if self.needs_retain_data:
            n = self.retain_latents.x0.shape[0]
            idx = stream_indices(seed, RETAIN_DATA_STREAM, step, batch_size, n)
            out["retain"] = _split_micro(self._retain(idx), micro_steps)
        elif self.preset.retain is not None:
            out["retain"] = {}
        return out

    def saliency_chunks(self, batch_size: int) -> Iterator[tuple[float, dict[str, np.ndarray]]]:
        """(weight, {'x0', 'context'}) over the whole forget set in order; weights sum to 1.

        SalUn's saliency is the gradient of the forget denoising loss over the
        forget set: the weighted sum of the chunks' mean-loss gradients.
        """
        latents = self.forget_latents
        n = latents.x0.shape[0]
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            x0 = latents.x0[rows]
            context = self.forget_context[latents.prompt_index[rows]]
            yield x0.shape[0] / n, {"x0": x0, "context": context}


def _split_micro(values: dict[str, np.ndarray], micro_steps: int) -> dict[str, np.ndarray]:
    def split(key, x):
        if key in SHARED_KEYS:
            return x
        return x.reshape((micro_steps, x.shape[0] // micro_steps) + x.shape[1:])

    return {k: split(k, v) for k, v in values.items()}
