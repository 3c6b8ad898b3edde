"""GGUF checkpoints (llama.cpp's format) as model paths: a ``.gguf`` file, or a folder holding one and no
``config.json``, stands for the model it holds.

transformers (with the ``gguf`` package) reads such a file and de-quantizes it to an ordinary model; llmtune
does that once, writes the result (safetensors weights, config, tokenizer with its chat template) to
``$LLMTUNE_CACHE/gguf/<hash>/`` (default ``~/.cache/llmtune``), and uses that directory from then on: a
second run finds it and converts nothing. The hash covers the file's absolute path, size and modification
time, so a changed file is converted again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from llmtune.errors import UserError

MARKER = "CONVERTED"


def gguf_file(path: str | None) -> Path | None:
    """The .gguf file a model path names: the file itself, or the only one in a folder without config.json."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(p.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UserError(
                f"{path} holds {len(found)} .gguf files ({', '.join(f.name for f in found[:4])})",
                hint="name the one to use: model.path: <folder>/<file>.gguf",
            )
    return None


def cache_dir(file: Path) -> Path:
    st = file.stat()
    key = hashlib.sha256(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("LLMTUNE_CACHE") or "~/.cache/llmtune").expanduser()
    return root / "gguf" / f"{file.stem}-{key}"


def resolve_gguf(path: str, console: object | None = None) -> str:
    """path itself when it is no GGUF checkpoint; otherwise the directory of its converted model (converted
    now if it is not there yet)."""
    file = gguf_file(path)
    if file is None:
        return path
    out = cache_dir(file)
    if (out / MARKER).is_file():
        return str(out)
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:  # several processes: one converts, the rest wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MARKER).is_file():
            _convert(path, file, out, console)
    return str(out)


def _convert(path: str, file: Path, out: Path, console: object | None) -> None:
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise UserError(
            f"{path} is a GGUF checkpoint, and reading one needs the gguf package",
            hint="pip install gguf",
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if console is not None:
        console.print(f"converting {file} (GGUF) to {out} once: de-quantizing to float32 ...")  # type: ignore[attr-defined]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(
            f"could not read the GGUF checkpoint {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
            hint="use a GGUF file of an architecture transformers reads (Llama, Qwen2, Mistral, ...), or a model "
            "directory",
        ) from None
    tmp.mkdir(parents=True)
    # de-quantized already: what is left of the GGUF "quantization" is a marker that refuses to save
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    (tmp / MARKER).write_text(f"{file.resolve()}\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
