"""``llmtune train``: the recipe read and checked (the same checks as validate, refusing what validate notes),
then the stage run by name; its outputs go to the recipe's output_dir."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from llmtune.commands.preflight import check_hub, check_paths
from llmtune.errors import UserError
from llmtune.paths import check_path_lengths
from llmtune.recipe import load_recipe


def train_command(
    recipe_path: Path,
    overrides: list[str],
    *,
    resume_from: Path | None,
    no_resume: bool,
    overwrite: bool,
    trust_reward_code: bool,
    local_rank: int | None,
    err: Console,
) -> bool:
    """Run the recipe's stage; False when Ctrl-C stopped it (the newest complete checkpoint is kept)."""
    try:
        r = load_recipe(recipe_path, overrides)
        check_paths(r)
        check_hub(r, refuse=True)  # a hub model neither cached nor reachable: now, not after a minute of retries
        check_path_lengths(("--resume-from", resume_from))
        if int(os.environ.get("RANK", "0")) == 0:  # the imports below take seconds: say what is happening
            Console(highlight=False, soft_wrap=True).print(
                f"stage {r.stage}: {escape(str(recipe_path))} is valid; starting (torch, DeepSpeed, transformers) ..."
            )
        from llmtune.stages import run_stage

        if resume_from is not None and no_resume:
            raise UserError("--resume-from and --no-resume contradict each other", hint="pass one of them")
        run_stage(
            r,
            local_rank=local_rank,
            resume_from=resume_from,
            resume=not no_resume,
            overwrite=overwrite,
            trust_reward_code=trust_reward_code,
        )
    except KeyboardInterrupt:
        err.print("interrupted: the newest complete checkpoint in output_dir is kept")
        return False
    return True
