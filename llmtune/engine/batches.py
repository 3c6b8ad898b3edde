"""Where the training loop's batches come from: a fixed, shuffled, resumable list (every offline stage), or
rollouts that a stage generates from prompts with the current policy (the online stages). Both hand the loop
accumulation windows by position (epoch, window), so a resumed run continues exactly."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from llmtune.engine.contract import Window
from llmtune.engine.distributed import DistInfo
from llmtune.errors import DataError
from llmtune.recipe.schema import RecipeBase


def epoch_order(n: int, recipe: RecipeBase, dist: DistInfo, epoch: int, rank: int | None = None) -> list[int]:
    """This rank's (or `rank`'s) share of a seeded permutation of n items for an epoch (every rank gets as
    many)."""
    order = list(range(n))
    if recipe.data.shuffle:
        random.Random(recipe.seed * 1000003 + epoch).shuffle(order)
    world = dist.world_size
    if n % world:  # every rank gets the same number of rows: wrap around
        order += order[: world - n % world]
    return order[(dist.rank if rank is None else rank) :: world]


class Batches:
    """Deterministic data order: a seeded permutation per epoch, sharded over ranks, cut into micro-batches
    and grouped into accumulation windows. Position = (epoch, window), so a resumed run continues exactly."""

    def __init__(self, samples: Sequence[Any], recipe: RecipeBase, dist: DistInfo, collate: Any) -> None:
        self.samples, self.recipe, self.dist, self.collate = samples, recipe, dist, collate
        t = recipe.train
        per_rank = math.ceil(len(samples) / dist.world_size)
        self.micro_per_rank = math.ceil(per_rank / t.micro_batch_size)
        self.windows_per_epoch = self.micro_per_rank // t.grad_accum
        self.accum = t.grad_accum  # micro-batches per optimizer step
        self.rows_per_step = t.micro_batch_size * t.grad_accum * dist.world_size
        self.step_text = ""  # what a step holds, beyond rows (the online stages: prompts x generations)
        if self.windows_per_epoch == 0:
            raise DataError(
                f"{len(samples)} training rows give {self.micro_per_rank} micro-batches per process per epoch, "
                f"fewer than train.grad_accum={t.grad_accum}",
                hint="lower train.grad_accum or train.micro_batch_size, or add data",
            )

    def epoch_windows(self, epoch: int, start_window: int = 0) -> Iterator[Window]:
        t = self.recipe.train
        mine = epoch_order(len(self.samples), self.recipe, self.dist, epoch)
        micro = [mine[i : i + t.micro_batch_size] for i in range(0, len(mine), t.micro_batch_size)]
        for w in range(start_window, self.windows_per_epoch):
            chunk = micro[w * t.grad_accum : (w + 1) * t.grad_accum]
            yield [self.collate([self.samples[i] for i in idx]) for idx in chunk]

    def reached(self, epoch: int, window: int, steps: int) -> set[int]:
        """The samples (on every rank) that the next `steps` windows from (epoch, window) hold: what a run that
        stops after them trains on (dpo computes reference log-probs for these, not the whole data)."""
        t = self.recipe.train
        per_window = t.micro_batch_size * t.grad_accum
        out: set[int] = set()
        while steps > 0:
            take = min(steps, self.windows_per_epoch - window)
            for rank in range(self.dist.world_size):
                mine = epoch_order(len(self.samples), self.recipe, self.dist, epoch, rank)
                out.update(mine[window * per_window : (window + take) * per_window])
            steps -= take
            epoch, window = epoch + 1, 0
            if len(out) == len(self.samples):
                break
        return out

    def metrics(self) -> dict[str, float]:
        """Figures about the batches of the last window (none for fixed data)."""
        return {}

    def after_step(self, metrics: dict[str, float]) -> None:
        """Sees each step's metrics (the same on every rank); fixed data has no use for them."""


class Rollouts:
    """Windows a stage makes from prompts with the current policy. Each rank takes `prompts_per_rollout`
    prompts of its shard of the epoch's order per rollout; ``make(prompts, seed)`` turns them into the
    rollout's `steps_per_rollout` windows, one per optimizer step, each of `accum` micro-batches (it generates,
    scores, and may return metrics through ``last_metrics``): grpo's num_iterations steps on one window, ppo's
    epochs over mini-batches. A rollout's seed depends only on its position, so a run resumed at a rollout
    boundary samples what the uninterrupted run sampled (``extra_prompts`` draws more, seeded the same way).
    A stage may end a rollout's steps early (``skip_rest``, e.g. ppo's KL early stop): the remaining windows
    come as None, steps that update nothing."""

    def __init__(
        self,
        prompts: Sequence[Any],
        recipe: RecipeBase,
        dist: DistInfo,
        prompts_per_rollout: int,
        steps_per_rollout: int = 1,
        *,
        accum: int = 1,
        rows_per_step: int = 0,
        step_text: str = "",
    ) -> None:
        self.prompts, self.recipe, self.dist = prompts, recipe, dist
        self.per_rollout, self.steps_per_rollout = prompts_per_rollout, steps_per_rollout
        self.accum, self.rows_per_step, self.step_text = accum, rows_per_step, step_text
        per_rank = math.ceil(len(prompts) / dist.world_size)
        self.rollouts_per_epoch = per_rank // prompts_per_rollout
        if self.rollouts_per_epoch == 0:
            raise DataError(
                f"{len(prompts)} training prompts give {per_rank} per process, fewer than the {prompts_per_rollout} "
                "prompts one rollout needs",
                hint=f"add prompts, or lower {getattr(recipe, 'stage', '')}.prompts_per_step"
                + (" or ppo.rollout_batch_size" if getattr(recipe, "stage", "") == "ppo" else ""),
            )
        self.windows_per_epoch = self.rollouts_per_epoch * steps_per_rollout
        self.make: Callable[[list[Any], int], list[Window]] | None = None  # set by the stage once the engine exists
        self.on_step: Callable[[dict[str, float]], None] | None = None  # sees each step's metrics (all ranks)
        self.skip_rest = False
        self.last_metrics: dict[str, float] = {}
        self._cache: tuple[tuple[int, int], list[Window]] | None = None

    def epoch_windows(self, epoch: int, start_window: int = 0) -> Iterator[Window | None]:
        assert self.make is not None, "the stage sets Rollouts.make in before_training"
        mine = epoch_order(len(self.prompts), self.recipe, self.dist, epoch)
        for w in range(start_window, self.windows_per_epoch):
            j, k = divmod(w, self.steps_per_rollout)
            key = (epoch, j)
            if self._cache is None or self._cache[0] != key:
                chosen = [self.prompts[i] for i in mine[j * self.per_rollout : (j + 1) * self.per_rollout]]
                seed = self.recipe.seed * 1000003 + epoch * 100003 + j
                t0 = time.perf_counter()
                self.skip_rest = False
                windows = self.make(chosen, seed)
                assert len(windows) == self.steps_per_rollout, "make returns one window per step of the rollout"
                self.last_metrics["rollout_s"] = time.perf_counter() - t0
                self._cache = (key, windows)
            yield None if self.skip_rest else self._cache[1][k]

    def extra_prompts(self, seed: int, draw: int) -> list[Any]:
        """`prompts_per_rollout` more prompts from this rank's shard, drawn at random (seeded by the rollout's
        seed and the draw's number: a resumed run draws the same), for dynamic sampling."""
        rng = random.Random(seed * 1009 + draw)
        pool = self.prompts[self.dist.rank :: self.dist.world_size] or self.prompts
        if len(pool) >= self.per_rollout:
            return rng.sample(pool, self.per_rollout)
        return rng.choices(pool, k=self.per_rollout)

    def metrics(self) -> dict[str, float]:
        return dict(self.last_metrics)

    def after_step(self, metrics: dict[str, float]) -> None:
        if self.on_step is not None:
            self.on_step(metrics)


def total_steps(recipe: RecipeBase, windows_per_epoch: int) -> int:
    """The run's optimizer steps: train.max_steps, else train.epochs passes of windows_per_epoch."""
    t = recipe.train
    return t.max_steps if t.max_steps is not None else max(1, round(t.epochs * windows_per_epoch))


class ScheduledBatches:
    """data.schedule: each step's rows come from the training sources in the shares of the step's phase
    (data/schedule.py's counts: a pure function of the recipe and the run's length). Source j's k-th row drawn
    in the run is row k mod n of its own seeded permutation for pass k // n, so sources cycle independently;
    a step's rows are shuffled together (seeded by the step), then dealt to the ranks and cut into
    micro-batches. An epoch is as many rows as all sources hold, for train.epochs and the logs. Everything
    is a function of seed and step, so a resumed run gets the uninterrupted run's batches."""

    def __init__(
        self, sources: list[tuple[str, Sequence[Any]]], recipe: RecipeBase, dist: DistInfo, collate: Any
    ) -> None:
        import numpy as np

        from llmtune.data.schedule import step_counts, step_shares

        assert recipe.data.schedule is not None
        self.sources, self.recipe, self.dist, self.collate = sources, recipe, dist, collate
        t = recipe.train
        empty = [name for name, rows in sources if not len(rows)]
        if empty:
            raise DataError(f"data.schedule: source {empty[0]!r} has no training row", hint="add rows to it")
        n = sum(len(rows) for _, rows in sources)
        self.windows_per_epoch = math.ceil(math.ceil(n / dist.world_size) / t.micro_batch_size) // t.grad_accum
        self.windows_per_epoch = max(1, self.windows_per_epoch)
        self.rows_per_step = t.micro_batch_size * t.grad_accum * dist.world_size
        self.accum = t.grad_accum  # micro-batches per optimizer step
        self.step_text = ""
        self.total_steps = total_steps(recipe, self.windows_per_epoch)
        shares = step_shares(recipe.data.schedule, [name for name, _ in sources], self.total_steps)
        self.counts = step_counts(shares, self.rows_per_step)  # (steps, sources)
        self.before = np.concatenate([np.zeros((1, len(sources)), dtype=np.int64), np.cumsum(self.counts, 0)])
        self._perm: dict[tuple[int, int], Any] = {}
        self.last_shares: list[float] = []

    def _order(self, j: int, p: int) -> Any:
        """Source j's row order for its pass p (seeded; an int64 array, 8 bytes a row, kept for the pass the
        run is in)."""
        import hashlib

        import numpy as np

        key = (j, p)
        if key not in self._perm:
            n = len(self.sources[j][1])
            order = np.arange(n, dtype=np.int64)
            if self.recipe.data.shuffle:
                seed = int(hashlib.sha256(f"{self.recipe.seed}|schedule|{j}|{p}".encode()).hexdigest()[:16], 16)
                order = np.random.default_rng(seed).permutation(n)
            self._perm = {k: v for k, v in self._perm.items() if k[0] != j}
            self._perm[key] = order
        return self._perm[key]

    def step_rows(self, step: int) -> list[tuple[int, int]]:
        """(source, row) of every row of a step (0-based), all ranks, in the step's order."""
        s = min(step, len(self.counts) - 1)  # (past the run's length: the last step's mix)
        rows: list[tuple[int, int]] = []
        for j, (_, samples) in enumerate(self.sources):
            n = len(samples)
            start = int(self.before[s, j]) + (step - s) * int(self.counts[s, j])
            for k in range(start, start + int(self.counts[s, j])):
                rows.append((j, int(self._order(j, k // n)[k % n])))
        if self.recipe.data.shuffle:
            random.Random(f"{self.recipe.seed}|step|{step}").shuffle(rows)
        return rows

    def window_rows(self, step: int, rank: int | None = None) -> list[list[tuple[int, int]]]:
        """This rank's (or `rank`'s) micro-batches of a step, as (source, row) pairs."""
        t = self.recipe.train
        mine = self.step_rows(step)[(self.dist.rank if rank is None else rank) :: self.dist.world_size]
        return [mine[i : i + t.micro_batch_size] for i in range(0, len(mine), t.micro_batch_size)]

    def epoch_windows(self, epoch: int, start_window: int = 0) -> Iterator[Window]:
        for w in range(start_window, self.windows_per_epoch):
            step = epoch * self.windows_per_epoch + w
            micro = self.window_rows(step)
            counts = self.counts[min(step, len(self.counts) - 1)]
            self.last_shares = [float(c) / self.rows_per_step for c in counts]
            yield [self.collate([self.sources[j][1][i] for j, i in idx]) for idx in micro]

    def describe(self) -> str:
        """The schedule's phases as steps, for the log: "data.schedule: steps 1-20 general 100%; ..."."""
        from llmtune.data.schedule import phase_ends

        phases = self.recipe.data.schedule
        assert phases is not None
        names = [name for name, _ in self.sources]
        parts, start = [], 0
        for p, end in zip(phases, phase_ends(phases, self.total_steps), strict=True):
            if end > start:
                total = sum(p.weights.values())
                mix = " ".join(f"{n} {p.weights[n] / total:.0%}" for n in names)
                parts.append(f"steps {start + 1}-{end} {'rising to ' if p.ramp else ''}{mix}")
            start = end
        return "data.schedule: " + "; ".join(parts)

    def metrics(self) -> dict[str, float]:
        """The share of each source in the last step's rows (data/share/<source>)."""
        return {f"data/share/{name}": x for (name, _), x in zip(self.sources, self.last_shares, strict=False)}

    def after_step(self, metrics: dict[str, float]) -> None:
        """Fixed data has no use for a step's metrics."""
