"""One optimizer step of the shared loop: the accumulation window's forward / backward passes, the vote
(every process alike) on a NaN / Inf and on a stop request before the update, what a skipped step means, and
the evaluation over the held-out samples."""

from __future__ import annotations

import functools
import math
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from llmtune.engine.checkpoint import TrainerState, resume_point
from llmtune.engine.contract import Batch, Stage, StageContext, Window
from llmtune.engine.distributed import all_reduce_sum
from llmtune.errors import RecipeError, StepInterrupted, TrainingError
from llmtune.recipe.schema import RecipeBase


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class StepGuard:
    """Lets the trainer veto one optimizer update. The step function of the optimizer llmtune builds is
    wrapped, and every DeepSpeed wrapper (ZeRO 1-3, bf16 / fp16 master weights) updates the weights only
    through it: a vetoed step leaves weights, moments and the optimizer's step count as they were, and
    DeepSpeed still zeroes the gradients and keeps its micro-step counters in order."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.block = False
        inner = optimizer.step

        @functools.wraps(inner)
        def step(*args: Any, **kwargs: Any) -> Any:
            return None if self.block else inner(*args, **kwargs)

        optimizer.step = step  # type: ignore[method-assign]


class StopRequest:
    """SIGTERM (a scheduler preempting the job) or Ctrl-C while training: finish the step in progress, write a
    checkpoint, and stop with a message; a second signal stops at once. Every process votes in the step's
    reduction, so all of them stop after the same step and write the checkpoint together."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, console: Console, on_signal: Callable[[], None] | None = None) -> None:
        # the notice goes to stderr: with `llmtune train ... | tee log`, Ctrl-C ends tee and stdout with it
        self.console = Console(stderr=True, quiet=console.quiet, highlight=False, soft_wrap=True)
        self.on_signal = on_signal  # e.g. ends a rollout in progress (StageContext.interrupt)
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:  # the second one: stop now, as the signal would without llmtune
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum = signum
        doing = (  # one process drops the step in progress; several finish it together
            "stopping at the next micro-batch, checkpointing the last finished step"
            if self.on_signal is not None
            else "finishing this step, writing a checkpoint, then stopping"
        )
        self.console.print(f"\n[yellow]{signal.Signals(signum).name}[/]: {doing} (send it again to stop at once)")
        if self.on_signal is not None:
            self.on_signal()


@dataclass
class WindowResult:
    loss: float  # mean over the window's units, all ranks
    units: float
    grad_norm: float | None
    metrics: dict[str, float]
    nonfinite: str | None  # "loss" / "gradient": llmtune vetoed the update for a NaN / Inf
    applied: bool  # DeepSpeed's view: it took the step (and moved the LR schedule), not seeing an overflow
    stop: bool = False  # some process was asked to stop (SIGTERM / Ctrl-C)


def train_window(
    ctx: StageContext,
    stage: Stage,
    window: Window | None,
    guard: StepGuard,
    stop_requested: bool = False,
    adalora: Any = None,
    step: int = 0,
    interrupted: Callable[[], bool] | None = None,
) -> WindowResult:
    """One optimizer step over an accumulation window. The loss is normalised by the number of units
    (tokens) in the whole window on all ranks, so the update does not depend on how rows are split into
    micro-batches, accumulation steps and processes. DeepSpeed averages gradients over ranks, hence the
    factor world_size. Before the update, a NaN / Inf loss on any rank (or, under ZeRO-0, a non-finite
    gradient) vetoes it on every rank. A None window (the stage skips the step on every rank) only votes on
    stopping. adalora: AdaLoRA's schedule, which reads the step's gradients (`step`: this step's 1-based
    number) around the update. interrupted (one process: StageContext.interrupt): checked before each
    micro-batch; once it says so the step is dropped before its update (errors.StepInterrupted)."""
    engine, dist = ctx.engine, ctx.dist
    if window is None:
        stop = all_reduce_sum(torch.tensor([1.0 if stop_requested else 0.0], dtype=torch.float64, device=dist.device))
        return WindowResult(0.0, 0.0, None, {}, None, True, stop.item() > 0)
    batches = [to_device(b, dist.device) for b in window]
    stage.prepare_window(ctx, batches)  # window-level quantities (KTO's reference point)
    local_units = sum(stage.units(b).double() for b in batches)
    global_units = all_reduce_sum(torch.as_tensor(local_units, dtype=torch.float64, device=dist.device))
    denom = max(global_units.item(), 1.0)
    loss_total = torch.zeros((), dtype=torch.float64, device=dist.device)
    bad_losses = torch.zeros((), dtype=torch.float64, device=dist.device)
    sums: dict[str, torch.Tensor] = {}
    grad_norm = None
    for i, b in enumerate(batches):
        if interrupted is not None and interrupted():
            raise StepInterrupted(f"a stop was requested before micro-batch {i + 1} of {len(batches)}")
        out = stage.step(engine, b)
        loss = out.loss_sum * (dist.world_size / denom)
        engine.backward(loss, scale_wrt_gas=False)
        loss_total += out.loss_sum.detach().double()
        bad_losses += (~torch.isfinite(out.loss_sum.detach())).double().sum()
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0) + v.detach().double()
        if i < len(batches) - 1:
            engine.step()  # a micro-step: DeepSpeed only counts it
    # the boundary: one reduction decides, on every rank alike, whether the update may happen
    if engine.zero_optimization_stage() == 0:
        grad_norm = _local_grad_norm(engine.module)  # ZeRO-0 keeps whole gradients on every rank
    stop = torch.ones_like(loss_total) if stop_requested else torch.zeros_like(loss_total)
    totals = all_reduce_sum(torch.stack([loss_total, bad_losses, stop]))
    nonfinite = "loss" if totals[1].item() > 0 or not math.isfinite(totals[0].item()) else None
    if nonfinite is None and grad_norm is not None and not math.isfinite(grad_norm):
        nonfinite = "gradient"
    guard.block = nonfinite is not None
    if adalora is not None:
        adalora.before_update()
    try:
        engine.step()
    finally:
        guard.block = False
    applied = engine.was_step_applied()
    if adalora is not None:
        adalora.after_update(step, applied and nonfinite is None)
    metrics = {
        k: all_reduce_sum(torch.as_tensor(v, device=dist.device)).item() / denom for k, v in sorted(sums.items())
    }
    if grad_norm is None:
        grad_norm = _engine_grad_norm(engine)
    return WindowResult(
        totals[0].item() / denom, global_units.item(), grad_norm, metrics, nonfinite, applied, totals[2].item() > 0
    )


def check_numbers(
    result: WindowResult, recipe: RecipeBase, state: TrainerState, out: Path, console: Console
) -> str | None:
    """After a step: None when it was fine; "overflow" for an fp16 step the loss scaler skipped (normal while
    the scale settles); "nan" for a step skipped for a NaN / Inf (train.on_nan: skip). Stops the run with the
    step and the cause when on_nan is stop, or once more than max_nan_skips steps were skipped."""
    t = recipe.train
    fp16 = recipe.precision == "fp16"
    cause = None
    if not math.isfinite(result.loss):
        cause = f"the loss is {result.loss}"
    elif result.nonfinite == "gradient" or (not result.applied and not fp16):
        # without fp16 loss scaling, DeepSpeed skips a step only for a non-finite gradient norm
        norm = result.grad_norm
        cause = f"the gradient norm is {norm}" if norm is not None and not math.isfinite(norm) else None
        cause = cause or "the gradient is not finite"
    elif not result.applied:
        state.overflow_skips += 1
        return "overflow"
    if cause is None:
        return None
    checkpoints = resume_point(out)
    fix = (
        "  fix: lower train.lr, keep train.max_grad_norm on, use bf16 rather than fp16, and check the data for "
        "empty or extreme rows"
    )
    if t.on_nan == "stop":
        raise TrainingError(
            f"{cause} at step {state.step}; training stopped ({checkpoints})\n{fix} "
            "(or set train.on_nan: skip to skip such steps)"
        )
    state.nan_skips += 1
    if state.nan_skips > t.max_nan_skips:
        raise TrainingError(
            f"{cause} at step {state.step}: {state.nan_skips} steps skipped for NaN / Inf, more than "
            f"train.max_nan_skips={t.max_nan_skips}; training stopped ({checkpoints})\n{fix}"
        )
    console.print(
        f"[yellow]step {state.step} skipped[/]: {cause}; no weight changed "
        f"({state.nan_skips} of at most {t.max_nan_skips} skips)"
    )
    return "nan"


def is_fp16_scale_error(e: BaseException) -> bool:
    return "loss scale already at minimum" in str(e)


def fp16_scale_error(e: BaseException, step: int, out: Path) -> TrainingError:
    """DeepSpeed's dynamic loss scaler gave up: fp16 overflows even at the smallest loss scale."""
    return TrainingError(
        f"fp16 overflow at step {step}: the gradients overflow even at the minimum loss scale; training stopped "
        f"({resume_point(out)})\n"
        "  fix: use precision: bf16 (on Ampere or newer GPUs), or lower train.lr and keep train.max_grad_norm on"
    )


def _local_grad_norm(model: torch.nn.Module) -> float | None:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else None


def _engine_grad_norm(engine: Any) -> float | None:
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    return float(g.item() if isinstance(g, torch.Tensor) else g)


def evaluate(ctx: StageContext, stage: Stage, samples: Sequence[Any]) -> dict[str, float]:
    """Loss over the eval set (every rank takes a shard; sums are reduced). Returns name -> value."""
    recipe, dist, engine = ctx.recipe, ctx.dist, ctx.engine
    model = engine.module
    was_training = model.training
    model.eval()
    bs = recipe.train.eval_batch_size or recipe.train.micro_batch_size
    mine = samples[dist.rank :: dist.world_size]
    # Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively): a rank
    # with fewer rows repeats its first batch and leaves it out of the sums.
    n_batches = math.ceil(math.ceil(len(samples) / dist.world_size) / bs)
    loss = torch.zeros((), dtype=torch.float64, device=dist.device)
    units = torch.zeros((), dtype=torch.float64, device=dist.device)
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for b in range(n_batches):
            rows = mine[b * bs : (b + 1) * bs]
            batch = to_device(ctx.collate(rows or (mine or samples)[:bs]), dist.device)
            out = stage.step(engine, batch)
            for k in out.metrics:
                sums.setdefault(k, torch.zeros((), dtype=torch.float64, device=dist.device))
            if not rows:
                continue
            loss += out.loss_sum.double()
            units += out.units.double()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=dist.device)) + v.double()
    if was_training:
        model.train()
    loss, units = all_reduce_sum(loss), all_reduce_sum(units)
    n = max(units.item(), 1.0)
    result: dict[str, float] = {"eval/loss": loss.item() / n, "eval/units": round(units.item())}
    if stage.unit_name == "tokens":  # a per-token cross entropy: perplexity means something
        result["eval/perplexity"] = math.exp(min(result["eval/loss"], 50.0))
    for k in sorted(sums):  # the same keys on every rank: each ran at least one batch
        result[f"eval/{k}"] = all_reduce_sum(sums[k]).item() / n
    return result


def check_best_metric(ctx: StageContext, stage: Stage, samples: Sequence[Any]) -> None:
    """Before the first step: train.best_metric must be a metric this stage's evaluation reports (found by
    evaluating one batch, with the random state put back), so that a typo does not surface hours later."""
    recipe, dist = ctx.recipe, ctx.dist
    name = recipe.train.best_metric
    if not samples:
        raise RecipeError(
            f"train.best_metric {name} needs evaluation data, and this run has none",
            hint="add data.eval or data.eval_split, or remove train.best_metric",
        )
    bs = recipe.train.eval_batch_size or recipe.train.micro_batch_size
    devices = [dist.device] if dist.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        names = stage.evaluate(ctx, samples[: bs * dist.world_size])
    if name not in names:
        raise RecipeError(
            f"train.best_metric {name} is not a metric of this stage's evaluation, which reports "
            f"{', '.join(sorted(names))}",
            hint="name one of those (e.g. best_metric: eval/loss, best_mode: min)",
        )
