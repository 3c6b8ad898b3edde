"""``llmtune merge-lora`` and ``llmtune merge``: the options checked, the merge or average run with a status
line, and what was written (and how close a merged model is to base + adapter) printed."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from llmtune.errors import UserError
from llmtune.paths import check_path_lengths
from llmtune.runtime import quiet_libraries

DTYPES = ("auto", "bf16", "fp16", "fp32")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def merge_lora_command(
    adapter: Path,
    out: Path,
    base: str | None,
    dtype: str,
    overwrite: bool,
    max_shard_size: str,
    tolerance: float | None,
    err: Console,
) -> None:
    check_path_lengths(("--adapter", adapter), ("--out", out), ("--base", base))
    check_dtype(dtype)
    out_console = Console(highlight=False, soft_wrap=True)
    from llmtune.model.merge import merge_lora

    quiet_libraries(loading_bars=False)
    with err.status("merging"):
        r = merge_lora(
            base,
            str(adapter),
            out,
            dtype=dtype,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            tolerance=tolerance,
        )
    for note in r.notes:
        out_console.print(f"note: {note}", markup=False)
    out_console.print(f"merged {r.kind} written to {r.out} ({r.dtype}): {', '.join(r.files)}", markup=False)
    out_console.print(
        f"max |logit difference| vs base + adapter on probe inputs: {r.max_logit_diff:.3g} "
        f"(tolerance {r.tolerance:.3g}): ok",
        markup=False,
    )


def merge_command(
    models: list[str],
    out: Path,
    weights: list[float] | None,
    base: str | None,
    dtype: str,
    overwrite: bool,
    max_shard_size: str,
    method: str,
    fisher_data: str | None,
    fisher_samples: int,
    fisher_max_length: int,
    err: Console,
) -> None:
    check_path_lengths(
        ("--out", out), ("--base", base), ("--fisher-data", fisher_data), *(("--model", m) for m in models)
    )
    check_dtype(dtype)
    if method not in ("weighted", "fisher"):
        raise UserError(f"--method {method!r} is not one of weighted, fisher")
    if (method == "fisher") != (fisher_data is not None):
        raise UserError(
            "--method fisher needs --fisher-data"
            if method == "fisher"
            else "--fisher-data is only read by --method fisher",
            hint="pass --method fisher --fisher-data FILE (text or sft rows), or neither",
        )
    if fisher_samples < 1 or fisher_max_length < 2:
        raise UserError("--fisher-samples must be >= 1 and --fisher-max-length >= 2")
    from llmtune.model.merge import FisherData, average_models

    quiet_libraries(loading_bars=False)
    with err.status("averaging"):
        fisher = FisherData(fisher_data, None, fisher_samples, fisher_max_length) if fisher_data else None
        r = average_models(
            models,
            weights,
            out,
            base=base,
            dtype=dtype,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            fisher=fisher,
        )
    out_console = Console(highlight=False, soft_wrap=True)
    for note in r.notes:
        out_console.print(f"note: {note}", markup=False)
    mix = ", ".join(f"{w:.4g} x {m}" for m, w in zip(models, r.weights, strict=True))
    out_console.print(f"averaged model ({r.dtype}) written to {r.out}: {mix}", markup=False)
