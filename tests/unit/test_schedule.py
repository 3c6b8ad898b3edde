"""data.schedule: the shares by step (hand-worked), the rows each step takes from each source (counted from
the batch source, in-process, with the real cpt / sft data paths), exact resume, and the refusals."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from llmtune.data.schedule import phase_ends, step_counts, step_shares
from llmtune.engine.batches import ScheduledBatches
from llmtune.engine.distributed import DistInfo
from llmtune.recipe import validate_recipe
from llmtune.recipe.data import SchedulePhase
from llmtune.stages.cpt import CptStage
from llmtune.stages.sft import SftStage
from tests.conftest import ROOT, base_recipe

FACTS = ROOT / "recipes" / "quickstart" / "facts" / "cpt.txt"
SFT = ROOT / "recipes" / "quickstart" / "sft.jsonl"


@pytest.fixture(scope="module")
def template(tokenizer) -> str:
    from llmtune.data.chat import resolve_chat_template

    t = resolve_chat_template(tokenizer, None, required=True)
    assert t is not None
    return t


def _phases(*raw: dict) -> list[SchedulePhase]:
    return [SchedulePhase.model_validate(p) for p in raw]


def test_shares_and_counts_hand_worked() -> None:
    two = _phases({"until": 0.5, "weights": {"a": 1, "b": 0}}, {"weights": {"a": 1, "b": 3}})
    assert phase_ends(two, 4) == [2, 4]
    assert step_shares(two, ["a", "b"], 4).tolist() == [[1, 0], [1, 0], [0.25, 0.75], [0.25, 0.75]]
    assert step_counts(step_shares(two, ["a", "b"], 4), 4).tolist() == [[4, 0], [4, 0], [1, 3], [1, 3]]
    # a ramp from (1, 0) to (0, 1) over the 4 steps of the second phase, reached at its last step
    ramp = _phases({"until_step": 2, "weights": {"a": 1, "b": 0}}, {"weights": {"a": 0, "b": 1}, "ramp": True})
    shares = step_shares(ramp, ["a", "b"], 6)
    assert shares.tolist() == [[1, 0], [1, 0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0, 1]]
    assert step_counts(shares, 4).tolist() == [[4, 0], [4, 0], [3, 1], [2, 2], [1, 3], [0, 4]]
    # halves of 3 rows: 1.5 each; the tie goes to the first source, the half row owed is paid the next step
    assert step_counts(np.array([[0.5, 0.5]] * 4), 3).tolist() == [[2, 1], [1, 2], [2, 1], [1, 2]]
    # a fraction that rounds to the same step as the previous phase's end leaves that phase no step
    assert phase_ends(_phases({"until": 0.1, "weights": {"a": 1}}, {"weights": {"a": 1}}), 4) == [0, 4]


def test_counts_follow_any_shares_within_a_row() -> None:
    rng = np.random.default_rng(0)
    shares = rng.dirichlet([0.5, 1, 2], size=200)
    shares[50:80, 1] = 0  # a source left out for a while
    shares /= shares.sum(1, keepdims=True)
    counts = step_counts(shares, 6)
    assert (counts.sum(1) == 6).all() and (counts >= 0).all()
    assert (counts[50:80, 1] == 0).all()
    assert np.abs(np.cumsum(counts, 0) - np.cumsum(shares * 6, 0)).max() <= 1.5


def _docs(tmp_path: Path) -> tuple[Path, Path]:
    lines = [x for x in FACTS.read_text().splitlines() if x.strip()]
    general, domain = tmp_path / "general.jsonl", tmp_path / "dom.txt"
    general.write_text("\n".join(json.dumps({"text": x}) for x in lines[:80]) + "\n")
    domain.write_text("\n".join(lines[80:120]) + "\n")
    return general, domain


SCHEDULE = [
    {"until": 0.4, "weights": {"general": 1.0, "domain": 0.0}},
    {"weights": {"general": 0.2, "domain": 0.8}},
]


def _cpt(tmp_path: Path, schedule: list = SCHEDULE, **data: object):
    general, domain = _docs(tmp_path)
    d = {"train": [{"path": str(general)}, {"path": str(domain), "id": "domain"}], "max_length": 16}
    raw = base_recipe(
        tmp_path,
        stage="cpt",
        finetuning={"method": "full"},
        data={**d, "schedule": schedule, **data},
        train={"max_steps": 50, "micro_batch_size": 2, "grad_accum": 2},
    )
    return validate_recipe(raw)


def _source(recipe, tokenizer, template=None, world: int = 1, rank: int = 0) -> ScheduledBatches:
    stage = CptStage() if recipe.stage == "cpt" else SftStage()
    data = stage.build_data(recipe, tokenizer, template)
    dist = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    batches = stage.batch_source(data, recipe, dist, collate=lambda rows: rows)
    assert isinstance(batches, ScheduledBatches)
    return batches


def _windows(batches: ScheduledBatches, steps: int, epoch: int = 0, window: int = 0) -> list:
    out: list = []
    while len(out) < steps:
        for w in batches.epoch_windows(epoch, window):
            out.append(w)
            if len(out) == steps:
                break
        epoch, window = epoch + 1, 0
    return out


@pytest.mark.parametrize("memory_map", [True, False])
def test_each_phase_draws_the_scheduled_shares(tmp_path: Path, tokenizer: object, memory_map: bool) -> None:
    recipe = _cpt(tmp_path, memory_map=memory_map)
    batches = _source(recipe, tokenizer)
    assert batches.total_steps == 50 and batches.rows_per_step == 4
    names = [n for n, _ in batches.sources]
    assert names == ["general", "domain"]
    per_phase = [Counter(), Counter()]
    for step in range(50):
        for j, _ in batches.step_rows(step):
            per_phase[0 if step < 20 else 1][names[j]] += 1
    assert per_phase[0] == {"general": 80}  # 40% of 50 steps x 4 rows, all general
    assert per_phase[1]["general"] + per_phase[1]["domain"] == 120
    assert abs(per_phase[1]["domain"] - 0.8 * 120) <= 1
    # what the loop is handed: the rows of the sources the schedule names, in that number
    rows = {n: {tuple(s.input_ids) for s in samples} for n, samples in batches.sources}
    got = Counter()
    for k, window in enumerate(_windows(batches, 50)):
        for micro in window:
            for s in micro:
                ids = tuple(s.input_ids)
                got[(k >= 20, "domain" if ids in rows["domain"] and ids not in rows["general"] else "general")] += 1
    assert got[(False, "domain")] == 0 and got[(True, "domain")] == per_phase[1]["domain"]
    assert batches.describe() == "data.schedule: steps 1-20 general 100% domain 0%; steps 21-50 general 20% domain 80%"
    assert batches.metrics() == {"data/share/general": pytest.approx(0.25), "data/share/domain": pytest.approx(0.75)}


@pytest.mark.parametrize("packing", [False, True])
def test_sft_ramp_and_every_source_cycles(tmp_path: Path, tokenizer: object, template: str, packing: bool) -> None:
    rows = SFT.read_text().splitlines()
    a, b = tmp_path / "chat.jsonl", tmp_path / "math.jsonl"
    a.write_text("\n".join(rows[:30]) + "\n")
    b.write_text("\n".join(rows[30:40]) + "\n")
    schedule = [{"until": 0.5, "weights": {"chat": 1, "math": 0}}, {"weights": {"chat": 0, "math": 1}, "ramp": True}]
    raw = base_recipe(
        tmp_path,
        data={
            "train": [{"path": str(a)}, {"path": str(b)}],
            "max_length": 128,
            "schedule": schedule,
            "packing": packing,
        },
        train={"max_steps": 40, "micro_batch_size": 2},
    )
    batches = _source(validate_recipe(raw), tokenizer, template)
    math_rows = [sum(1 for j, _ in batches.step_rows(s) if j == 1) for s in range(40)]
    assert math_rows[:20] == [0] * 20 and math_rows[-1] == 2
    assert sum(math_rows[20:30]) < sum(math_rows[30:])  # the share rises
    drawn = [i for s in range(40) for j, i in batches.step_rows(s) if j == 1]
    n = len(batches.sources[1][1])  # 10 conversations; fewer rows when packed (each source on its own)
    assert (n == 10) != packing and len(drawn) > n
    assert sorted(drawn[:n]) == list(range(n))  # a source's first pass takes each of its rows once


def test_resume_anywhere_gives_the_same_windows(tmp_path: Path, tokenizer: object) -> None:
    recipe = _cpt(tmp_path)
    straight = _windows(_source(recipe, tokenizer), 50)
    per_epoch = _source(recipe, tokenizer).windows_per_epoch
    for step in (1, 19, 20, per_epoch, 37):
        again = _source(recipe, tokenizer)  # a fresh process resuming at that step
        resumed = _windows(again, 50 - step, *divmod(step, per_epoch))
        assert [[[s.input_ids for s in m] for m in w] for w in resumed] == [
            [[s.input_ids for s in m] for m in w] for w in straight[step:]
        ]


def test_ranks_share_each_step_without_overlap(tmp_path: Path, tokenizer: object) -> None:
    recipe = _cpt(tmp_path)
    two = [_source(recipe, tokenizer, world=2, rank=r) for r in (0, 1)]
    assert two[0].rows_per_step == 8
    for step in (0, 25):
        both = [pair for src in two for micro in src.window_rows(step) for pair in micro]
        assert sorted(both) == sorted(two[0].step_rows(step)) and len(both) == 8


def test_no_schedule_keeps_the_weighted_mix(tmp_path: Path, tokenizer: object) -> None:
    recipe = _cpt(tmp_path, schedule=None)
    data = CptStage().build_data(recipe, tokenizer, None)
    assert data.sources is None
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert type(CptStage().batch_source(data, recipe, dist, collate=list)).__name__ == "Batches"


@pytest.mark.parametrize(
    ("schedule", "train", "message"),
    [
        (
            [{"until": 0.5, "weights": {"general": 1, "domian": 0}}, {"weights": {"general": 1, "domain": 1}}],
            {},
            r"unknown source 'domian'; the training sources are general, domain",
        ),
        (
            [{"until": 0.5, "weights": {"general": 1}}, {"weights": {"general": 1, "domain": 1}}],
            {},
            r"data.schedule\[0\].weights has no weight for 'domain'",
        ),
        (
            [
                {"until": 0.6, "weights": {"general": 1, "domain": 0}},
                {"until": 0.3, "weights": {"general": 1, "domain": 1}},
                {"weights": {"general": 1, "domain": 1}},
            ],
            {},
            r"must end in increasing order",
        ),
        ([{"weights": {"general": 0, "domain": 0}}], {}, r"sum to 0"),
        ([{"weights": {"general": 1, "domain": -1}}], {}, r"weights are numbers >= 0"),
        (
            [
                {"until": 0.5, "weights": {"general": 1, "domain": 0}},
                {"until_step": 90, "weights": {"general": 1, "domain": 1}},
            ],
            {},
            r"last phase: it runs to the end of training; remove its until_step",
        ),
        (
            [
                {"until": 0.5, "weights": {"general": 1, "domain": 0}},
                {"until_step": 90, "weights": {"general": 1, "domain": 1}},
                {"weights": {"general": 1, "domain": 1}},
            ],
            {},
            r"mixes until and until_step",
        ),
        (
            [{"weights": {"general": 1, "domain": 1}}, {"weights": {"general": 1, "domain": 1}}],
            {},
            r"data.schedule\[0\] has no end",
        ),
        ([{"weights": {"general": 1, "domain": 1}, "ramp": True}], {}, r"it is the first: remove ramp"),
        ([{"weights": {"general": 1, "domain": 0}}], {}, r"'domain' has weight 0 in every phase"),
        ([{"weights": {"general": 1, "domain": 1}}], {"weight": 2.0}, r"sets weight and data.schedule"),
        ([{"weights": {"general": 1, "domain": 1}}], {"id": "general"}, r"are both 'general'"),
    ],
)
def test_refusals(tmp_path: Path, schedule: list, train: dict, message: str) -> None:
    general, domain = _docs(tmp_path)
    sources = [{"path": str(general)}, {"path": str(domain), "id": "domain", **train}]
    if "id" in train:
        sources[1]["id"] = train["id"]
    raw = base_recipe(tmp_path, stage="cpt", data={"train": sources, "schedule": schedule})
    with pytest.raises(Exception, match=message):
        validate_recipe(raw)


def test_refused_for_other_stages_and_with_replay(tmp_path: Path) -> None:
    general, domain = _docs(tmp_path)
    data = {
        "train": [{"path": str(general)}, {"path": str(domain)}],
        "schedule": [{"weights": {"general": 1, "dom": 1}}],
    }
    with pytest.raises(Exception, match=r"data.schedule is supported for stages cpt and sft, not dpo"):
        validate_recipe(base_recipe(tmp_path, stage="dpo", data=data))
    with pytest.raises(Exception, match=r"data.replay and data.schedule both mix rows in"):
        validate_recipe(base_recipe(tmp_path, data={**data, "replay": {"path": str(general), "ratio": 0.1}}))


def test_the_trainer_reads_what_the_fixed_batches_offer(tmp_path: Path, tokenizer: object) -> None:
    """The trainer's start line and DeepSpeed config read these of any batch source (a schedule run once
    failed at start when the fixed batches gained one)."""
    recipe = _cpt(tmp_path)
    batches = _source(recipe, tokenizer)
    plain = _cpt(tmp_path, schedule=None)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    fixed = CptStage().batch_source(CptStage().build_data(plain, tokenizer, None), plain, dist, list)
    public = {k for k in vars(fixed) if not k.startswith("_") and k not in ("samples", "micro_per_rank")}
    assert public <= set(vars(batches)), public - set(vars(batches))
    assert (batches.accum, batches.rows_per_step, batches.step_text) == (2, 4, "")
