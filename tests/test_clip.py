"""Parity of the Flax NNX CLIP text encoder with transformers' PyTorch CLIP (tiny, random)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel
from transformers import CLIPTextModelWithProjection as TorchCLIPTextModelWithProjection

from unlearn_jax.models.clip import CLIPTextModel, is_clip_buffer, normalize_clip_keys
from unlearn_jax.models.convert import WeightMismatchError, load_torch_state, to_torch_state

# Ids 298 and 299 are ordinary tokens above EOS, so the legacy argmax rule differs.
VOCAB, BOS, EOS, PAD = 300, 296, 297, 0
LENGTH = 16
TOL = 1e-5


def tiny_config(hidden_act: str, *, eos_token_id: int = EOS, **overrides) -> CLIPTextConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=24,
        hidden_act=hidden_act,
        projection_dim=40,
        bos_token_id=BOS,
        eos_token_id=eos_token_id,
        pad_token_id=PAD,
    )
    return CLIPTextConfig(**{**kwargs, **overrides})


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, LayerNorm scales and biases included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 2 and "embedding" not in name:
                p.copy_(noise / np.sqrt(p.shape[1]))
            else:
                p.copy_(0.2 * noise if p.ndim == 1 else noise)
    return model.eval()


def file_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The tensors as an SD `text_encoder/model.safetensors` holds them (prefix + buffer)."""
    tensors = normalize_clip_keys({k: v.numpy().copy() for k, v in model.state_dict().items()})
    max_pos = model.config.max_position_embeddings
    tensors["text_model.embeddings.position_ids"] = np.arange(max_pos)[None]
    return tensors


def load_nnx(config: CLIPTextConfig, tensors, **kwargs) -> CLIPTextModel:
    model = nnx.eval_shape(lambda: CLIPTextModel(config.to_dict(), rngs=nnx.Rngs(0), **kwargs))
    load_torch_state(model, tensors, source="test tensors", ignore=is_clip_buffer)
    return model


def random_ids(eos: int, seed: int = 0) -> np.ndarray:
    """BOS, random tokens, EOS at a varying position, then EOS padding (as SD1 pads)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, BOS, size=(4, LENGTH))
    ids[:, 0] = BOS
    for row, end in enumerate([3, 7, LENGTH - 1, 10]):
        ids[row, end] = eos
        ids[row, end + 1 :] = eos if row % 2 == 0 else PAD
    return ids


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("legacy_eos", [False, True], ids=["eos", "legacy_eos2"])
def test_matches_transformers(hidden_act, legacy_eos):
    # Legacy configs say eos_token_id=2: transformers then pools at argmax(ids), the
    # largest id, which must differ from the first EOS for the test to mean anything.
    config = tiny_config(hidden_act, eos_token_id=2 if legacy_eos else EOS)
    ref = randomize_(TorchCLIPTextModel(config), seed=1)
    ids = random_ids(EOS)
    if legacy_eos:
        ids[1, 1] = VOCAB - 1  # an id above EOS: pooled at position 1, not at the EOS
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
    model = load_nnx(config, file_tensors(ref))
    hidden, pooled = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    if legacy_eos:
        np.testing.assert_array_equal(pooled[1], hidden[1, 1])
    states = model.hidden_states(jnp.asarray(ids))
    diff_hidden = np.abs(np.asarray(hidden) - out.last_hidden_state.numpy()).max()
    diff_pooled = np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max()
    diff_states = max(
        np.abs(np.asarray(a) - b.numpy()).max()
        for a, b in zip(states, out.hidden_states, strict=True)
    )
    print(
        f"{hidden_act} legacy={legacy_eos}: max abs diff last_hidden {diff_hidden:.2e}, "
        f"pooled {diff_pooled:.2e}, hidden_states {diff_states:.2e}"
    )
    assert hidden.shape == (4, LENGTH, 48) and pooled.shape == (4, 48)
    assert diff_hidden < TOL and diff_pooled < TOL and diff_states < TOL


def test_attention_mask_matches_transformers():
    config = tiny_config("quick_gelu")
    ref = randomize_(TorchCLIPTextModel(config), seed=2)
    ids = random_ids(EOS, seed=3)
    mask = (np.arange(LENGTH)[None] <= np.array([3, 7, 15, 10])[:, None]).astype(np.int64)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    model = load_nnx(config, file_tensors(ref))
    hidden, pooled = model(jnp.asarray(ids), jnp.asarray(mask))
    # Padded query rows are garbage in both; compare where the mask is on.
    on = mask.astype(bool)
    assert np.abs(np.asarray(hidden)[on] - out.last_hidden_state.numpy()[on]).max() < TOL
    assert np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max() < TOL


def test_projection_matches_transformers():
    config = tiny_config("gelu")
    ref = randomize_(TorchCLIPTextModelWithProjection(config), seed=4)
    ids = random_ids(EOS, seed=5)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).text_embeds.numpy()
    tensors = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
    model = load_nnx(config, tensors, with_projection=True)
    got = np.asarray(model.get_text_features(jnp.asarray(ids)))
    diff = np.abs(got - want).max()
    print(f"projection: max abs diff text_embeds {diff:.2e}")
    assert got.shape == (4, 40) and diff < TOL
    assert sorted(to_torch_state(model)) == sorted(tensors)


def test_round_trip_is_bit_identical():
    ref = randomize_(TorchCLIPTextModel(tiny_config("quick_gelu")), seed=6)
    tensors = file_tensors(ref)
    got = to_torch_state(load_nnx(ref.config, tensors))
    want = {k: v for k, v in tensors.items() if not is_clip_buffer(k)}
    assert sorted(got) == sorted(want)
    assert all(k.startswith("text_model.") for k in got)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_loader_errors_name_the_tensor():
    config = tiny_config("quick_gelu")
    tensors = file_tensors(randomize_(TorchCLIPTextModel(config), seed=7))
    bad = dict(tensors)
    bad["text_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((64, 48), np.float32)
    with pytest.raises(WeightMismatchError, match=r"layers\.1\.mlp\.fc1\.weight"):
        load_nnx(config, bad)
    with pytest.raises(WeightMismatchError, match="position_ids"):
        load_torch_state(CLIPTextModel(config.to_dict(), rngs=nnx.Rngs(0)), tensors)
    key = "embeddings.token_embedding.weight"
    both = {key: 0, f"text_model.{key}": 0}
    with pytest.raises(ValueError, match="both"):
        normalize_clip_keys(both)


def test_config_errors_and_sequence_limit():
    with pytest.raises(ValueError, match="swish"):
        CLIPTextModel(tiny_config("swish").to_dict(), rngs=nnx.Rngs(0))
    model = CLIPTextModel(tiny_config("gelu").to_dict(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(jnp.zeros((1, 25), jnp.int32))
    with pytest.raises(ValueError, match="with_projection"):
        model.get_text_features(jnp.zeros((1, 4), jnp.int32))
