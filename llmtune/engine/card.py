"""The model card (README.md) written beside every exported model: what it is (base model, stage, method,
data), how it was trained (the recipe's key settings; the whole recipe is recipe.yaml beside it), how it
ended (final metrics) and how to load it. It replaces peft's template card ("[More Information Needed]").

A local path never appears in the card as it stands on this machine (only its last part): the card travels
with the model; the adapter's own config keeps the base path, where loading needs it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llmtune import __version__
from llmtune.engine.report import format_value
from llmtune.paths import looks_local

CARD = "README.md"
ADAPTER_METHODS = ("lora", "qlora", "dora", "rslora", "adalora", "ia3", "prefix", "prompt", "ptuning")
LORA_METHODS = ("lora", "qlora", "dora", "rslora", "adalora")


def _shown_path(path: str) -> str:
    """A hub id as it is; a local path by its last part only."""
    if not path:
        return "?"
    return f"{Path(path).expanduser().name} (local)" if looks_local(path) else path


def _method(recipe: Any) -> str:
    ft = recipe.finetuning
    method = ft.method
    if method in LORA_METHODS:
        return f"{method}, r {ft.lora_r}, alpha {ft.lora_alpha:g}"
    return method


def _data(recipe: Any) -> list[str]:
    rows = []
    for src in getattr(recipe.data, "train", None) or []:
        name = getattr(src, "name", None)
        what = f"`{name}` (registry)" if name else f"`{_shown_path(src.path)}`"
        extra = [x for x in (getattr(src, "format", None),) if x]
        if getattr(src, "weight", 1.0) != 1.0:
            extra.append(f"weight {src.weight:g}")
        if getattr(src, "max_samples", None):
            extra.append(f"at most {src.max_samples} rows")
        rows.append(what + (f" ({', '.join(extra)})" if extra else ""))
    return rows


def _training(recipe: Any, steps: int, epochs: float | None) -> str:
    t = recipe.train
    length = f"{steps} steps" + (f" ({epochs:g} epochs)" if epochs is not None else "")
    warmup = (
        f", warmup {t.warmup_steps} steps"
        if t.warmup_steps
        else (f", warmup {t.warmup_ratio:g} of the steps" if t.warmup_ratio else "")
    )
    max_length = getattr(recipe.data, "max_length", None)
    return (
        f"{length}; lr {format_value('lr', t.lr)} {t.lr_scheduler}{warmup}; {t.optimizer}; batch "
        f"{t.micro_batch_size} x accum {t.grad_accum} per process; "
        + (f"max_length {max_length}; " if max_length else "")
        + f"{recipe.precision}; ZeRO-{recipe.distributed.zero_stage}; seed {recipe.seed}"
    )


def _loading(recipe: Any, adapter: bool, classifier: bool) -> str:
    rm = classifier
    task = "SequenceClassification" if rm else "CausalLM"
    lines = ["```python", "from transformers import AutoTokenizer"]
    if adapter:
        lines += [
            f"from peft import AutoPeftModelFor{task}",
            "",
            "# the base model named in adapter_config.json, with this adapter on it",
            f'model = AutoPeftModelFor{task}.from_pretrained("PATH_TO_THIS_FOLDER")',
        ]
    else:
        lines += [
            f"from transformers import AutoModelFor{task}",
            "",
            f'model = AutoModelFor{task}.from_pretrained("PATH_TO_THIS_FOLDER")',
        ]
    lines += ['tokenizer = AutoTokenizer.from_pretrained("PATH_TO_THIS_FOLDER")', "```", ""]
    if adapter and recipe.finetuning.method in (*LORA_METHODS, "ia3"):
        lines += ["A standalone model: `llmtune merge-lora --adapter PATH_TO_THIS_FOLDER --out merged`.", ""]
    if not rm:
        lines += ["Try it: `llmtune chat PATH_TO_THIS_FOLDER`.", ""]
    return "\n".join(lines)


def model_card(
    recipe: Any,
    *,
    adapter: bool,
    steps: int,
    epochs: float | None = None,
    metrics: dict[str, Any] | None = None,
    what: str | None = None,
    classifier: bool | None = None,
) -> str:
    """The card's text. metrics: the final figures (the last logged training step's and the final
    evaluation's), shown in the log's number format; what: a sentence for a part of the output (the weight
    average, the critic) instead of the model itself; classifier: a sequence classifier (a reward model, a
    critic) rather than a causal LM (default: for stage rm)."""
    if classifier is None:
        classifier = recipe.stage == "rm"
    base = recipe.model.path
    tags = ["llmtune", recipe.stage, recipe.finetuning.method]
    front = ["---", f"library_name: {'peft' if adapter else 'transformers'}"]
    if not looks_local(base):
        front.append(f"base_model: {base}")
    front += ["tags:", *[f"- {t}" for t in tags], "---", ""]
    title = Path(recipe.output_dir).expanduser().name or "model"
    table = [
        "| | |",
        "|---|---|",
        f"| base model | `{_shown_path(base)}` |",
        f"| stage | {recipe.stage} |",
        f"| method | {_method(recipe)}: {'an adapter' if adapter else 'full weights'} |",
        f"| data | {'; '.join(_data(recipe)) or '-'} |",
        f"| training | {_training(recipe, steps, epochs)} |",
        f"| written | {time.strftime('%Y-%m-%d')} by llmtune {__version__} |",
    ]
    body = [
        f"# {title}",
        "",
        what
        or f"Trained with llmtune (stage {recipe.stage}, method {recipe.finetuning.method}) from "
        f"`{_shown_path(base)}`.",
        "",
        *table,
        "",
        "The whole recipe, every default filled in, is `recipe.yaml` in the run's output folder; the training "
        "curves are `metrics.jsonl` and `curves.png` there.",
        "",
    ]
    shown = {k: v for k, v in (metrics or {}).items() if v is not None and k not in ("step", "epoch")}
    if shown:
        body += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {format_value(k, v)} |" for k, v in shown.items()]
        body.append("")
    body += ["## Loading", "", _loading(recipe, adapter, classifier), ""]
    return "\n".join(front + body)


def write_model_card(folder: Path, recipe: Any, **options: Any) -> None:
    """README.md in an exported model's folder (replacing peft's template card); whether it is an adapter is
    read from the folder (adapter_config.json)."""
    import json

    adapter = (folder / "adapter_config.json").is_file()
    try:
        if adapter:
            classifier = json.loads((folder / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
        else:
            archs = json.loads((folder / "config.json").read_text()).get("architectures") or [""]
            classifier = str(archs[0]).endswith("ForSequenceClassification")
    except (OSError, ValueError, AttributeError):
        classifier = None
    text = model_card(recipe, adapter=adapter, classifier=classifier, **options)
    (folder / CARD).write_text(text, encoding="utf-8")
