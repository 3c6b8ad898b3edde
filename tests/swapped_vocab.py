"""Test helpers: a tokenizer of the tiny model's size whose vocabulary differs from it (two ids swapped), built
offline from the tiny model's tokenizer.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import TINY_MODEL

# two ordinary byte-level tokens of the tiny model's BPE vocabulary
SWAP = ("a", "e")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def swap_tokenizer_files(dst: Path, src: Path = TINY_MODEL, swap: tuple[str, str] = SWAP) -> Path:
    """Write src's tokenizer files into dst with the ids of the two tokens `swap` exchanged in the BPE vocab.
    Merges name tokens by their strings, so the result loads and tokenizes text, to other ids."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    a, b = swap
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return dst


def model_with_swapped_tokenizer(dst: Path, src: Path = TINY_MODEL) -> Path:
    """A copy of the model directory src whose tokenizer files were replaced by the swapped ones."""
    shutil.copytree(src, dst)
    return swap_tokenizer_files(dst, src)
