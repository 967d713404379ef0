"""Forget effectiveness: the share of generations a classifier assigns to the concept.

Any classifier plugs in as a function from images to class probabilities
(a Flax network, an analytic evaluator of the embedded world, or CLIP zero-shot
over a label set built by `clip_zero_shot_classifier`). A generation counts as
showing the concept when the classifier's most probable class is the concept's
(or one of the concept's classes). Lower after unlearning is better; compare
with the original model's rate on the same prompts and noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax.metrics.clip_score import image_embeddings, text_embeddings
from unlearn_jax.models.clip_vision import CLIPModel

# images [N, H, W, 3] float in [0, 1] -> class probabilities (or scores) [N, K].
Classifier = Callable[[np.ndarray], np.ndarray | jax.Array]


def forget_rate(
    images: np.ndarray | jax.Array,
    classifier: Classifier,
    concept_index: int | Sequence[int],
) -> float:
    """Share of `images` whose argmax class is the concept.

    Args:
      images: generations [N, H, W, 3] in [0, 1].
      classifier: images -> [N, K] probabilities; only the argmax is used.
      concept_index: the concept's class, or several classes that all count.

    Returns:
      A float in [0, 1].
    """
    probs = np.asarray(classifier(images))
    if probs.ndim != 2 or probs.shape[0] != len(images):
        raise ValueError(f"classifier returned {probs.shape} for {len(images)} images; want [N, K]")
    concept = np.atleast_1d(np.asarray(concept_index))
    if concept.size == 0 or concept.min() < 0 or concept.max() >= probs.shape[1]:
        raise ValueError(
            f"concept_index {concept_index} is not a class of a {probs.shape[1]}-way classifier"
        )
    return float(np.isin(np.argmax(probs, axis=1), concept).mean())


def clip_zero_shot_classifier(
    clip_model: CLIPModel,
    tokenizer: Any,
    labels: Sequence[str],
    template: str = "a photo of a {}",
    *,
    batch_size: int = 32,
) -> Classifier:
    """A `Classifier` from CLIP: softmax over exp(logit_scale) * cos(image, "a photo of a <label>").

    The label prompts are embedded once here; the returned function embeds
    images with the CLIPScore preprocessing (`clip_score.preprocess`).

    Args:
      clip_model, tokenizer: from `models.clip_vision.load_clip`.
      labels: K class names, e.g. ["circle", "square", "triangle"].
      template: prompt with one `{}` for the label.
      batch_size: images per jitted call.

    Returns:
      images [N, H, W, 3] in [0, 1] -> probabilities [N, K] (float32, rows sum to 1).
    """
    if not labels:
        raise ValueError("clip_zero_shot_classifier needs at least one label")
    text = text_embeddings(clip_model, tokenizer, [template.format(label) for label in labels])
    scale = float(np.exp(np.asarray(clip_model.logit_scale.get_value(), np.float32)))

    def classify(images: np.ndarray | jax.Array) -> np.ndarray:
        image = image_embeddings(clip_model, images, batch_size=batch_size)
        return np.asarray(jax.nn.softmax(scale * (jnp.asarray(image) @ jnp.asarray(text).T), -1))

    return classify
