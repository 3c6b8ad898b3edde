"""The ``llmtune`` command line: parses arguments and dispatches. No training logic lives here, and
nothing heavy (torch, deepspeed, peft) is imported until a command needs it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from llmtune import __version__
from llmtune.errors import TrainingError, UserError

app = typer.Typer(
    name="llmtune",
    help="Adapt open LLMs from YAML recipes: continued pretraining (cpt) and supervised fine-tuning (sft) "
    "on one DeepSpeed trainer core, with full, freeze, LoRA and 4-bit QLoRA fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set train.lr=1e-4 (repeatable).", show_default=False),
]


def _fail(e: Exception, code: int) -> typer.Exit:
    # escape: messages quote user text such as [q_proj, v_proj], which rich would take as markup
    err.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, soft_wrap=True)
    return typer.Exit(code)


@app.callback()
def _root(
    local_rank: Annotated[int | None, typer.Option("--local_rank", "--local-rank", hidden=True)] = None,
) -> None:
    # `deepspeed --module llmtune train ...` passes --local_rank=N before the command name. The launcher
    # also sets LOCAL_RANK, which the engine reads; accept the option here so that the form works.
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    set_: SetOption = None,
) -> None:
    """Check a recipe and that its data files exist, without training (and without importing torch)."""
    from llmtune.recipe import dump_recipe, load_recipe
    from llmtune.recipe.checks import check_paths

    try:
        r = load_recipe(recipe, set_ or [])
        notes = check_paths(r)
    except UserError as e:
        raise _fail(e, e.exit_code) from None
    out = Console(highlight=False, soft_wrap=True)  # never wrap: the resolved YAML must stay valid
    for note in notes:
        out.print(f"note: {note}", markup=False)
    out.print(f"[green]ok[/]: {escape(str(recipe))} is a valid {r.stage} recipe. Resolved:", markup=True)
    out.print(dump_recipe(r), markup=False, end="")


@app.command()
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
    local_rank: Annotated[int | None, typer.Option("--local_rank", "--local-rank", hidden=True)] = None,
) -> None:
    """Run the stage a recipe describes; its outputs go to the recipe's output_dir.

    Started again with the same recipe, a run resumes from its newest complete checkpoint."""
    from llmtune.recipe import load_recipe
    from llmtune.recipe.checks import check_paths

    try:
        r = load_recipe(recipe, set_ or [])
        check_paths(r)
        from llmtune.stages import run_stage

        if resume_from is not None and no_resume:
            raise UserError("--resume-from and --no-resume contradict each other", hint="pass one of them")
        run_stage(r, local_rank=local_rank, resume_from=resume_from, resume=not no_resume, overwrite=overwrite)
    except UserError as e:
        raise _fail(e, e.exit_code) from None
    except TrainingError as e:
        raise _fail(e, e.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted: the newest complete checkpoint in output_dir is kept")
        raise typer.Exit(130) from None


@app.command()
def version() -> None:
    """Print the llmtune version."""
    print(__version__)


def main() -> None:
    try:
        app()
    except SystemExit:
        raise
    except UserError as e:  # raised outside a command (should not happen, but never show a traceback)
        err.print(f"error: {e}", markup=False)
        sys.exit(e.exit_code)
