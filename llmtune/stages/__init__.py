"""One small module per stage; the loop, checkpoints and logging live once, in llmtune.engine."""

from __future__ import annotations

import os
import sys
from typing import Any


def get_stage(name: str) -> Any:
    if name == "cpt":
        from llmtune.stages.cpt import CptStage

        return CptStage()
    if name == "sft":
        from llmtune.stages.sft import SftStage

        return SftStage()
    if name == "rm":
        from llmtune.stages.rm import RmStage

        return RmStage()
    if name == "dpo":
        from llmtune.stages.dpo import DpoStage

        return DpoStage()
    if name == "ppo":
        from llmtune.stages.ppo import PpoStage

        return PpoStage()
    if name == "grpo":
        from llmtune.stages.grpo import GrpoStage

        return GrpoStage()
    raise ValueError(f"unknown stage {name}")


def quiet_libraries(loading_bars: bool | None = None) -> None:
    """Silence known-harmless library noise so that the run's own messages stay readable. loading_bars:
    transformers' "Loading weights" bars; None: only on a terminal (stderr), False: never (training, which
    says itself what it loads and draws its own progress)."""
    import logging
    import warnings

    import torch

    if not torch.cuda.is_available():  # said before DeepSpeed is imported: no "Setting accelerator to CPU" warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    # peft probes this deprecated transformers property; the warning is not the user's to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # AdaLoRA adapters store their rank pattern by lora_E parameter; peft's LoRA check of rank_pattern keys
    # against module names calls them ignored, but AdaLoRA itself resizes the layers by them when it loads.
    warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
    # bitsandbytes reports that optional hub kernels are absent and falls back to its own CPU code.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # ... through the `kernels` package (transformers >= 5.25 installs it), which says offline that it
    # skips a publisher check for a kernel it then does not find; the CPU fallback is used either way.
    logging.getLogger("kernels").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # "Token indices sequence length is longer than ... indexing errors": rows are tokenized whole, then cut
    # to data.max_length (capped at the model's positions); a row left with nothing to learn is dropped and named
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    if not (sys.stderr.isatty() if loading_bars is None else loading_bars):  # in a log file, only noise
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def run_stage(recipe: Any, local_rank: int | None = None, **options: Any) -> None:
    """options: resume_from (a checkpoint dir), resume (bool), overwrite (bool), trust_reward_code (bool);
    see llmtune.engine.trainer."""
    quiet_libraries(loading_bars=False)
    from llmtune.engine.report import run_console
    from llmtune.model.gguf import resolve_gguf

    console = run_console(int(os.environ.get("RANK", "0")) == 0)
    recipe.model.path = resolve_gguf(recipe.model.path, console)  # a .gguf file: its converted model
    if getattr(getattr(recipe, "dpo", None), "reference", None):
        recipe.dpo.reference = resolve_gguf(recipe.dpo.reference, console)
    if recipe.stage == "rejection_sampling":  # rounds of generate -> score -> select -> sft (the same loop)
        from llmtune.stages.rejection_sampling import run_rejection_sampling

        run_rejection_sampling(recipe, local_rank=local_rank, **options)
        return
    from llmtune.engine.trainer import train

    train(recipe, get_stage(recipe.stage), local_rank=local_rank, **options)
