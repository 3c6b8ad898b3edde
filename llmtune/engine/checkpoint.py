"""Checkpoints (resumable training state) and the final export (what the next stage loads).

A checkpoint is ``output_dir/checkpoints/step-00000042/``: DeepSpeed's model / optimizer / scheduler
states, ``trainer_state.json`` (counters and data position), ``rng_state_<rank>.json``, and ``COMPLETE``,
written last: a directory without it is a partial write and is ignored (and removed on the next save).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtune.engine.trackers import TRACKER_FILES
from llmtune.errors import TrainingError, UserError
from llmtune.manifest import status_of

MARKER = "COMPLETE"


EXPORT_STAGING = ".export-in-progress"  # the final model is written here, then moved into output_dir


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    window_in_epoch: int = 0  # accumulation windows of this epoch already consumed
    tokens: int = 0  # learned tokens seen, all ranks
    world_size: int = 1
    zero_stage: int = 0
    eval_step: int = -1  # the step of the last evaluation, and its results
    eval_metrics: dict[str, float] = field(default_factory=dict)
    nan_skips: int = 0  # steps skipped for a NaN / Inf loss or gradient (train.on_nan: skip)
    overflow_skips: int = 0  # fp16 steps the dynamic loss scaler skipped
    data_fingerprint: str = ""  # the training data's contents: a resume with changed data is refused
    stage_state: dict[str, Any] = field(default_factory=dict)  # a stage's own state (ppo's KL coefficient)


def read_trainer_state(ckpt: Path) -> TrainerState:
    """A checkpoint's trainer_state.json (keys an older version wrote and this one does not know are
    dropped). OSError / ValueError when it is missing or not JSON."""
    raw = json.loads((ckpt / "trainer_state.json").read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{ckpt / 'trainer_state.json'} is not a JSON object")
    known = {f.name for f in fields(TrainerState)}
    return TrainerState(**{k: v for k, v in raw.items() if k in known})


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def tag(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file())


def newest_checkpoint(output_dir: Path) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def capture_rng() -> tuple[Any, ...]:
    """The random generators' states in memory (python, numpy, torch, cuda): what a checkpoint written now would
    hold; restore_rng puts them back."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def restore_rng(states: tuple[Any, ...]) -> None:
    py, np_state, cpu, cuda = states
    random.setstate(py)
    np.random.set_state(np_state)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def _rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()  # the legacy tuple (MT19937, keys, pos, has_gauss, gauss)
    state: dict[str, Any] = {
        "python": repr(random.getstate()),
        "numpy": np_state[1].tolist(),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import ast

    random.setstate(_to_tuple(ast.literal_eval(state["python"])))
    np_state: Any = np.random.get_state()  # the legacy tuple (MT19937, keys, pos, has_gauss, gauss)
    np.random.set_state((np_state[0], np.array(state["numpy"], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(
    engine: Any,
    output_dir: Path,
    state: TrainerState,
    rank: int,
    keep: int,
    best: tuple[str, str] | None = None,
    extras: tuple[Any, ...] = (),
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory. extras: objects whose
    save(checkpoint_dir) rank 0 calls before the checkpoint is marked complete (adalora's schedule state,
    the weight average)."""
    root = checkpoint_dir(output_dir)
    t = tag(state.step)
    path = root / t
    if rank == 0 and path.exists():  # a partial write from a killed run at the same step
        shutil.rmtree(path)
    _barrier()
    try:
        engine.save_checkpoint(str(root), tag=t, save_latest=False)
        (path / f"rng_state_{rank}.json").write_text(json.dumps(_rng_state()))
        if rank == 0:
            for extra in extras:
                extra.save(path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and e.strerror:
            detail = e.strerror
        elif isinstance(e, RuntimeError):
            detail = f"a file write failed: {detail}"
        raise TrainingError(
            f"could not write checkpoint {path} ({detail}); training stopped ({resume_point(output_dir)})\n"
            "  fix: free disk space (or lower train.keep_checkpoints, or move output_dir to a larger disk), then "
            "run the same command again"
        ) from None
    _barrier()
    if rank == 0:
        (path / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
        (path / MARKER).write_text("ok\n")
        _rotate(output_dir, keep, best)
    _barrier()
    return path


def resume_point(output_dir: Path) -> str:
    """What a stopped run leaves to resume from, for its message."""
    done = complete_checkpoints(output_dir)
    if done:
        return f"the newest complete checkpoint, {done[-1]}, is kept: the same command resumes from it"
    return "no checkpoint had been written yet: set train.save_every to keep them"


def best_checkpoint(done: list[Path], metric: str, mode: str) -> Path | None:
    """The complete checkpoint whose own evaluation (at its step) has the best value of metric."""
    scored = []
    for p in done:
        try:
            st = read_trainer_state(p)
        except (OSError, ValueError, TypeError):
            continue
        value = st.eval_metrics.get(metric) if isinstance(st.eval_metrics, dict) else None
        if st.eval_step == st.step and isinstance(value, (int, float)) and math.isfinite(value):
            scored.append((value if mode == "min" else -value, p))
    return min(scored)[1] if scored else None


def _rotate(output_dir: Path, keep: int, best: tuple[str, str] | None = None) -> None:
    """Keep the newest `keep` complete checkpoints, and the best one when a metric is named."""
    root = checkpoint_dir(output_dir)
    done = complete_checkpoints(output_dir)
    spare = best_checkpoint(done, *best) if best else None
    for old in done[: max(0, len(done) - keep)]:
        if old != spare:
            shutil.rmtree(old, ignore_errors=True)
    newest = done[-1] if done else None
    for p in root.iterdir():  # partial checkpoints older than the newest complete one
        if p.is_dir() and not (p / MARKER).is_file() and newest is not None and p.name < newest.name:
            shutil.rmtree(p, ignore_errors=True)


def _safe_globals() -> list[Any]:
    """The few non-tensor classes DeepSpeed pickles into its checkpoints (loss-scaler and ZeRO state)."""
    import importlib

    found = []
    for name in _DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: a class it does not pickle
    return found


_DEEPSPEED_GLOBALS: tuple[str, ...] = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


@contextlib.contextmanager
def weights_only_loading() -> Any:
    """Every torch.load inside (DeepSpeed's included, which asks for full unpickling) reads tensors and plain
    containers only, plus an allowlist of DeepSpeed's own state classes: a checkpoint cannot run code."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def load_checkpoint(engine: Any, path: Path, rank: int, quantized: bool = False) -> TrainerState:
    """quantized: the frozen 4-bit base is rebuilt from model.path (quantization is deterministic); its
    quantization-state entries in the saved module state are not loaded back (bitsandbytes cannot take
    them through peft's wrapper), while every trainable parameter is."""
    state = read_trainer_state(path)
    with weights_only_loading():
        engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=not quantized)
    rng = path / f"rng_state_{rank}.json"
    if rng.is_file():
        _set_rng_state(json.loads(rng.read_text()))
    return state


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# --- final export -----------------------------------------------------------------------------------------


def export_model(
    engine: Any,
    tokenizer: Any,
    output_dir: Path,
    zero_stage: int,
    rank: int,
    part: str | None = None,
    adapters: list[str] | None = None,
) -> list[str]:
    """Write the model the next stage loads: full weights or the peft adapter (safetensors), the tokenizer
    and the generation config. Collective under ZeRO-3 (weights are gathered to rank 0).

    part: a submodule of the engine's model to write instead of all of it (ppo: policy, critic, value_head; a
    plain module is written as model.safetensors); adapters: which peft adapters to write (default all)."""
    model = engine.module if part is None else getattr(engine.module, part)
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if state_dict is not None and part is not None:
        state_dict = {k[len(part) + 1 :]: v for k, v in state_dict.items() if k.startswith(part + ".")}
    if rank != 0:
        return []
    output_dir.mkdir(parents=True, exist_ok=True)
    is_peft = hasattr(model, "peft_config")
    if is_peft:
        kwargs: dict[str, Any] = {"safe_serialization": True, "selected_adapters": adapters}
        if state_dict is not None:
            kwargs["state_dict"] = state_dict
        model.save_pretrained(output_dir, **kwargs)
        (output_dir / "README.md").unlink(missing_ok=True)  # peft's template card: the trainer writes llmtune's
    elif not hasattr(model, "save_pretrained"):  # a plain module (ppo's value head)
        from safetensors.torch import save_file

        if state_dict is None:
            state_dict = model.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, output_dir / f"{part}.safetensors")
    else:
        if state_dict is None:
            state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return sorted(p.name for p in output_dir.iterdir() if p.is_file())


# --- what to do with an output directory ------------------------------------------------------------------


@dataclass
class RunPlan:
    resume_from: Path | None = None  # a complete checkpoint to continue from
    finished: bool = False  # the same recipe already finished here: nothing to do


def same_recipe(saved: str, current: str) -> bool:
    """Whether a run's saved recipe.yaml is the recipe now resolved: the same text, or the same once the saved
    one is resolved again (a newer llmtune adds keys at their defaults, which change nothing)."""
    if saved == current:
        return True
    import yaml

    from llmtune.recipe.load import dump_recipe, validate_recipe

    def same_run(recipe: dict) -> dict:
        # data.memory_map picks how the rows are read, not which rows (both paths give the same ones): a run
        # saved with the old default (false) resumes under the new one (auto)
        data = recipe.get("data")
        if isinstance(data, dict):
            data.pop("memory_map", None)
        return recipe

    try:
        raw = yaml.safe_load(saved)
        if not isinstance(raw, dict):
            return False
        return same_run(yaml.safe_load(dump_recipe(validate_recipe(raw)))) == same_run(yaml.safe_load(current))
    except Exception:  # a saved recipe this version cannot read is another recipe
        return False


def plan_run(
    out: Path, recipe_text: str, *, resume: bool = True, resume_from: Path | None = None, overwrite: bool = False
) -> RunPlan:
    """Decide, from what output_dir holds, whether this run starts fresh, resumes, or has nothing to do.

    A non-empty output_dir that is not a run of the same recipe is refused unless ``overwrite``.
    Pure apart from reading the directory; the caller removes stale checkpoints (``fresh_start``).
    """
    if resume_from is not None:
        path = Path(resume_from).expanduser()
        if not path.is_dir():
            raise UserError(
                f"--resume-from {path}: " + ("does not exist" if not path.exists() else "is not a directory"),
                hint=f"pass a checkpoint directory like {checkpoint_dir(out)}/step-00000100",
            )
        if not (path / MARKER).is_file() or not (path / "trainer_state.json").is_file():
            raise UserError(
                f"--resume-from {path}: not a complete llmtune checkpoint (no {MARKER} marker)",
                hint=f"pass a directory like {checkpoint_dir(out)}/step-00000100 that holds {MARKER}",
            )
        return RunPlan(resume_from=path)
    if not out.exists() or not any(out.iterdir()):
        return RunPlan()
    saved = out / "recipe.yaml"
    same = saved.is_file() and same_recipe(saved.read_text(encoding="utf-8"), recipe_text)
    # A run of ours that stopped before it left anything of value (no checkpoint, no model): start over.
    ours = {"recipe.yaml", "run.json", "metrics.jsonl", "curves.png", "checkpoints", EXPORT_STAGING, *TRACKER_FILES}
    nothing_of_value = {p.name for p in out.iterdir()} <= ours
    if nothing_of_value and not complete_checkpoints(out):
        return RunPlan()
    if not same and not overwrite:
        what = "a run of a different recipe" if saved.is_file() else "files that are not an llmtune run"
        raise UserError(
            f"output_dir {out} is not empty: it holds {what}",
            hint="choose another output_dir, or pass --overwrite to train again in it "
            "(its checkpoints are removed); to continue a run, use the recipe it was started with, or, after a "
            "deliberate change, --resume-from one of its checkpoints",
        )
    if overwrite or not resume:
        return RunPlan()
    if status_of(out) == "finished":
        return RunPlan(finished=True)
    return RunPlan(resume_from=newest_checkpoint(out))


def fresh_start(out: Path) -> None:
    """Remove the checkpoints of an earlier run (only what llmtune wrote there)."""
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)


def remove_checkpoints(out: Path, best: tuple[str, str] | None = None) -> tuple[list[str], Path | None]:
    """After a finished run: remove its checkpoints (all of them, or all but the best by (metric, mode)), and
    the checkpoints folder when nothing is left in it. Returns the names removed and the one kept."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return [], None
    kept = best_checkpoint(complete_checkpoints(out), *best) if best else None
    removed = []
    for p in sorted(root.iterdir()):
        if p != kept:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p.name)
    if kept is None:
        root.rmdir()
    return removed, kept


def remove_partial_checkpoints(out: Path) -> list[str]:
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    partial = [p for p in root.iterdir() if p.is_dir() and not (p / MARKER).is_file()]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in partial]
