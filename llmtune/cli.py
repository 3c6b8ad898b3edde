"""The ``llmtune`` command line: parses arguments and dispatches. No training logic lives here, and
nothing heavy (torch, deepspeed, peft) is imported until a command needs it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from llmtune import __version__
from llmtune.commands.help import ONLINE, stage_names, stage_summaries
from llmtune.errors import LlmtuneError


def _examples(*lines: str) -> str:
    """A command's --help epilog: its example command lines (typer keeps the line breaks; escaped for rich)."""
    return "Examples:\n\n" + "\n".join(escape(line) for line in lines)


app = typer.Typer(
    name="llmtune",
    help=f"Adapt open LLMs from YAML recipes: {stage_summaries()} on one DeepSpeed trainer core, with full, "
    "freeze, LoRA and 4-bit QLoRA fine-tuning; merge adapters (merge-lora, merge), evaluate (eval) and chat with a model (chat).",
    epilog=_examples(
        "llmtune init sft --out sft.yaml",
        "llmtune validate sft.yaml",
        "llmtune train sft.yaml --set train.lr=1e-4",
        "llmtune plot runs/sft",
    )
    + "\n\nShell completion: llmtune --install-completion (bash, zsh, fish, PowerShell).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set train.lr=1e-4 (repeatable).", show_default=False),
]


def _report(e: Exception) -> None:
    # escape: messages quote user text such as [q_proj, v_proj], which rich would take as markup
    label = getattr(e, "label", "error")
    color = "red" if label == "error" else "yellow"
    err.print(f"[bold {color}]{label}:[/] {escape(str(e))}", markup=True, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        print(f"llmtune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    local_rank: Annotated[int | None, typer.Option("--local_rank", "--local-rank", hidden=True)] = None,
    show_version: Annotated[
        bool,
        typer.Option("--version", help="Print the llmtune version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    # `deepspeed --module llmtune train ...` passes --local_rank=N before the command name. The launcher
    # also sets LOCAL_RANK, which the engine reads; accept the option here so that the form works.
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))


@app.command(
    epilog=_examples("llmtune validate recipes/quickstart.yaml", "llmtune validate recipe.yaml --set train.lr=1e-4")
)
def validate(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    set_: SetOption = None,
) -> None:
    """Check a recipe and that its data files exist, without training (and without importing torch)."""
    from llmtune.commands.preflight import validate_command

    validate_command(recipe, set_ or [])


@app.command(
    epilog=_examples(
        "llmtune train recipes/quickstart.yaml",
        "llmtune train recipe.yaml --set train.lr=1e-4 --set output_dir=runs/lr1e-4",
        "torchrun --nproc_per_node 2 -m llmtune train recipe.yaml",
    )
)
def train(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    set_: SetOption = None,
    resume_from: Annotated[
        Path | None, typer.Option("--resume-from", help="Resume from this checkpoint directory.", show_default=False)
    ] = None,
    no_resume: Annotated[
        bool, typer.Option("--no-resume", help="Start from scratch even if output_dir has checkpoints.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Allow writing into a non-empty output_dir that is not this run's.")
    ] = False,
    trust_reward_code: Annotated[
        bool,
        typer.Option("--trust-reward-code", help=f"{ONLINE}: allow module:function rewards."),
    ] = False,
    local_rank: Annotated[int | None, typer.Option("--local_rank", "--local-rank", hidden=True)] = None,
) -> None:
    """Run the stage a recipe describes; its outputs go to the recipe's output_dir.

    Started again with the same recipe, a run resumes from its newest complete checkpoint."""
    from llmtune.commands.train import train_command

    done = train_command(
        recipe,
        set_ or [],
        resume_from=resume_from,
        no_resume=no_resume,
        overwrite=overwrite,
        trust_reward_code=trust_reward_code,
        local_rank=local_rank,
        err=err,
    )
    if not done:
        raise typer.Exit(130)


def _opt(help_: str, *names: str) -> Any:
    return typer.Option(*names, help=help_, show_default=False)


@app.command(
    "merge-lora",
    epilog=_examples("llmtune merge-lora --adapter runs/sft --out runs/sft-merged --dtype bf16"),
)
def merge_lora(
    adapter: Annotated[
        Path, _opt("The LoRA / QLoRA / DoRA / AdaLoRA / IA3 adapter directory (a training output).", "--adapter")
    ],
    out: Annotated[Path, _opt("Where the merged model is written.", "--out")],
    base: Annotated[
        str | None, _opt("The base model the adapter was trained on (default: the one it records).", "--base")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (the base's dtype) | bf16 | fp16 | fp32.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Allow a non-empty --out.")] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard.")] = "5GB",
    tolerance: Annotated[
        float | None, _opt("Max |logit| difference allowed (default: by dtype, relative to the logits).", "--tolerance")
    ] = None,
) -> None:
    """Merge a LoRA adapter into its base and write a standalone model; then check it against base + adapter.

    Also DoRA, AdaLoRA and IA3 adapters; prefix / prompt / P-tuning adapters cannot be merged. QLoRA adapters are merged into the base loaded at --dtype from its full-precision weights (never into
    4-bit weights). Reward-model adapters keep their score head."""
    from llmtune.commands.merge import merge_lora_command

    merge_lora_command(adapter, out, base, dtype, overwrite, max_shard_size, tolerance, err)


@app.command(
    epilog=_examples(
        "llmtune merge --model runs/sft-a --model runs/sft-b --out runs/soup",
        "llmtune merge --model runs/a --model runs/b --weight 0.7 --weight 0.3 --out runs/mix",
    )
)
def merge(
    models: Annotated[
        list[str], _opt("A full model or LoRA adapter directory to average (repeat, two or more).", "--model")
    ],
    out: Annotated[Path, _opt("Where the averaged model is written.", "--out")],
    weights: Annotated[
        list[float] | None, _opt("Weight of each --model, in order (default: equal); normalised to sum 1.", "--weight")
    ] = None,
    base: Annotated[str | None, _opt("Base for adapters (default: the one each adapter records).", "--base")] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto (the first model's dtype) | bf16 | fp16 | fp32.")
    ] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Allow a non-empty --out.")] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard.")] = "5GB",
    method: Annotated[
        str, typer.Option("--method", help="weighted (sum_i w_i theta_i) | fisher (each weight by its importance).")
    ] = "weighted",
    fisher_data: Annotated[
        str | None, typer.Option("--fisher-data", help="fisher: a text or sft data file to estimate importance on.")
    ] = None,
    fisher_samples: Annotated[int, typer.Option("--fisher-samples", help="fisher: rows of --fisher-data used.")] = 64,
    fisher_max_length: Annotated[int, typer.Option("--fisher-max-length", help="fisher: tokens per sample.")] = 512,
) -> None:
    """Average several checkpoints or adapters with weights (model soup, EMA-style mixtures) into one model.

    Adapters are merged into their base first, so the result is base + sum_i w_i * delta_i exactly.
    --method fisher weighs every weight element by each model's diagonal Fisher information, estimated from
    squared gradients on --fisher-data (Matena & Raffel, 2022)."""
    from llmtune.commands.merge import merge_command

    merge_command(
        models, out, weights, base, dtype, overwrite, max_shard_size, method, fisher_data, fisher_samples,
        fisher_max_length, err,
    )  # fmt: skip


@app.command(
    "eval",
    epilog=_examples(
        "llmtune eval --model runs/sft --data held.jsonl --task perplexity -o report.json",
        "llmtune eval --model runs/dpo --data pairs.jsonl --task preference",
        "llmtune eval eval.yaml --max-samples 100",
    ),
)
def eval_(
    config: Annotated[
        Path | None, typer.Argument(help="An eval YAML file with the same keys as the options (options override it).")
    ] = None,
    task: Annotated[str | None, _opt("perplexity | preference | reward | generate | compare", "--task")] = None,
    model: Annotated[str | None, _opt("Model directory or hub id (or an adapter directory).", "--model")] = None,
    adapter: Annotated[str | None, _opt("A peft adapter on --model.", "--adapter")] = None,
    data: Annotated[str | None, _opt("Data file or directory.", "--data")] = None,
    format_: Annotated[
        str | None, _opt("text | alpaca | sharegpt | messages | prompts | pairs (default: detected)", "--format")
    ] = None,
    output: Annotated[str | None, _opt("Write the JSON report here.", "--output", "-o")] = None,
    generations: Annotated[
        str | None, _opt("Per-example JSONL (default: <output stem>.generations.jsonl).", "--generations")
    ] = None,
    max_samples: Annotated[int | None, _opt("Evaluate at most this many rows.", "--max-samples")] = None,
    max_length: Annotated[int | None, _opt("Longest sequence in tokens (default 1024).", "--max-length")] = None,
    batch_size: Annotated[int | None, _opt("Batch size (default 8).", "--batch-size")] = None,
    seed: Annotated[int | None, _opt("Seed (default 0).", "--seed")] = None,
    dtype: Annotated[str | None, _opt("auto | bf16 | fp16 | fp32", "--dtype")] = None,
    device: Annotated[str | None, _opt("auto | cpu | cuda", "--device")] = None,
    chat_template: Annotated[str | None, _opt("chatml | llama3 | alpaca | a .jinja file", "--chat-template")] = None,
    system: Annotated[str | None, _opt("System prompt for rows without one.", "--system")] = None,
    max_new_tokens: Annotated[int | None, _opt("Generation length (default 128).", "--max-new-tokens")] = None,
    temperature: Annotated[float | None, _opt("0 = greedy (default).", "--temperature")] = None,
    top_p: Annotated[float | None, _opt("Nucleus sampling mass.", "--top-p")] = None,
    regex: Annotated[str | None, _opt("generate: also score regex_match with this pattern.", "--regex")] = None,
    few_shot: Annotated[int | None, _opt("generate: k examples before each input.", "--few-shot")] = None,
    few_shot_selection: Annotated[str | None, _opt("jaccard | random", "--few-shot-selection")] = None,
    few_shot_data: Annotated[str | None, _opt("Where few-shot examples come from.", "--few-shot-data")] = None,
    reward_models: Annotated[
        list[str] | None, _opt("reward / compare: a reward model (repeatable).", "--reward-model")
    ] = None,
    rules: Annotated[
        list[str] | None, _opt("reward: exact_match | contains | gsm8k | regex:PAT | module:fn", "--rule")
    ] = None,
    reward_weights: Annotated[
        list[float] | None, _opt("reward: weight per reward (repeatable).", "--reward-weight")
    ] = None,
    trust_reward_code: Annotated[
        bool, typer.Option("--trust-reward-code", help="reward: allow module:fn rules (they run that code).")
    ] = False,
    model_b: Annotated[str | None, _opt("compare: the second model.", "--model-b")] = None,
    adapter_b: Annotated[str | None, _opt("compare: an adapter on --model-b.", "--adapter-b")] = None,
    tie_margin: Annotated[float | None, _opt("compare: score differences up to this are ties.", "--tie-margin")] = None,
    reference: Annotated[str | None, _opt("preference: the reference model of a policy.", "--reference")] = None,
    beta: Annotated[float | None, _opt("preference: DPO beta (default 0.1).", "--beta")] = None,
) -> None:
    """Evaluate a model on a data file and write a JSON report (and a table on the terminal).

    llmtune eval --model PATH [--adapter PATH] --data FILE --task perplexity|preference|reward|generate|compare
    llmtune eval EVAL.yaml [--options]"""
    from llmtune.eval.config import load_eval_config

    options = {
        "task": task, "model": model, "adapter": adapter, "data": data, "format": format_, "output": output,
        "generations": generations, "max_samples": max_samples, "max_length": max_length,
        "batch_size": batch_size, "seed": seed, "dtype": dtype, "device": device, "chat_template": chat_template,
        "system": system, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
        "regex": regex, "few_shot": few_shot, "few_shot_selection": few_shot_selection,
        "few_shot_data": few_shot_data, "reward_models": reward_models, "rules": rules,
        "reward_weights": reward_weights, "model_b": model_b, "adapter_b": adapter_b, "tie_margin": tie_margin,
        "reference": reference, "beta": beta, "trust_reward_code": trust_reward_code or None,
    }  # fmt: skip
    cfg = load_eval_config(config, options)
    from llmtune.eval.run import run_eval

    run_eval(cfg, Console(highlight=False, soft_wrap=True), err)


data_app = typer.Typer(
    help="Look at data as training reads it (format, drops, lengths, label masks).", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@data_app.command(
    "inspect",
    epilog=_examples(
        "llmtune data inspect data/train.jsonl",
        "llmtune data inspect --recipe recipes/sft_lora.yaml",
        "llmtune data inspect pairs.jsonl --model Qwen/Qwen2.5-0.5B-Instruct --stage dpo --row 3",
    ),
)
def data_inspect(
    file: Annotated[
        Path | None, typer.Argument(help="A data file or directory (default: the recipe's sources).")
    ] = None,
    recipe: Annotated[
        Path | None,
        _opt("Read the data as this recipe's stage does (its model, chat template, max_length).", "--recipe"),
    ] = None,
    set_: SetOption = None,
    model: Annotated[
        str | None, _opt("Without --recipe: the tokenizer's model (default: the repository's tiny model).", "--model")
    ] = None,
    stage: Annotated[
        str | None,
        _opt(f"Without --recipe: {stage_names()} (default: guessed from the rows).", "--stage"),
    ] = None,
    format_: Annotated[str | None, _opt("The rows' format (default: detected, as in a recipe).", "--format")] = None,
    max_length: Annotated[
        int | None, _opt("Longest sequence (default: the recipe's, else 2048).", "--max-length")
    ] = None,
    chat_template: Annotated[
        str | None,
        _opt("Without --recipe: a built-in template (chatml, llama3, alpaca) or a .jinja file.", "--chat-template"),
    ] = None,
    row: Annotated[int | None, _opt("Show this row (from 1) rendered (default: the first kept row).", "--row")] = None,
    max_rows: Annotated[int | None, _opt("Read only the first N rows.", "--max-rows")] = None,
    registry: Annotated[
        str | None, _opt("Without --recipe: a dataset_info.json; FILE is then one of its names.", "--registry")
    ] = None,
    markers: Annotated[
        bool | None,
        typer.Option(
            "--markers/--no-markers",
            help="Mark trained tokens with [[...]] (default: when the output is not a terminal; else colours).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Show what training makes of a data file: the format, rows kept and dropped (per reason), a histogram of
    token lengths, and one example rendered with its trained tokens highlighted."""
    from llmtune.commands.inspect import inspect_command

    inspect_command(
        file, recipe, set_ or [], model, stage, format_, max_length, chat_template, row, max_rows, markers, registry
    )


@data_app.command(
    "synth",
    epilog=_examples(
        "llmtune data synth --model Qwen/Qwen2.5-1.5B-Instruct --seeds seeds.jsonl --out synth.jsonl --num 500",
        "llmtune data synth --model runs/sft-merged --seeds data/alpaca.json --out evol.jsonl --method evol",
    ),
)
def data_synth(
    model: Annotated[str, _opt("The causal LM that writes the data (a directory, hub id or .gguf).", "--model")],
    seeds: Annotated[str, _opt("Seed tasks: an sft file (alpaca, sharegpt, messages) or prompts.", "--seeds")],
    out: Annotated[Path, _opt("The alpaca JSONL file to write (appended to: a rerun continues).", "--out")],
    method: Annotated[str, typer.Option("--method", help="self-instruct | evol (Evol-Instruct).")] = "self-instruct",
    num: Annotated[int, typer.Option("--num", help="Rows to write.", min=1)] = 100,
    adapter: Annotated[str | None, _opt("A peft adapter on --model.", "--adapter")] = None,
    max_attempts: Annotated[
        int | None, _opt("Stop after this many generated instructions (default 20 x --num).", "--max-attempts")
    ] = None,
    similarity: Annotated[
        float, typer.Option("--similarity", help="Drop instructions with ROUGE-L >= this to a kept one.")
    ] = 0.7,
    min_words: Annotated[int, typer.Option("--min-words", help="Shortest instruction kept, in words.")] = 3,
    max_words: Annotated[int, typer.Option("--max-words", help="Longest instruction kept, in words.")] = 150,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.", min=0.0)] = 1.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest reply.", min=1)] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Generations per batch.", min=1)] = 8,
    chat_template: Annotated[
        str | None, _opt("chatml | llama3 | alpaca | a .jinja file (default: the tokenizer's).", "--chat-template")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Attempt i samples with seed + i.")] = 0,
) -> None:
    """Write synthetic instruction data with a local model (Self-Instruct or Evol-Instruct), filtered by
    length, ROUGE-L similarity to the kept instructions and repetition, as an sft (alpaca) JSONL file."""
    from llmtune.commands.synth import SynthConfig, synth_command

    cfg = SynthConfig(
        method=method, num=num, max_attempts=max_attempts, similarity=similarity, min_words=min_words,
        max_words=max_words, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    synth_command(model, seeds, out, cfg, adapter, chat_template, err)


@app.command(
    epilog=_examples(
        "llmtune chat runs/sft-merged",
        "llmtune chat Qwen/Qwen2.5-0.5B-Instruct --adapter runs/sft --system 'You are terse.'",
        "llmtune chat model.gguf --temperature 0",
    )
)
def chat(
    model: Annotated[str, typer.Argument(help="Model directory, hub id, adapter directory or .gguf file.")],
    adapter: Annotated[str | None, _opt("A peft adapter on MODEL.", "--adapter")] = None,
    system: Annotated[str | None, _opt("System prompt.", "--system")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest reply, in tokens.", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.", min=0.0)] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.", min=0.0, max=1.0)] = 0.9,
    chat_template: Annotated[
        str | None, _opt("chatml | llama3 | alpaca | a .jinja file (default: the tokenizer's).", "--chat-template")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto | bf16 | fp16 | fp32")] = "auto",
    seed: Annotated[int | None, _opt("Seed for sampling (default: random).", "--seed")] = None,
    show_prompt: Annotated[
        bool, typer.Option("--show-prompt", help="Print the rendered prompt (history included) before each reply.")
    ] = False,
) -> None:
    """Chat with a model in the terminal: its chat template, the reply streamed, the conversation kept.

    /reset forgets the conversation, /exit (or Ctrl-D) quits; Ctrl-C stops a reply."""
    from llmtune.commands.chat import chat_command

    chat_command(
        model, adapter, system, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        chat_template=chat_template, device=device, dtype=dtype, seed=seed, show_prompt=show_prompt, err=err,
    )  # fmt: skip


def _complete_stage(incomplete: str) -> list[str]:
    from llmtune.recipe.starter import starter_names

    return [s for s in starter_names() if s.startswith(incomplete)]


@app.command(
    epilog=_examples(
        "llmtune init sft",
        "llmtune init dpo --model runs/sft-merged --out dpo.yaml",
        "llmtune init grpo --model Qwen/Qwen2.5-0.5B-Instruct --out grpo.yaml --force",
    )
)
def init(
    stage: Annotated[
        str,
        typer.Argument(
            help=stage_names(),
            autocompletion=_complete_stage,
            show_default=False,
        ),
    ],
    model: Annotated[
        str | None, _opt("model.path of the recipe (default: HuggingFaceTB/SmolLM2-135M-Instruct).", "--model")
    ] = None,
    out: Annotated[Path | None, _opt("Write the recipe to this file (default: print it).", "--out", "-o")] = None,
    force: Annotated[bool, typer.Option("--force", help="Let --out replace an existing file.")] = False,
) -> None:
    """Print (or write) a commented starter recipe for a stage that `llmtune validate` accepts as written.

    Its data is the repository's quickstart data: replace it with your own."""
    from llmtune.commands.init import init_command

    init_command(stage, model, out, force)


@app.command(
    epilog=_examples(
        "llmtune plot runs/sft",
        "llmtune plot runs/lr1e-4 runs/lr3e-4 --out lr.png",
        "llmtune plot runs/dpo --metric eval/accuracy --metric margin",
    )
)
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more run output directories (with metrics.jsonl).")],
    out: Annotated[
        Path | None,
        _opt("The PNG to write (default: RUN_DIR/curves.png for one run, curves.png here for several).", "--out", "-o"),
    ] = None,
    metrics: Annotated[
        list[str] | None,
        _opt(
            "Plot this metric of metrics.jsonl, one panel each (repeatable; default: loss, reward, accuracy, kl).",
            "--metric",
        ),
    ] = None,
) -> None:
    """Draw the training curves of a run, or compare several runs (one line per run) in one PNG.

    Every run already writes its own curves.png to output_dir when it finishes."""
    from llmtune.commands.plot import plot_command

    plot_command(run_dirs, out, metrics, err)


@app.command(epilog=_examples("llmtune version"))
def version() -> None:
    """Print the llmtune version."""
    print(__version__)


def main() -> None:
    """Every command's known failures (bad input: exit 2; a run that had to stop: exit 1) end here as one
    message without a traceback; anything else is a bug and keeps its traceback. A reader of stdout / stderr
    that goes away (`| tee` ended by Ctrl-C, `| head`) never ends a command: its output is dropped."""
    from llmtune.runtime import guard_std_streams

    guard_std_streams()
    try:
        app()
    except LlmtuneError as e:
        _report(e)
        sys.exit(e.exit_code)
