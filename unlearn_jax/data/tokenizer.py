"""Builds small CLIP BPE tokenizers in the exact on-disk format of SD's `tokenizer/`.

Real Stable Diffusion folders carry OpenAI's 49408-token CLIP vocabulary. Tiny
models (tests, the embedded world) need a tokenizer of the same *kind*, loaded
by the same code path (`transformers.CLIPTokenizer.from_pretrained(folder)`),
but with a vocabulary small enough for a tiny embedding table. This writes
`vocab.json` + `merges.txt` in CLIP's byte-level BPE layout: the 256 byte
symbols, the same with the end-of-word marker `</w>`, one merge chain per word
so that each given word becomes one token, then `<|startoftext|>` and
`<|endoftext|>` last (so the end token has the largest id, as in CLIP, and
argmax-pooling finds it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from unlearn_jax.atomic_files import write_text


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode symbols, in id order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer(
    out_dir: str | Path, words: Iterable[str], *, model_max_length: int = 77
) -> Path:
    """Writes a CLIP tokenizer folder whose vocabulary holds `words` as single tokens.

    Args:
      out_dir: folder to create (e.g. `<pipeline>/tokenizer`).
      words: lower-case words to make single tokens; anything else still
        tokenizes, byte by byte.
      model_max_length: padded sequence length (77 for SD).

    Returns:
      The folder path.
    """
    symbols = _bytes_to_unicode()
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    for word in sorted({w.strip().lower() for w in words if w.strip()}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        if any(p not in known for p in pieces):
            raise ValueError(f"word {word!r} has characters outside CLIP's printable byte symbols")
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in known:
                merges.append((left, right))
                vocab.append(merged)
                known.add(merged)
            left = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "vocab.json", json.dumps({tok: i for i, tok in enumerate(vocab)}))
    write_text(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    write_text(out / "tokenizer_config.json", json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    write_text(out / "special_tokens_map.json", json.dumps(special, indent=2))
    return out
