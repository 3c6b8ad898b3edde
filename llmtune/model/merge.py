"""Merging: a LoRA adapter into its base (``llmtune merge-lora``), and weighted averages of several
checkpoints or adapters (``llmtune merge``: model soup, EMA-style mixtures).

Every output is a standalone model directory (sharded safetensors, config, generation config,
tokenizer with its chat template) that ``AutoModelForCausalLM`` (or, for reward models,
``AutoModelForSequenceClassification``) and vLLM load as they are.

QLoRA adapters are merged into the base loaded at the chosen dtype from its full-precision weights,
never into 4-bit weights (re-quantizing the sum is lossy: logit errors near 1 on a tiny model).
After writing, the output is reloaded and its logits on a few probe inputs are compared with the
unmerged base + adapter; a difference beyond tolerance is an error.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmtune.errors import LlmtuneError, UserError
from llmtune.manifest import check_finished
from llmtune.model.load import DTYPES, load_config
from llmtune.model.peft import adapter_config_or_none
from llmtune.model.tokenizer import check_tokenizers_agree, tokenizer_from
from llmtune.paths import looks_local
from llmtune.runtime import readable_like_normal_files

# max |logit difference| allowed, relative to max(1, max |logit|) of the reference, per saved dtype:
# fp32 leaves only summation-order noise; bf16 / fp16 round every merged weight once.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


class MergeCheckError(LlmtuneError):
    """The merged model does not reproduce base + adapter within tolerance (exit 1; files are kept)."""

    exit_code = 1


@dataclass
class MergeResult:
    out: Path
    kind: str  # "causal-lm" | "reward-model"
    dtype: str
    max_logit_diff: float
    tolerance: float
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- checks


def check_out_dir(out: Path, overwrite: bool, inputs: list[str]) -> None:
    """Refuse a non-empty output directory unless overwrite, and an output that is one of the inputs."""
    for p in inputs:
        if looks_local(p) and Path(p).expanduser().resolve() == out.expanduser().resolve():
            raise UserError(f"--out {out} is one of the inputs", hint="write the merged model to a new directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory", hint="pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"--out {out} is not empty", hint="choose a new directory, or pass --overwrite to replace its files"
        )


def read_adapter_config(adapter: str | Path) -> dict[str, Any]:
    a = Path(adapter).expanduser()
    if not a.exists():
        raise UserError(f"adapter {adapter} does not exist", hint="pass the output directory of a lora / qlora run")
    if not a.is_dir():
        raise UserError(f"adapter {adapter} is not a directory", hint="pass the directory that holds the adapter")
    cfg_file = a / "adapter_config.json"
    if not cfg_file.is_file():
        what = "full model weights" if (a / "config.json").is_file() else "no adapter files"
        raise UserError(
            f"{adapter} has no adapter_config.json ({what})",
            hint="merge-lora takes a peft adapter directory (adapter_config.json + adapter_model.safetensors); "
            "a full-weights output needs no merge",
        )
    if not any((a / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UserError(
            f"{adapter} has adapter_config.json but no adapter_model.safetensors",
            hint="the adapter directory is incomplete: re-run or re-copy the training output",
        )
    cfg = adapter_config_or_none(a)
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise UserError(f"{cfg_file} is not a peft adapter config (no peft_type)")
    kind = cfg.get("peft_type")
    if kind in _UNMERGEABLE:
        raise UserError(
            f"{adapter} is a {_UNMERGEABLE[kind]} adapter: it cannot be merged into the base, its virtual tokens "
            "are extra inputs, not a change of the weights",
            hint="use it as an adapter: PeftModel.from_pretrained(base, adapter); methods lora / qlora / "
            "adalora / ia3 train adapters that merge",
        )
    if kind not in MERGEABLE:
        raise UserError(
            f"{adapter} is a {kind} adapter; merge-lora merges LoRA, DoRA, AdaLoRA and IA3 adapters",
            hint="pass the output of a run with finetuning.method lora / qlora / adalora / ia3",
        )
    return cfg


MERGEABLE = ("LORA", "ADALORA", "IA3")  # peft types whose merge_and_unload folds the adapter into the weights
_UNMERGEABLE = {"PREFIX_TUNING": "prefix-tuning", "PROMPT_TUNING": "prompt-tuning", "P_TUNING": "P-tuning"}


def training_method(adapter: str | Path) -> str | None:
    """finetuning.method from the recipe.yaml an llmtune run leaves next to its adapter (None if absent)."""
    recipe = Path(adapter).expanduser() / "recipe.yaml"
    if not recipe.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    ft = data.get("finetuning") if isinstance(data, dict) else None
    return ft.get("method") if isinstance(ft, dict) else None


_SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


def resolve_base(base: str | None, adapter_cfg: dict[str, Any], adapter: str) -> tuple[str, list[str]]:
    """The base to merge into, and notes. A base whose architecture differs from the adapter's is an error."""
    recorded = adapter_cfg.get("base_model_name_or_path")
    notes: list[str] = []
    if base is None:
        if not recorded:
            raise UserError(f"{adapter}/adapter_config.json names no base model", hint="pass --base PATH")
        base = str(recorded)
        if looks_local(base) and not Path(base).expanduser().exists():
            raise UserError(
                f"the adapter {adapter} records its base model as {base}, which does not exist "
                + (
                    "(moved, or on another machine)"
                    if Path(base).expanduser().is_absolute()
                    else f"from the current directory ({Path.cwd()}): a relative path is recorded relative to "
                    "the directory training ran in"
                ),
                hint="pass --base PATH (the model the adapter was trained on)"
                + ("" if Path(base).expanduser().is_absolute() else ", or run from the directory training ran in"),
            )
    elif looks_local(base) and not Path(base).expanduser().exists():
        raise UserError(
            f"could not load a model config from --base {base}: that path does not exist",
            hint="pass the directory of the model the adapter was trained on (or its hub id)",
        )
    base_cfg = load_config(base, "--base")
    if recorded and str(recorded) != base:
        same_path = (
            looks_local(base) and looks_local(str(recorded)) and Path(base).resolve() == Path(recorded).resolve()
        )
        if not same_path:
            if looks_local(str(recorded)) and Path(str(recorded)).expanduser().is_dir():
                rec_cfg = load_config(str(recorded), "the adapter's base")
                diff = [k for k in _SHAPE_KEYS if getattr(rec_cfg, k, None) != getattr(base_cfg, k, None)]
                if diff:
                    raise UserError(
                        f"the adapter was trained on {recorded}, which differs from --base {base} in "
                        + ", ".join(f"{k} ({getattr(rec_cfg, k, None)} vs {getattr(base_cfg, k, None)})" for k in diff),
                        hint=f"pass --base {recorded} (the model the adapter was trained on)",
                    )
            notes.append(f"the adapter records base {recorded}; merging into --base {base} as asked")
    return base, notes


# ---------------------------------------------------------------------------------------------- loading


def _target_dtype(dtype: str, config: Any) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if saved in TOLERANCE else torch.float32


def _auto_class(task_type: str | None) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM


def load_base(path: str, task_type: str | None, dtype: torch.dtype) -> torch.nn.Module:
    cls = _auto_class(task_type)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if task_type == "SEQ_CLS":
        kwargs["num_labels"] = 1
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the base model {path}: {str(e).splitlines()[0]}") from None


def load_with_adapter(base: str, adapter: str, task_type: str | None, dtype: torch.dtype) -> torch.nn.Module:
    from peft import PeftModel

    model = load_base(base, task_type, dtype)
    try:
        return PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(
            f"the adapter {adapter} does not fit the base {base}: {str(e).strip().splitlines()[0]}",
            hint="pass the --base the adapter was trained on",
        ) from None


# --------------------------------------------------------------------------------------------- probing


def probe_inputs(vocab_size: int, seed: int = 0, n: int = 4, length: int = 24) -> torch.Tensor:
    """A few seeded random token sequences (B, T): every weight of the model takes part in their logits."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, length), generator=g)


@torch.no_grad()
def probe_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    # one row at a time: a sequence-classification model without pad_token_id refuses batches
    return torch.cat([model(input_ids=row[None]).logits.float() for row in ids])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- saving


def save_model(model: torch.nn.Module, tokenizer: Any, out: Path, max_shard_size: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        is_rm = type(model).__name__.endswith("ForSequenceClassification")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if is_rm and getattr(model.config, "pad_token_id", None) is None and pad is not None:
            # AutoModelForSequenceClassification refuses batches without it (it finds the last real token)
            model.config.pad_token_id = pad
        tokenizer.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    readable_like_normal_files(out)  # safetensors writes its files 0600
    return sorted(p.name for p in out.iterdir() if p.is_file())


def _clear(out: Path) -> None:
    """--overwrite: remove weight files a previous merge left, so no stale shard is loaded with the new ones."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")):
            p.unlink()


# ----------------------------------------------------------------------------------------------- merge


def merge_lora(
    base: str | None,
    adapter: str,
    out: Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    tolerance: float | None = None,
) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write the standalone model to ``out``; then check its logits."""
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise UserError(
            f"--tolerance {tolerance} must be a finite number above 0 (the largest |logit| difference allowed)",
            hint="e.g. --tolerance 1e-3, or leave it out for the default of the dtype",
        )
    adapter = str(adapter)
    check_finished(adapter, "--adapter")
    check_finished(base, "--base")
    cfg = read_adapter_config(adapter)
    base, notes = resolve_base(base, cfg, adapter)
    check_out_dir(out, overwrite, [base, adapter])
    check_tokenizers_agree(
        [(adapter, "--adapter"), (base, "--base")],
        hint="merge the adapter into the base it was trained on, whose tokenizer it saved (pass that as --base)",
    )
    task_type = cfg.get("task_type")
    kind = "reward-model" if task_type == "SEQ_CLS" else "causal-lm"
    target = _target_dtype(dtype, load_config(base, "--base"))
    if training_method(adapter) == "qlora":
        notes.append(
            f"qlora adapter: merged into the base loaded at {_dtype_name(target)} from its full-precision "
            "weights (never into 4-bit weights)"
        )

    model = load_with_adapter(base, adapter, task_type, target)
    merged = model.merge_and_unload()
    tokenizer = tokenizer_from(adapter, base, set_pad=False)
    if overwrite:
        _clear(out)
    files = save_model(merged, tokenizer, out, max_shard_size)
    del model, merged

    # reload both from disk: base + adapter at fp32 (the exact sum), and the merged model as saved
    reference = load_with_adapter(base, adapter, task_type, torch.float32)
    reloaded = load_base(str(out), task_type, target)
    vocab = reference.get_input_embeddings().num_embeddings
    ids = probe_inputs(vocab)
    ref_logits = probe_logits(reference, ids)
    diff = max_diff(ref_logits, probe_logits(reloaded, ids))
    tol = tolerance if tolerance is not None else TOLERANCE[target] * max(1.0, ref_logits.abs().max().item())
    result = MergeResult(out, kind, _dtype_name(target), diff, tol, notes, files)
    if not diff <= tol:
        raise MergeCheckError(
            f"the merged model in {out} differs from base + adapter by {diff:.3g} in max |logit| "
            f"(tolerance {tol:.3g}); the files are kept for inspection"
        )
    return result


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# --------------------------------------------------------------------------------------------- average


def check_weights(inputs: list[str], weights: list[float] | None) -> list[float]:
    """The weights of an average normalised to sum 1 (equal when none are given): one per input, finite,
    non-negative, not all 0, so that the result is a weighted mean of the inputs."""
    if len(inputs) < 2:
        raise UserError("merge averages two or more models", hint="pass --model PATH at least twice")
    if not weights:
        return [1.0 / len(inputs)] * len(inputs)
    if len(weights) != len(inputs):
        raise UserError(
            f"{len(inputs)} models but {len(weights)} weights", hint="pass one --weight per --model, in the same order"
        )
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise UserError(
            f"--weight {bad[0]} is not a finite number (weights {weights})",
            hint="pass finite weights such as --weight 0.7 --weight 0.3",
        )
    if any(w < 0 for w in weights):
        raise UserError(
            f"weights {weights} include a negative weight; merge takes a weighted mean of the models",
            hint="pass non-negative weights (they are normalised to sum 1)",
        )
    top = max(weights)
    if top <= 0:
        raise UserError(
            f"weights {weights} sum to 0; they are normalised to sum 1, which needs a positive sum",
            hint="give at least one model a positive weight, e.g. --weight 1 --weight 1",
        )
    total = sum(weights)
    if not math.isfinite(total):  # huge finite weights: normalise by the largest first
        weights = [w / top for w in weights]
        total = sum(weights)
    return [w / total for w in weights]


@dataclass
class AverageResult:
    out: Path
    weights: list[float]
    dtype: str
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


@dataclass
class FisherData:
    """Where Fisher-weighted averaging estimates each model's parameter importance."""

    path: str
    format: str | None = None
    samples: int = 64
    max_length: int = 512


def fisher_diagonal(model: torch.nn.Module, samples: list[Any]) -> dict[str, torch.Tensor]:
    """The empirical Fisher information's diagonal per parameter: the mean over samples of the squared
    gradient of the sample's mean token log-likelihood (its labels as training learns them)."""
    from llmtune.objectives.lm import lm_loss_sum

    params = {n: p for n, p in model.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    model.eval()  # no dropout: the importance of the weights as they are
    used = 0
    for sample in samples:
        ids = torch.tensor([sample.input_ids])
        labels = torch.tensor([sample.labels])
        model.zero_grad(set_to_none=True)
        loss_sum, count = lm_loss_sum(model(input_ids=ids).logits, labels)
        if count.item() == 0:
            continue
        (loss_sum / count).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float() ** 2
        used += 1
    model.zero_grad(set_to_none=True)
    if used == 0:
        raise UserError("no sample of the Fisher data has a token to score", hint="check --fisher-data and its rows")
    return {n: f / used for n, f in fisher.items()}


def fisher_average(thetas: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i F_i theta_i / sum_i w_i F_i per element (Matena & Raffel, 2022); where every F_i is zero
    (a weight no sample's gradient reaches), the plain weighted average sum_i w_i theta_i."""
    num = sum(w * f * t for w, f, t in zip(weights, fishers, thetas, strict=True))
    den = sum(w * f for w, f in zip(weights, fishers, strict=True))
    plain = sum(w * t for w, t in zip(weights, thetas, strict=True))
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), plain)


def average_models(
    inputs: list[str],
    weights: list[float] | None,
    out: Path,
    *,
    base: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    fisher: FisherData | None = None,
) -> AverageResult:
    """Weighted average of full checkpoints and / or LoRA adapters: sum_i w_i * theta_i, with sum_i w_i = 1.

    Each adapter is first merged into its base (``base``, or the one its adapter_config names), so the
    average of adapters on one base is exactly base + sum_i w_i * B_i A_i * scale_i. All inputs must
    share one architecture (same parameter names and shapes); weights are normalised to sum to 1.

    With ``fisher``, each weight element is averaged in proportion to w_i times model i's Fisher importance
    (see fisher_average), estimated on the first ``fisher.samples`` samples of a text or sft data file.
    """
    weights = check_weights(inputs, weights)  # before anything is loaded
    fisher_rows: tuple[list[Any], str] | None = None
    if fisher is not None:
        from llmtune.data.lm import lm_rows

        fisher_rows = lm_rows(fisher.path, fisher.format, fisher.samples)
    for p in inputs:
        check_finished(p, "--model")

    notes: list[str] = []
    kinds: list[tuple[str, str | None, str]] = []  # (base or model path, adapter or None, task_type)
    for p in inputs:
        d = Path(p).expanduser()
        if d.is_dir() and (d / "adapter_config.json").is_file():
            cfg = read_adapter_config(p)
            b, n = resolve_base(base, cfg, p)
            notes += n
            kinds.append((b, p, cfg.get("task_type") or "CAUSAL_LM"))
        elif d.is_dir() and (d / "config.json").is_file():
            cfg = load_config(p, "--model")
            archs = getattr(cfg, "architectures", None) or []
            task = "SEQ_CLS" if any(a.endswith("ForSequenceClassification") for a in archs) else "CAUSAL_LM"
            kinds.append((p, None, task))
        else:
            raise UserError(
                f"{p} is neither a model directory (config.json) nor an adapter (adapter_config.json)",
                hint="pass the output directories of training runs",
            )
    tasks = {t for _, _, t in kinds}
    if len(tasks) > 1:
        raise UserError("cannot average causal LMs with reward models", hint="pass models of one kind")
    task = tasks.pop()
    if fisher is not None and task != "CAUSAL_LM":
        raise UserError(
            "--method fisher estimates importance from a causal LM's likelihood of data; these are reward models",
            hint="average reward models with --method weighted",
        )
    check_out_dir(out, overwrite, [*inputs, *(b for b, _, _ in kinds)])
    bases = list(dict.fromkeys(b for b, a, _ in kinds if a))  # adapters' bases, each once
    check_tokenizers_agree(
        [*((p, "--model") for p in inputs), *((b, "the adapters' base") for b in bases)],
        hint="average models fine-tuned with one tokenizer (from one base model)",
    )
    target = _target_dtype(dtype, load_config(kinds[0][0], "--model"))

    first: torch.nn.Module | None = None
    acc: dict[str, torch.Tensor] = {}
    samples: list[Any] = []
    kept: list[dict[str, torch.Tensor]] = []  # fisher: each model's parameters and importance
    importance: list[dict[str, torch.Tensor]] = []
    for i, ((b, a, _), w) in enumerate(zip(kinds, weights, strict=True)):
        model = (
            load_with_adapter(b, a, task, torch.float32).merge_and_unload() if a else load_base(b, task, torch.float32)
        )
        if fisher_rows is not None:
            if i == 0:
                from llmtune.data.lm import lm_samples

                tok = tokenizer_from(a or b, b, set_pad=False)
                rows, fmt = fisher_rows
                samples, report = lm_samples(rows, fmt, fisher.path, tok, None, fisher.max_length)
                notes.append(
                    f"Fisher importance from {len(samples)} sample(s) of {fisher.path} ({fmt}"
                    + (f"; {report.dropped} row(s) dropped" if report.dropped else "")
                    + ")"
                )
            importance.append(fisher_diagonal(model, samples))
            kept.append({n: p.detach().float().clone() for n, p in model.named_parameters()})
        state = model.state_dict()
        if i == 0:
            first = model
            acc = {k: v.detach().float() * w for k, v in state.items()}
            continue
        if set(state) != set(acc):
            extra = sorted(set(state) ^ set(acc))[:3]
            raise UserError(
                f"{inputs[i]} has different parameters from {inputs[0]} (e.g. {', '.join(extra)})",
                hint="average models of one architecture (fine-tunes of the same base)",
            )
        for k, v in state.items():
            if v.shape != acc[k].shape:
                raise UserError(f"{inputs[i]}: {k} has shape {tuple(v.shape)}, {inputs[0]} has {tuple(acc[k].shape)}")
            acc[k] += v.detach().float() * w
        del model, state
    assert first is not None
    if importance:  # every parameter (tied ones once) Fisher-weighted; buffers keep the plain average
        names = {p.data_ptr(): n for n, p in first.named_parameters()}
        merged = {n: fisher_average([k[n] for k in kept], [f[n] for f in importance], weights) for n in kept[0]}
        for k, v in first.state_dict().items():
            if v.data_ptr() in names:
                acc[k] = merged[names[v.data_ptr()]]
        del kept, importance
    first.load_state_dict(acc)
    first.to(target)
    paths = [a or b for b, a, _ in kinds]
    tokenizer = tokenizer_from(*paths, *(b for b, _, _ in kinds), set_pad=False)
    if overwrite:
        _clear(out)
    files = save_model(first, tokenizer, out, max_shard_size)
    (out / "merge.json").write_text(
        json.dumps(
            {
                "models": inputs,
                "weights": weights,
                "dtype": _dtype_name(target),
                "method": "fisher" if fisher else "weighted",
                **({"fisher": {"data": fisher.path, "samples": len(samples)}} if fisher else {}),
            },
            indent=2,
        )
        + os.linesep
    )
    return AverageResult(out, weights, _dtype_name(target), notes, [*files, "merge.json"])
