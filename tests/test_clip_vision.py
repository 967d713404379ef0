"""Flax CLIP (vision tower + two-tower model), CLIPScore and forget rates vs transformers.

A tiny random `transformers.CLIPModel` is saved as an HF CLIP folder with a
small tokenizer; everything is compared with the PyTorch reference on the same
inputs, and the preprocessing with `CLIPImageProcessorPil` (transformers' PIL
backend; the default processor needs torchvision).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import CLIPConfig, CLIPTokenizer
from transformers import CLIPModel as TorchCLIPModel
from transformers import CLIPVisionModel as TorchCLIPVisionModel
from transformers import CLIPVisionModelWithProjection as TorchCLIPVisionModelWithProjection
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from unlearn_jax.data.tokenizer import write_clip_tokenizer
from unlearn_jax.metrics.clip_score import clip_score, preprocess, tokenize
from unlearn_jax.metrics.forget_rate import clip_zero_shot_classifier, forget_rate
from unlearn_jax.models.clip import is_clip_buffer
from unlearn_jax.models.clip_vision import (
    CLIPModel,
    CLIPVisionModel,
    load_clip,
    normalize_clip_vision_keys,
)
from unlearn_jax.models.convert import WeightMismatchError, load_torch_state, to_torch_state

WORDS = ["a", "photo", "of", "red", "blue", "circle", "square", "triangle"]
IMAGE_SIZE = 32
TOL = 2e-5


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm scales around 1), so no term can hide behind an init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("logit_scale"):
                p.copy_(torch.tensor(2.0))
            elif ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim >= 2 and "embedding" not in name:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.2 * noise if p.ndim == 1 and "class_embedding" not in name else noise)
    return model.eval()


def tiny_config(tokenizer: CLIPTokenizer) -> CLIPConfig:
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="gelu",  # the other activation than the text tower's quick_gelu
    )
    # projection_dim 24 only at the top level: the sub-configs keep their default 512.
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "clip"
    write_clip_tokenizer(folder, WORDS, model_max_length=16)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    ref = randomize_(TorchCLIPModel(tiny_config(tokenizer)), seed=0)
    ref.save_pretrained(str(folder), safe_serialization=True)
    return folder, ref


@pytest.fixture(scope="module")
def loaded(clip_folder):
    return load_clip(clip_folder[0])


def random_images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Smooth-ish float images in [0, 1] (a gradient plus noise), as generations look."""
    rng = np.random.default_rng(seed)
    n, h, w = shape
    ramp = np.linspace(0, 1, w)[None, None, :, None] * rng.uniform(0, 1, (n, 1, 1, 3))
    return np.clip(ramp + 0.3 * rng.uniform(0, 1, (n, h, w, 3)), 0, 1).astype(np.float32)


def processor_pixels(images: np.ndarray, size: int) -> np.ndarray:
    """transformers' CLIP preprocessing of round(255 x), NCHW float32."""
    proc = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    u8 = np.round(images * 255).astype(np.uint8)
    return proc(list(u8), return_tensors="np")["pixel_values"]


def test_load_clip_matches_transformers(clip_folder, loaded):
    _, ref = clip_folder
    model, tokenizer = loaded
    texts = ["a red circle", "a photo of a blue square", "triangle", "a photo of a photo"]
    ids = tokenize(tokenizer, texts)
    pixels = np.asarray(preprocess(random_images((3, 24, 20), seed=1), IMAGE_SIZE))
    with torch.no_grad():
        out = ref(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
        )
        hidden = ref.vision_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
    ours = nnx.jit(lambda m, i, p: m(i, p))(model, jnp.asarray(ids), jnp.asarray(pixels))
    ours_hidden, ours_pooled = model.vision_model(jnp.asarray(pixels))
    diffs = {
        "image_embeds": np.abs(np.asarray(ours.image_embeds) - out.image_embeds.numpy()).max(),
        "text_embeds": np.abs(np.asarray(ours.text_embeds) - out.text_embeds.numpy()).max(),
        "logits_per_image": np.abs(
            np.asarray(ours.logits_per_image) - out.logits_per_image.numpy()
        ).max(),
        "vision_last_hidden": np.abs(
            np.asarray(ours_hidden) - hidden.last_hidden_state.numpy()
        ).max(),
        "vision_pooled": np.abs(np.asarray(ours_pooled) - hidden.pooler_output.numpy()).max(),
    }
    print("max abs diff vs transformers:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert ours.logits_per_image.shape == (3, 4) and ours.image_embeds.shape == (3, 24)
    hash(nnx.graphdef(model))  # configs are frozen: compiled functions can key on structure
    np.testing.assert_allclose(
        np.asarray(ours.logits_per_text), out.logits_per_text.numpy(), atol=TOL * 10
    )
    assert max(diffs.values()) < TOL * 10  # logits are exp(2) ~ 7.4 times the cosines
    assert diffs["image_embeds"] < TOL and diffs["text_embeds"] < TOL


def test_weights_round_trip_bit_identical(clip_folder, loaded):
    folder, _ = clip_folder
    model, _ = loaded
    file = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()}
    back = to_torch_state(model)
    params = {k for k in file if not is_clip_buffer(k)}
    assert set(back) == params
    assert {"logit_scale", "vision_model.embeddings.class_embedding"} <= set(back)
    for key in params:
        assert back[key].dtype == file[key].dtype, key
        # Shapes of 0-d tensors are checked in test_scalar_param_round_trip_shape.
        assert back[key].shape == file[key].shape, key
        np.testing.assert_array_equal(back[key], file[key], err_msg=key)


def test_scalar_param_round_trip_shape(loaded):
    model, _ = loaded
    assert to_torch_state(model)["logit_scale"].shape == ()


def test_missing_tensor_is_named(clip_folder, loaded):
    folder, _ = clip_folder
    model, _ = loaded
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["logit_scale"]
    tensors["vision_model.embeddings.position_ids"] = np.arange(17)[None]  # a buffer: ignored
    fresh = nnx.eval_shape(lambda: CLIPModel(model.config, rngs=nnx.Rngs(0)))
    with pytest.raises(WeightMismatchError, match="logit_scale"):
        load_torch_state(fresh, tensors, ignore=is_clip_buffer)


@pytest.mark.parametrize("with_projection", [False, True])
def test_vision_model_matches_transformers(clip_folder, with_projection):
    vision_cfg = clip_folder[1].config.vision_config
    vision_cfg.projection_dim = 24
    cls = TorchCLIPVisionModelWithProjection if with_projection else TorchCLIPVisionModel
    ref = randomize_(cls(vision_cfg), seed=3)
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    model = nnx.eval_shape(
        lambda: CLIPVisionModel(
            vision_cfg.to_dict(), rngs=nnx.Rngs(0), with_projection=with_projection
        )
    )
    # transformers 5 saves a bare CLIPVisionModel without the vision_model. prefix.
    load_torch_state(model, normalize_clip_vision_keys(tensors))
    pixels = np.random.default_rng(4).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = pixels.astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
    hidden, pooled = model(jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(hidden), out.last_hidden_state.numpy(), atol=TOL)
    if with_projection:
        embeds = model.get_image_features(jnp.asarray(pixels))
        np.testing.assert_allclose(np.asarray(embeds), out.image_embeds.numpy(), atol=TOL)
    else:
        np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=TOL)


def test_preprocess_matches_clip_image_processor():
    rng = np.random.default_rng(0)
    report = []
    for h, w in [(32, 32), (24, 40), (96, 64), (300, 260)]:
        u8 = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)  # worst case: pixel noise
        ref = processor_pixels(u8 / 255.0, 224).transpose(0, 2, 3, 1)
        exact = np.asarray(preprocess(u8.astype(np.float32) / 255, 224))
        smooth = np.asarray(preprocess(u8.astype(np.float32) / 255, 224, quantize=False))
        np.testing.assert_array_equal(np.asarray(preprocess(u8, 224)), exact)
        d_exact, d_float = np.abs(exact - ref).max(), np.abs(smooth - ref).max()
        report.append(f"{h}x{w}: exact {d_exact:.1e}, float {d_float:.4f}")
        assert exact.shape == ref.shape == (2, 224, 224, 3)
        assert d_exact < 1e-6  # identical uint8 pixels; only the float32 normalisation differs
        assert d_float < 0.02  # < ~1.3/255 before normalisation
    print("preprocess max abs diff vs CLIPImageProcessorPil (normalised units):", report)


def test_clip_score_matches_torch(clip_folder, loaded):
    _, ref = clip_folder
    model, tokenizer = loaded
    images = random_images((5, 20, 24), seed=5)
    texts = ["a red circle", "a blue square", "a red circle", "triangle", "a photo of a square"]
    scores = clip_score(model, tokenizer, images, texts, batch_size=2)  # 3 chunks, last padded
    pixels = processor_pixels(images, IMAGE_SIZE)
    ids = tokenize(tokenizer, texts)
    with torch.no_grad():
        img = ref.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
        txt = ref.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output
        expected = 100 * torch.clamp(torch.nn.functional.cosine_similarity(img, txt), min=0)
    print(
        "clip_score",
        np.round(scores, 4),
        "max abs diff vs torch:",
        np.abs(scores - expected.numpy()).max(),
    )
    assert scores.shape == (5,)
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-3)
    np.testing.assert_allclose(
        clip_score(model, tokenizer, images[:2], "a red circle"),
        clip_score(model, tokenizer, images[:2], ["a red circle"] * 2),
    )


def test_forget_rate_with_fake_classifier():
    images = np.zeros((8, 4, 4, 3), np.float32)
    probs = np.eye(3)[[0, 1, 2, 2, 0, 2, 1, 2]] * 0.7 + 0.1  # argmax = those labels
    classifier = lambda x: probs[: len(x)]
    assert forget_rate(images, classifier, 2) == 4 / 8
    assert forget_rate(images, classifier, 0) == 2 / 8
    assert forget_rate(images, classifier, [0, 1]) == 4 / 8
    with pytest.raises(ValueError, match="not a class"):
        forget_rate(images, classifier, 3)


def test_zero_shot_classifier_matches_torch_softmax(clip_folder, loaded):
    _, ref = clip_folder
    model, tokenizer = loaded
    labels = ["circle", "square", "triangle"]
    classify = clip_zero_shot_classifier(model, tokenizer, labels)
    images = random_images((4, 32, 32), seed=6)
    probs = classify(images)
    ids = tokenize(tokenizer, [f"a photo of a {label}" for label in labels])
    with torch.no_grad():
        out = ref(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            pixel_values=torch.from_numpy(processor_pixels(images, IMAGE_SIZE)),
        )
        expected = out.logits_per_image.softmax(-1).numpy()
    print("zero-shot max abs diff vs torch softmax:", np.abs(probs - expected).max())
    assert probs.shape == (4, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    for k in range(3):
        assert forget_rate(images, classify, k) == np.mean(expected.argmax(-1) == k)
