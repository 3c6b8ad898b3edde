"""benchmarks/run.py's pure parts: arguments, the token-count check, step times from metrics.jsonl, the JSON
entry and its ratios. Nothing here trains or times anything."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_is_tiny_with_every_case(bench):
    a = bench.parse_args(["--quick"])
    assert a.size == "tiny" and a.device == "cpu"
    assert (a.steps, a.warmup, a.repeats) == (6, 2, 1)
    assert [c.name for c in a.cases] == bench.CASE_NAMES
    assert {"cpt", "sft", "rm", "dpo", "grpo", "ppo"} == {c.stage for c in a.cases}


def test_args_defaults_and_overrides(bench):
    a = bench.parse_args(["--size", "vocab", "--cases", "sft_lora", "grpo_lora", "--steps", "12", "--json", "x.json"])
    assert a.size == "vocab" and a.steps == 12 and a.warmup == bench.SIZES["vocab"].warmup
    assert [c.name for c in a.cases] == ["sft_lora", "grpo_lora"] and a.json == Path("x.json")
    assert bench.parse_args(["--device", "cuda"]).size == "1b"
    assert bench.SIZES["vocab"].vocab == bench.SIZES["1b"].vocab == 128256
    one_b = bench.SIZES["1b"]
    assert (one_b.max_length, one_b.micro_batch, one_b.precision) == (1024, 8, "bf16")


@pytest.mark.parametrize(
    "argv", [["--quick", "--size", "vocab"], ["--steps", "5", "--warmup", "4"], ["--cases", "nope"]]
)
def test_bad_args_exit(bench, argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_token_check(bench):
    same = {"rows": 48, "tokens": 4608, "padded_tokens": 4608, "forwards": 6}
    bench.check_tokens("sft_lora", same, dict(same))  # padded / forwards may differ: not checked
    bench.check_tokens("dpo_lora", same, {**same, "forwards": 12, "padded_tokens": 5000})
    with pytest.raises(bench.TokenMismatch, match="tokens: llmtune 4608 vs TRL 4600"):
        bench.check_tokens("sft_lora", same, {**same, "tokens": 4600})
    with pytest.raises(bench.TokenMismatch, match="rows: llmtune 48 vs TRL 40"):
        bench.check_tokens("sft_lora", same, {**same, "rows": 40})
    with pytest.raises(bench.TokenMismatch):  # nothing trained on either side is no comparison either
        bench.check_tokens("sft_lora", {**same, "tokens": 0}, {**same, "tokens": 0})


def test_llmtune_times_from_metrics(bench):
    """log_every 1: step k's time = (units after k - units after k-1) / rate; the first record is dropped."""
    records = [
        {"step": 1, "loss": 2.0, "tokens": 100, "tokens_per_s": 10.0},  # includes set-up: dropped
        {"step": 2, "loss": 1.9, "tokens": 300, "tokens_per_s": 400.0},  # 200 / 400 = 0.5 s
        {"eval/loss": 1.0},
        {"step": 3, "loss": 1.8, "tokens": 400, "tokens_per_s": 50.0},  # 100 / 50 = 2 s
    ]
    assert bench.llmtune_times(records) == pytest.approx([0.5, 2.0])
    pairs = [
        {"step": 1, "loss": 0.7, "pairs": 8, "pairs_per_s": 8.0},
        {"step": 2, "loss": 0.6, "pairs": 16, "pairs_per_s": 4.0},
    ]
    assert bench.llmtune_times(pairs) == pytest.approx([2.0])


def _run(times, peak, tokens=800, steps=4):
    return {
        "times": times,
        "counts": {"rows": 32, "tokens": tokens, "padded_tokens": tokens},
        "peak_bytes": peak,
        "steps": steps,
    }


def test_summary_ratios_and_json_shape(bench):
    """llmtune: steps after warm-up 1 are [0.1, 0.1, 0.3] and [0.1, 0.2, 0.1]: median 0.1 s; TRL's 0.3 s.
    Tokens per step 800 / 4 = 200, so 2,000 tokens/s ours. Peaks: the larger of the repeats."""
    ours = bench.side_summary([_run([9, 0.1, 0.1, 0.3], 100 * 2**20), _run([9, 0.1, 0.2, 0.1], 120 * 2**20)], 1)
    trl = bench.side_summary([_run([9, 0.3, 0.3, 0.3], 300 * 2**20), _run([9, 0.3, 0.4, 0.2], 240 * 2**20)], 1)
    assert ours["step_s"] == pytest.approx(0.1) and ours["tokens_per_s"] == pytest.approx(2000)
    assert ours["peak_mb"] == pytest.approx(120) and len(ours["repeats"]) == 2
    case = bench.CASES[bench.CASE_NAMES.index("sft_lora")]
    r = bench.case_result(case, ours, trl, "rss")
    assert r["ratio_vs_trl"] == pytest.approx(3.0) and r["memory_ratio_vs_trl"] == pytest.approx(2.5)
    assert r["tokens_match"] is True and r["memory"] == "rss"
    json.dumps(r)  # the JSON file holds it as is
    assert "3.00x" in bench.table([r]) and "2.50x" in bench.table([r])


def test_no_trl_side_is_said_not_invented(bench):
    case = bench.CASES[bench.CASE_NAMES.index("ppo_lora")]
    assert case.trl is None and "PPO" in case.note
    ours = bench.side_summary([_run([9, 0.1, 0.1], 2**20)], 1)
    r = bench.case_result(case, ours, None, "rss")
    assert r["trl"] is None and r["ratio_vs_trl"] is None and r["memory_ratio_vs_trl"] is None
    assert r["tokens_match"] is None and "PPO" in bench.table([r])


def test_recipe_mirrors_the_settings(bench):
    s = bench.Settings(
        size="tiny", model="m", files={"sft": "s.jsonl", "pairs": "p.jsonl", "prompts": "q.jsonl", "cpt": "c.jsonl"},
        steps=6, micro_batch=8, max_length=128, max_new_tokens=16, num_generations=4, lr=1e-3, lora_r=16,
        precision="fp32",
    )  # fmt: skip
    by = {c.name: c for c in bench.CASES}
    r = bench.llmtune_recipe(by["dpo_lora_precomputed"], s, Path("out"))
    assert r["dpo"]["precompute_reference"] is True and r["data"]["eval_split"] == 0.0
    assert r["train"]["micro_batch_size"] == 8 and r["train"]["grad_accum"] == 1 and r["train"]["log_every"] == 1
    assert bench.llmtune_recipe(by["dpo_lora"], s, Path("out"))["dpo"]["precompute_reference"] is False
    assert bench.llmtune_recipe(by["cpt_full_packed"], s, Path("out"))["data"]["packing"] is True
    g = bench.llmtune_recipe(by["grpo_lora"], s, Path("out"))
    assert g["grpo"]["num_generations"] == 4 and g["grpo"]["mask_truncated_completions"] is False
