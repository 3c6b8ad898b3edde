"""data.schedule: the training sources' shares step by step, and how many rows each step takes from each.

Pure functions of the recipe and the run's length (no torch, no state): the batch source
(engine/batches.py's ScheduledBatches) asks them for a step's counts, so a resumed run draws what the
uninterrupted run drew.
"""

from __future__ import annotations

import numpy as np

from llmtune.recipe.data import SchedulePhase


def phase_ends(phases: list[SchedulePhase], total_steps: int) -> list[int]:
    """Each phase's end as a number of steps (the phase holds steps [previous end, end), counted from 0); the
    last phase ends at total_steps. A fraction is rounded to the nearest step."""
    ends = []
    for p in phases[:-1]:
        end = round(p.until * total_steps) if p.until is not None else int(p.until_step or 0)
        ends.append(min(max(end, ends[-1] if ends else 0), total_steps))
    return [*ends, total_steps]


def step_shares(phases: list[SchedulePhase], ids: list[str], total_steps: int) -> np.ndarray:
    """(total_steps, sources): each step's share of each source (rows sum to 1). A ramp phase moves linearly
    from the previous phase's shares to its own, reached at its last step."""
    norm = [np.array([p.weights[i] for i in ids], dtype=np.float64) for p in phases]
    norm = [w / w.sum() for w in norm]
    out = np.zeros((total_steps, len(ids)), dtype=np.float64)
    start = 0
    for k, end in enumerate(phase_ends(phases, total_steps)):
        n = end - start
        if n > 0:
            if phases[k].ramp:
                t = (np.arange(1, n + 1, dtype=np.float64) / n)[:, None]
                out[start:end] = norm[k - 1] + (norm[k] - norm[k - 1]) * t
            else:
                out[start:end] = norm[k]
        start = end
    return out


def step_counts(shares: np.ndarray, rows_per_step: int) -> np.ndarray:
    """(steps, sources): how many of a step's rows_per_step rows each source gives. Each step rounds its
    shares with the rounding error carried to the next step, so that the counts of any run of steps are
    within about one row per source of the shares; a source with share 0 gives no row."""
    steps, n = shares.shape
    out = np.zeros((steps, n), dtype=np.int64)
    carry = np.zeros(n, dtype=np.float64)
    for s in range(steps):
        live = shares[s] > 0
        carry[~live] = 0.0
        carry[live] -= carry[live].sum() / max(int(live.sum()), 1)  # the live sources' targets sum to the step
        target = shares[s] * rows_per_step + carry
        counts = np.where(live, np.floor(np.maximum(target, 0)), 0).astype(np.int64)
        left = rows_per_step - int(counts.sum())
        if left > 0:  # the largest remainders among the live sources (the first source on a tie)
            rest = np.where(live, target - counts, -np.inf)
            order = np.argsort(-rest, kind="stable")
            counts[order[:left]] += 1
        elif left < 0:  # (only by float error) take back from the smallest remainders
            rest = np.where(counts > 0, target - counts, np.inf)
            order = np.argsort(rest, kind="stable")
            counts[order[:-left]] -= 1
        carry = target - counts
        out[s] = counts
    return out
