"""The cached CLIP tokenizer against transformers' CLIPTokenizer of the same folder.

`load_clip_tokenizer` returns transformers' tokenizer the first time it sees a
folder and a `CachedClipTokenizer` afterwards; both must give the same ids,
masks, decoded text and vocabulary, for the tokenizer configurations real SD
folders carry (special tokens as strings or as AddedToken dicts, SD 2's "!"
padding, an `added_tokens_decoder` table, transformers 4's cleanup flag) and for
every option the package uses.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from transformers import CLIPTokenizer

from unlearn_jax.data.tokenizer import write_clip_tokenizer
from unlearn_jax.models import clip_tokenizer
from unlearn_jax.models.clip_tokenizer import CachedClipTokenizer, load_clip_tokenizer

WORDS = ["a", "photo", "of", "cat", "dog", "red", "square", "circle", "it's", "stop"]
PROMPTS = [
    "a photo of a cat",
    "A PHOTO  of\ta\nDOG!!",
    "",
    "   ",
    "red, green & blue... ok?",
    "it's they're we'll I'd don't",
    "<|startoftext|> hello <|endoftext|>",
    "<|STARTOFTEXT|>x",
    "café naïve Ünïcödé 日本語 🙂 e\u0301",
    "123 4567 3.14",
    "x" * 120,
    " ".join(["photo"] * 90),
    "!",
    "a!b!c",
]
OPTIONS = [
    dict(padding="max_length", truncation=True, max_length=77),  # the pipelines' call
    dict(truncation=False),  # warn_truncated
    dict(add_special_tokens=False),  # the attacks' placeholders
    dict(),
    dict(padding=True),
    dict(max_length=10),  # max_length alone truncates
    dict(padding="max_length"),
    dict(truncation=True),
    dict(padding="max_length", truncation=True, max_length=12, return_tensors="np"),
    dict(padding=True, return_tensors="np"),
    dict(padding="longest", truncation=True, max_length=5, add_special_tokens=False),
]


def _as_added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}  # fmt: skip


def _sd15(config: dict, folder) -> None:
    """SD 1.x's tokenizer_config.json: AddedToken dicts, a special_tokens_map.json."""
    for name in ("bos_token", "eos_token", "unk_token"):
        config[name] = _as_added_token(config[name])
    config.update(
        add_prefix_space=False, errors="replace", name_or_path="openai/clip-vit-large-patch14"
    )
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    (folder / "special_tokens_map.json").write_text(json.dumps({k: config[k] for k in names}))


def _sd15_saved_by_transformers4(config: dict, folder) -> None:
    """As transformers 4.3x re-saved SD 1.x folders: cleanup flag and added_tokens_decoder."""
    _sd15(config, folder)
    _decoder_table(config, folder)
    config["clean_up_tokenization_spaces"] = True


def _sd2(config: dict, folder) -> None:
    """SD 2.x pads with "!" (id 0) instead of the end token."""
    _sd15(config, folder)
    config["pad_token"] = "!"
    specials = json.loads((folder / "special_tokens_map.json").read_text())
    (folder / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": "!"}))


def _decoder_table(config: dict, folder) -> None:
    """transformers 4.34+ saves an added_tokens_decoder table."""
    vocab = json.loads((folder / "vocab.json").read_text())
    config["added_tokens_decoder"] = {
        str(vocab[t]): {**_as_added_token(t), "special": True}
        for t in ("<|startoftext|>", "<|endoftext|>")
    }


VARIANTS = {
    "plain": None,
    "sd15": _sd15,
    "sd15_transformers4": _sd15_saved_by_transformers4,
    "sd2": _sd2,
    "decoder_table": _decoder_table,
}


@pytest.fixture
def cache(tmp_path):
    folder = tmp_path / "cache"
    clip_tokenizer.set_cache_folder(folder)
    yield folder
    clip_tokenizer.set_cache_folder(None)


def _tokenizer_folder(tmp_path, variant: str):
    folder = write_clip_tokenizer(tmp_path / variant, WORDS, model_max_length=77)
    if VARIANTS[variant] is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        VARIANTS[variant](config, folder)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_tokenizer_equals_transformers(tmp_path, cache, variant):
    folder = _tokenizer_folder(tmp_path, variant)
    reference = CLIPTokenizer.from_pretrained(str(folder))
    first = load_clip_tokenizer(folder)
    assert type(first) is CLIPTokenizer  # resolved by transformers, then cached as JSON
    assert len(list(cache.glob("*.json"))) == 1
    cached = load_clip_tokenizer(folder)
    assert isinstance(cached, CachedClipTokenizer)

    for options in OPTIONS:
        for text in [PROMPTS, *PROMPTS]:
            expected, got = reference(text, **options), cached(text, **options)
            for key in ("input_ids", "attention_mask"):
                assert _same(expected[key], got[key]), (options, text, key)
            assert got.input_ids is got["input_ids"]
    for text in PROMPTS:
        ids = reference(text, truncation=False)["input_ids"]
        for skip in (False, True):
            assert cached.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip
            )
    assert cached.batch_decode([[5, 6], [7]]) == reference.batch_decode([[5, 6], [7]])
    for name in ("model_max_length", "bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(cached, name) == getattr(reference, name), name
        if name != "model_max_length":
            assert getattr(cached, f"{name}_id") == getattr(reference, f"{name}_id"), name
    assert cached.get_vocab() == reference.get_vocab() and len(cached) == len(reference)


def test_options_it_does_not_implement_go_to_transformers(tmp_path, cache):
    folder = _tokenizer_folder(tmp_path, "plain")
    reference = CLIPTokenizer.from_pretrained(str(folder))
    load_clip_tokenizer(folder)
    cached = load_clip_tokenizer(folder)
    assert isinstance(cached, CachedClipTokenizer)
    for option, base in ((dict(pad_to_multiple_of=8), dict(padding=True)),
                         (dict(return_attention_mask=False), {})):  # fmt: skip
        expected, got = reference(PROMPTS, **base, **option), cached(PROMPTS, **base, **option)
        assert dict(expected) != dict(reference(PROMPTS, **base)), option  # the option matters
        assert dict(expected) == dict(got), option
    pair = (["a cat", "a dog"], ["red", "photo of"])
    assert reference(*pair)["input_ids"] == cached(*pair)["input_ids"]
    # Methods it does not define are transformers' own.
    ids = reference("a red square")["input_ids"]
    assert cached.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)


def test_changed_files_are_resolved_again(tmp_path, cache):
    folder = _tokenizer_folder(tmp_path, "plain")
    load_clip_tokenizer(folder)
    assert load_clip_tokenizer(folder).model_max_length == 77
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 32}))
    again = load_clip_tokenizer(folder)
    assert type(again) is CLIPTokenizer and again.model_max_length == 32
    cached = load_clip_tokenizer(folder)
    assert isinstance(cached, CachedClipTokenizer) and cached.model_max_length == 32
    assert cached("a cat", padding="max_length")["input_ids"][-1] == cached.pad_token_id
    assert len(cached("a cat", padding="max_length")["input_ids"]) == 32


def test_a_corrupt_entry_is_ignored_and_rewritten(tmp_path, cache):
    folder = _tokenizer_folder(tmp_path, "plain")
    load_clip_tokenizer(folder)
    (entry,) = cache.glob("*.json")
    whole = json.loads(entry.read_text())
    for corrupt in (entry.read_text()[:100], json.dumps({**whole, "backend": '{"trunc'})):
        entry.write_text(corrupt)
        assert type(load_clip_tokenizer(folder)) is CLIPTokenizer
        assert json.loads(entry.read_text()) == whole  # rewritten
        assert isinstance(load_clip_tokenizer(folder), CachedClipTokenizer)


def test_without_a_cache_it_is_transformers_tokenizer(tmp_path):
    folder = _tokenizer_folder(tmp_path, "plain")
    for _ in range(2):
        assert type(load_clip_tokenizer(folder)) is CLIPTokenizer


def test_a_cached_load_does_not_import_transformers(tmp_path, cache):
    """The point of the cache: a warm run's tokenizer costs no transformers import."""
    folder = _tokenizer_folder(tmp_path, "sd2")
    shutil.copytree(folder, tmp_path / "copy")  # the key is the contents, not the path
    load_clip_tokenizer(folder)
    code = (
        "import sys; from unlearn_jax.models import clip_tokenizer as c; "
        f"c.set_cache_folder({str(cache)!r}); "
        f"t = c.load_clip_tokenizer({str(tmp_path / 'copy')!r}); "
        "ids = t(['a photo of a cat!'], padding='max_length', truncation=True, max_length=77); "
        "print(type(t).__name__, 'transformers' in sys.modules, ids['input_ids'][0][:8])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    name, imported, ids = out.stdout.split(maxsplit=2)
    assert (name, imported) == ("CachedClipTokenizer", "False")
    reference = CLIPTokenizer.from_pretrained(str(folder))
    expected = reference(["a photo of a cat!"], padding="max_length", max_length=77)
    assert ids.strip() == str(expected["input_ids"][0][:8])


@pytest.mark.parametrize("setting", ["DIR", "off"])
def test_the_cli_caches_tokenizers_beside_its_compiled_programs(tmp_path, setting):
    """`unlearn-jax` turns the cache on with its compilation cache, and off with it."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["UNLEARN_JAX_COMPILATION_CACHE"] = str(tmp_path / "xla") if setting == "DIR" else "off"
    code = (
        "from unlearn_jax import cli; from unlearn_jax.models import clip_tokenizer as c; "
        "print(cli.enable_compilation_cache(), c.cache_folder())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    programs, tokenizers = out.stdout.split()
    if setting == "DIR":
        assert (programs, tokenizers) == (
            str(tmp_path / "xla"),
            str(tmp_path / "xla" / "tokenizers"),
        )
    else:
        assert (programs, tokenizers) == ("None", "None")
