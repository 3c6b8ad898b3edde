"""The training loop every stage shares: setup -> (resume) -> train with accumulation, eval and
checkpoints -> export. A stage contributes only its data and its step (engine/contract.py); set-up is in
engine/setup.py, one optimizer step and the evaluation in engine/step.py."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from llmtune.engine.checkpoint import (
    EXPORT_STAGING,
    capture_rng,
    remove_checkpoints,
    restore_rng,
    resume_point,
    save_checkpoint,
    tag,
)
from llmtune.engine.contract import Stage, Window
from llmtune.engine.distributed import barrier
from llmtune.engine.memory import out_of_memory_error, peak_line, write_peak
from llmtune.engine.report import Progress, plural
from llmtune.engine.setup import Run, setup, start_engine
from llmtune.engine.step import (
    StopRequest,
    WindowResult,
    check_best_metric,
    check_numbers,
    fp16_scale_error,
    is_fp16_scale_error,
    train_window,
)
from llmtune.engine.trackers import Trackers, status_of_exception
from llmtune.errors import RolloutInterrupted, StepInterrupted, Stopped
from llmtune.plot import write_run_curves
from llmtune.recipe.schema import RecipeBase
from llmtune.runtime import readable_like_normal_files


def train(
    recipe: RecipeBase,
    stage: Stage,
    local_rank: int | None = None,
    resume: bool = True,
    resume_from: Path | None = None,
    overwrite: bool = False,
    trust_reward_code: bool = False,
    trackers: Trackers | None = None,
) -> None:
    """setup (fail fast, before any heavy work) -> model and engine -> the loop -> the final evaluation,
    checkpoint and export. trackers: a caller's (rejection sampling's rounds share one); by default the run
    opens those train.report_to names and closes them at the end, also when it fails."""
    options = {"resume": resume, "resume_from": resume_from, "overwrite": overwrite}
    run = setup(recipe, stage, local_rank, trust_reward_code, **options)
    if run is None:
        return
    start_engine(run, trackers)
    try:
        _loop(run)
        _finish(run)
    except BaseException as e:
        if trackers is None and run.trackers is not None:
            run.trackers.close(status_of_exception(e))
        raise
    if trackers is None and run.trackers is not None:
        run.trackers.close("finished")


def _loop(run: Run) -> None:
    """Optimizer steps over the batch source's windows, with logging, evaluation, checkpoints, and the
    NaN / stop decisions; the manifest says stopped / failed if the loop ends early."""
    stage, state, ctx, data = run.stage, run.state, run.ctx, run.data
    assert run.manifest is not None
    reached = getattr(run.batches, "reached", None)
    if reached is not None:
        data.reached = reached(state.epoch, state.window_in_epoch, run.total_steps - state.step)
    stage.before_training(ctx, data)
    if run.resumed:
        stage.load_state_dict(state.stage_state)
    if run.recipe.train.best_metric:
        check_best_metric(ctx, stage, data.eval)
    run.engine.train()
    run.progress = Progress(run.console, run.total_steps, state.step)
    clock = _Clock()
    _between_steps(run)
    # one process: a stop also ends a rollout in progress (the step before it is the checkpoint)
    on_signal = ctx.interrupt.set if run.dist.world_size == 1 else None
    with StopRequest(run.console, on_signal) as stopper:
        try:
            try:
                while state.step < run.total_steps:
                    for window in run.batches.epoch_windows(state.epoch, state.window_in_epoch):
                        if _one_step(run, window, stopper, clock):
                            break
                    else:
                        state.epoch += 1
                        state.window_in_epoch = 0
            except (RolloutInterrupted, StepInterrupted) as e:
                what = "rollout" if isinstance(e, RolloutInterrupted) else "step"
                stopper.console.print(f"step {state.step + 1}: {e}; the {what} was dropped, nothing of it applied")
                _stopped_between_steps(run, stopper)
        except BaseException as e:
            run.progress.stop()
            run.manifest.status = "stopped" if isinstance(e, Stopped) else "failed"
            write_peak(run.manifest, run.dist.device, run.out, run.dist.is_main)
            raise
    run.progress.stop()


def _between_steps(run: Run) -> None:
    """Keep what a checkpoint of the step just finished would hold beyond the weights and counters (the random
    states, the stage's own state), so that a step dropped half-way can still be checkpointed exactly."""
    run.between = (capture_rng(), copy.deepcopy(run.stage.state_dict()))


def _stopped_between_steps(run: Run, stopper: StopRequest) -> None:
    """A stop ended a rollout, or a step between two micro-batches, before the step's update: checkpoint the
    last finished step (its weights and optimizer are untouched; its random and stage states are put back as
    they were after it: a rollout's samples depend only on its position, so the resumed run samples it again
    as the uninterrupted run would), and stop."""
    if run.saved_step != run.state.step:
        if run.between is not None:
            rng, stage_state = run.between
            restore_rng(rng)
            run.stage.load_state_dict(copy.deepcopy(stage_state))
        _save(run)
    raise Stopped(stopper.signum or signal.SIGTERM, run.state.step, run.out / "checkpoints" / tag(run.state.step))


class _Clock:
    """Units trained since the last logged step, and when that was: the throughput of each log line."""

    def __init__(self) -> None:
        self.units = 0.0
        self.last = time.perf_counter()


def _one_step(run: Run, window: Window | None, stopper: StopRequest, clock: _Clock) -> bool:
    """One optimizer step and what follows it (log line, evaluation, checkpoint, stop); True when the run's
    last step is done."""
    state, out, batches, t = run.state, run.out, run.batches, run.recipe.train
    assert run.guard is not None and run.progress is not None
    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
    step_start = time.perf_counter()
    try:
        result = train_window(
            run.ctx, run.stage, window, run.guard, stopper.signum != 0, run.adalora, state.step + 1, run.ctx.interrupt
        )
    except Exception as e:
        if is_fp16_scale_error(e):
            raise fp16_scale_error(e, state.step + 1, out) from None
        if isinstance(e, torch.OutOfMemoryError):
            raise out_of_memory_error(e, state.step + 1, run.recipe, resume_point(out)) from None
        raise
    state.step += 1
    state.window_in_epoch += 1
    state.tokens += int(result.units)
    clock.units += result.units
    step_metrics = {**result.metrics, **batches.metrics()}
    if "rollout_s" in step_metrics:  # the window was generated just before this step
        step_metrics["train_s"] = time.perf_counter() - step_start
    if run.ema is not None:
        run.ema.after_step(state.step)
    if window is None:  # the stage ended this rollout's steps early: no update, the schedule moves on
        skipped: str | None = "early_stop"
        run.scheduler.step()
    else:
        skipped = check_numbers(result, run.recipe, state, out, run.console)
        batches.after_step(step_metrics)
    if skipped == "nan" and not result.applied:
        run.scheduler.step()  # DeepSpeed saw the overflow and held the schedule: a skipped step moves it on
    last = state.step == run.total_steps
    if state.step % t.log_every == 0 or last or state.step == 1 or skipped:
        _log_step(run, result, window is None, lr, step_metrics, skipped, clock)
    run.progress.update(state.step, result.loss if window is not None else None, lr)
    if t.eval_every and run.data.eval and state.step % t.eval_every == 0 and not last:
        eval_and_log(run)
    if t.save_every and state.step % t.save_every == 0 and not last:
        _save(run)
    if result.stop and not last:
        if run.saved_step != state.step:
            _save(run)
        raise Stopped(stopper.signum or signal.SIGTERM, state.step, out / "checkpoints" / tag(state.step))
    _between_steps(run)
    if state.step >= run.total_steps:
        if state.window_in_epoch >= batches.windows_per_epoch:  # the last step ended an epoch
            state.epoch, state.window_in_epoch = state.epoch + 1, 0
        return True
    return False


def _log_step(
    run: Run,
    result: WindowResult,
    no_update: bool,
    lr: float,
    step_metrics: dict[str, float],
    skipped: str | None,
    clock: _Clock,
) -> None:
    """One metrics.jsonl line (and tracker and console line) for the step just taken."""
    state, unit = run.state, run.stage.unit_name
    assert run.log is not None and run.progress is not None
    now = time.perf_counter()
    record: dict[str, Any] = {
        "step": state.step,
        "epoch": round(state.epoch + state.window_in_epoch / run.batches.windows_per_epoch, 4),
        "loss": result.loss,
        "lr": lr,
        "grad_norm": result.grad_norm,
        unit: state.tokens,
        f"{unit}_per_s": clock.units / max(now - clock.last, 1e-9),
        **step_metrics,
    }
    if skipped:
        record["skipped"] = skipped
    if no_update:
        record["loss"] = None
    if state.nan_skips:
        record["nan_skips"] = state.nan_skips
    if state.overflow_skips:
        record["overflow_skips"] = state.overflow_skips
    clock.units, clock.last = 0.0, now
    run.log.write(record)
    run.progress.log(record)
    run.last_record = record


def eval_and_log(run: Run) -> None:
    result = run.stage.evaluate(run.ctx, run.data.eval)
    run.state.eval_step, run.state.eval_metrics = run.state.step, result
    record = {"step": run.state.step, **result}
    assert run.log is not None and run.progress is not None
    run.log.write(record)
    run.progress.log(record)


def _save(run: Run) -> None:
    t = run.recipe.train
    run.state.stage_state = run.stage.state_dict()
    best = (t.best_metric, t.best_mode) if t.best_metric else None
    # every process holds the same weight average (ZeRO 0-2): process 0 writes it with the checkpoint
    extras = tuple(x for x in (run.adalora, run.ema) if x is not None)
    save_checkpoint(run.engine, run.out, run.state, run.dist.rank, t.keep_checkpoints, best, extras=extras)
    run.saved_step = run.state.step


def _finish(run: Run) -> None:
    """The final evaluation and checkpoint, then the export through a staging directory, the manifest, and
    the curves (curves.png)."""
    dist, out, state = run.dist, run.out, run.state
    assert state is not None and run.manifest is not None
    if run.data.eval:
        eval_and_log(run)
    if run.recipe.train.save_every and run.saved_step != state.step:
        _save(run)
    run.engine.module.config.use_cache = True
    # Written to a staging directory, then moved into place file by file: a kill mid-export leaves no
    # truncated weights in output_dir (and run.json says finished only after the move).
    staging = out / EXPORT_STAGING
    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    run.console.print(f"writing the model to {out} ...")
    with warnings.catch_warnings():
        if run.adalora is not None:  # ranks AdaLoRA pruned to 0 are empty tensors by design, not unsaved shards
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        run.stage.export(run.ctx, staging)
        if run.ema is not None:  # the average in the model's own export shape, beside it
            run.console.print(f"writing the weight average ({run.ema.updates} updates) to {out / 'ema'} ...")
            with run.ema.swapped_in():
                run.stage.export(run.ctx, staging / "ema")
    epochs = round(state.epoch + state.window_in_epoch / max(run.batches.windows_per_epoch, 1), 4)
    if dist.is_main:
        _write_cards(run, staging, epochs)
        readable_like_normal_files(staging)  # safetensors writes its files 0600
    files = publish(staging, out) if dist.is_main else []
    m = run.manifest
    m.status, m.finished, m.steps = "finished", time.strftime("%Y-%m-%dT%H:%M:%S"), state.step
    m.epochs, m.trainer_state = epochs, asdict(state)
    peak = write_peak(m, dist.device, out, dist.is_main)  # also writes run.json
    if dist.is_main:
        write_run_curves(out, run.console)  # curves.png; a failure to draw is a warning, never a failed run
        _remove_checkpoints_at_finish(run)
    barrier()
    skips = f" ({state.nan_skips} skipped for NaN / Inf)" if state.nan_skips else ""
    run.console.print(
        f"[green]done[/]: {plural(state.step, 'step')}{skips}; model written to {out} ({', '.join(files)})"
    )
    run.console.print(peak_line(peak))
    if run.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _write_cards(run: Run, staging: Path, epochs: float) -> None:
    """The model card (README.md) of the export and of each part beside it (ema/, ppo's critic/)."""
    from llmtune.engine.card import write_model_card

    unit = run.stage.unit_name
    skip = {"step", "epoch", "lr", "grad_norm", "skipped", unit, f"{unit}_per_s", "rollout_s", "train_s"}
    last = {k: v for k, v in (run.last_record or {}).items() if k not in skip}
    metrics = {("loss (last step)" if k == "loss" else k): v for k, v in last.items()}
    metrics.update(run.state.eval_metrics if run.state.eval_step == run.state.step else {})
    options = {"steps": run.state.step, "epochs": epochs, "metrics": metrics}
    write_model_card(staging, run.recipe, **options)
    parts = {
        "ema": "The exponential moving average of the trained weights (train.ema), in the model's own shape.",
        "critic": "PPO's critic (the value model) trained beside the policy, which is the folder above. With "
        "ppo.memory shared it is an adapter on the policy's base plus value_head.safetensors, which ppo reads back.",
    }
    for sub in sorted(p for p in staging.iterdir() if p.is_dir()):
        if any((sub / f).is_file() for f in ("adapter_config.json", "config.json")):
            write_model_card(
                sub, run.recipe, what=parts.get(sub.name, f"The {sub.name} part of the run's output."), **options
            )


def _remove_checkpoints_at_finish(run: Run) -> None:
    """A finished run's output is its export: its checkpoints go, unless the recipe sets train.keep_checkpoints
    (then the newest N stay, e.g. to --resume-from one with a longer schedule); the best_metric checkpoint
    stays either way."""
    t = run.recipe.train
    if "keep_checkpoints" in t.model_fields_set:
        return
    best = (t.best_metric, t.best_mode) if t.best_metric else None
    removed, kept = remove_checkpoints(run.out, best)
    if removed:
        note = f"; kept the best by {t.best_metric}: {kept.name}" if kept is not None else ""
        run.console.print(
            f"removed {plural(len(removed), 'checkpoint')} (the exported model is the run's output{note}; set "
            "train.keep_checkpoints to keep the newest)"
        )


def publish(staging: Path, out: Path) -> list[str]:
    """Move what the export wrote into output_dir (replacing an earlier export's files); returns the names."""
    names = []
    for entry in sorted(staging.iterdir()):
        target = out / entry.name
        if entry.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            names.append(entry.name + "/")
        else:
            names.append(entry.name)
        os.replace(entry, target)
    staging.rmdir()
    return names
