"""eval / merge / merge-lora given the wrong kind of input, through the real CLI: reward-model adapters
(which carry no pad_token_id in their base's config) scored in batches, causal LMs given as judges and
reward models given as policies, non-finite merge weights and tolerances, missing base paths, and
eval's data-format hints. One short LoRA sft run and one short LoRA rm run serve the whole module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_MODEL, assert_ok, assert_refused, base_recipe, run_cli, write_recipe

PAIRS = ROOT / "recipes" / "quickstart" / "pairs.jsonl"
SFT = ROOT / "recipes" / "quickstart" / "sft.jsonl"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sft: a LoRA causal-LM adapter; rm: a LoRA reward-model adapter (task_type SEQ_CLS) with merged/."""
    outs = {}
    tmp = tmp_path_factory.mktemp("sft")
    sft = base_recipe(tmp, train={"max_steps": 2, "micro_batch_size": 4, "lr": 1e-3, "log_every": 1})
    assert_ok(run_cli("train", str(write_recipe(tmp, sft))))
    outs["sft"] = Path(sft["output_dir"])
    tmp = tmp_path_factory.mktemp("rm")
    rm = base_recipe(
        tmp,
        stage="rm",
        data={"train": [{"path": str(PAIRS)}], "max_length": 128},
        train={"max_steps": 2, "micro_batch_size": 4, "lr": 1e-3, "log_every": 1},
    )
    assert_ok(run_cli("train", str(write_recipe(tmp, rm))))
    outs["rm"] = Path(rm["output_dir"])
    assert json.loads((outs["rm"] / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert (outs["rm"] / "merged" / "config.json").is_file()
    return outs


def _scores(report: Path) -> list[float]:
    """chosen, rejected, chosen, rejected, ... of every pair, in row order."""
    rows = [json.loads(line) for line in Path(json.loads(report.read_text())["generations"]).read_text().splitlines()]
    return [s for r in sorted(rows, key=lambda r: r["index"]) for s in (r["chosen_score"], r["rejected_score"])]


@pytest.mark.slow  # an rm run and several evals
def test_reward_model_adapter_and_merged_without_pad_id_score_in_batches(runs: dict[str, Path], tmp_path: Path) -> None:
    """The base config of an rm adapter has no pad_token_id: batches of more than one used to crash in
    transformers. Batched scores equal one-at-a-time scores (read at the last real token)."""
    rm = runs["rm"]
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    common = ["eval", "--data", str(PAIRS), "--task", "preference", "--max-samples", "8"]
    assert_ok(run_cli(*common, "--model", str(rm), "--batch-size", "1", "--output", str(one)))
    assert_ok(run_cli(*common, "--model", str(rm), "--batch-size", "8", "--output", str(many)))
    got = json.loads(many.read_text())
    assert got["scored_by"] == "reward_model" and got["pairs"] == 8
    assert _scores(many) == pytest.approx(_scores(one), abs=1e-4)

    # the same adapter as --model BASE --adapter RM
    both = tmp_path / "both.json"
    assert_ok(run_cli(*common, "--model", str(TINY_MODEL), "--adapter", str(rm), "--output", str(both)))
    assert _scores(both) == pytest.approx(_scores(one), abs=1e-4)

    # a merged (full) reward model whose config lost pad_token_id: the tokenizer's is used
    merged = tmp_path / "merged"
    shutil.copytree(rm / "merged", merged)
    cfg = json.loads((merged / "config.json").read_text())
    cfg.pop("pad_token_id", None)
    (merged / "config.json").write_text(json.dumps(cfg))
    full = tmp_path / "full.json"
    assert_ok(run_cli(*common, "--model", str(merged), "--batch-size", "8", "--output", str(full)))
    assert _scores(full) == pytest.approx(_scores(one), abs=1e-4)

    # as the judge of task reward, in batches
    rew = tmp_path / "reward.json"
    assert_ok(run_cli(
        "eval", "--model", str(TINY_MODEL), "--reward-model", str(rm), "--data", str(SFT), "--task", "reward",
        "--max-samples", "3", "--max-new-tokens", "3", "--output", str(rew),
    ))  # fmt: skip
    assert json.loads(rew.read_text())["examples"] == 3


def test_causal_lm_is_refused_as_a_reward_model(runs: dict[str, Path], tmp_path: Path) -> None:
    # with --batch-size 1 this used to exit 0, scoring with a randomly initialised head
    for extra in ([], ["--batch-size", "1"]):
        assert_refused(
            run_cli(
                "eval", "--model", str(TINY_MODEL), "--reward-model", str(TINY_MODEL), "--data", str(SFT),
                "--task", "reward", "--max-samples", "2", "--max-new-tokens", "2", *extra,
                "--output", str(tmp_path / "r.json"),
            ),
            "is not a reward model", "LlamaForCausalLM", "rm run",
        )  # fmt: skip
        assert not (tmp_path / "r.json").exists()
    # a causal-LM adapter as the judge of compare
    assert_refused(
        run_cli(
            "eval", "--model", str(TINY_MODEL), "--model-b", str(runs["sft"]), "--reward-model", str(runs["sft"]),
            "--data", str(SFT), "--task", "compare", "--max-samples", "2", "--max-new-tokens", "2",
        ),
        "not a reward model", "rm run",
    )  # fmt: skip


def test_reward_model_is_refused_where_a_causal_lm_is_needed(runs: dict[str, Path], tmp_path: Path) -> None:
    rm, merged = runs["rm"], runs["rm"] / "merged"
    short = ["--max-samples", "2", "--max-new-tokens", "2"]
    messages: list[str] = []
    messages.append(
        assert_refused(
            run_cli("eval", "--model", str(rm), "--data", str(SFT), "--task", "perplexity", "--max-samples", "2"),
            "reward-model adapter",
            "--task preference",
        )
    )
    messages.append(
        assert_refused(
            run_cli("eval", "--model", str(merged), "--data", str(SFT), "--task", "generate", *short),
            "is a reward model",
            "LlamaForSequenceClassification",
        )
    )
    messages.append(assert_refused(
        run_cli("eval", "--model", str(TINY_MODEL), "--adapter", str(rm), "--data", str(SFT), "--task", "generate",
                *short),
        "reward-model adapter",
    ))  # fmt: skip
    messages.append(assert_refused(
        run_cli(
            "eval", "--model", str(merged), "--model-b", str(TINY_MODEL), "--reward-model", str(rm),
            "--data", str(SFT), "--task", "compare", *short,
        ),
        "--model", "is a reward model", "--reward-model",
    ))  # fmt: skip
    messages.append(assert_refused(
        run_cli(
            "eval", "--model", str(TINY_MODEL), "--model-b", str(rm), "--reward-model", str(rm),
            "--data", str(SFT), "--task", "compare", *short,
        ),
        "--model-b", "reward-model adapter",
    ))  # fmt: skip
    # preference: a policy's reference must be a causal LM (a reward model as --model is scored directly)
    messages.append(assert_refused(
        run_cli(
            "eval", "--model", str(runs["sft"]), "--reference", str(merged), "--data", str(PAIRS),
            "--task", "preference", "--max-samples", "2",
        ),
        "--reference", "is a reward model",
    ))  # fmt: skip
    assert len(messages) == 6 and all("not a language-model head" in m for m in messages), messages


def test_merge_refuses_non_finite_weights(runs: dict[str, Path], tmp_path: Path) -> None:
    a = str(runs["sft"])
    out = tmp_path / "soup"
    for w in ("nan", "-inf"):  # inf, negative and all-zero weights: tests/unit/test_merge.py
        assert_refused(
            run_cli("merge", "--model", a, "--model", a, "--weight", w, "--weight", "1", "--out", str(out)),
            "not a finite number",
        )
    assert not out.exists()


def test_merge_lora_refuses_a_bad_tolerance_before_merging(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    for tol in ("-1", "nan"):  # inf and 0: tests/unit/test_merge.py
        assert_refused(
            run_cli("merge-lora", "--adapter", str(runs["sft"]), "--out", str(out), "--tolerance", tol),
            "--tolerance",
            "finite number above 0",
        )
    assert not out.exists()


def test_missing_base_paths_are_named_as_such(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    proc = run_cli("merge-lora", "--adapter", str(runs["sft"]), "--out", str(out), "--base", "/does/not/exist")
    assert_refused(proc, "/does/not/exist", "does not exist")
    assert "repo" not in proc.stderr.lower()

    # an adapter that recorded its base relative to where training ran, used from elsewhere
    adapter = tmp_path / "adapter"
    shutil.copytree(runs["sft"], adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "recipes/quickstart/model"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("merge-lora", "--adapter", str(adapter), "--out", str(out), cwd=elsewhere)
    assert_refused(proc, "recipes/quickstart/model", "does not exist", "relative", "--base")
    assert "repo" not in proc.stderr.lower() and not out.exists()
    proc = run_cli(
        "eval", "--model", str(adapter), "--data", str(SFT), "--task", "perplexity", "--max-samples", "2", cwd=elsewhere
    )
    assert_refused(proc, "recipes/quickstart/model", "does not exist", "relative", "--adapter")
    assert "repo" not in proc.stderr.lower()
    # --base is the fix
    proc = run_cli("merge-lora", "--adapter", str(adapter), "--out", str(out), "--base", str(TINY_MODEL), cwd=elsewhere)
    assert_ok(proc)


def test_eval_format_hint_names_the_option(tmp_path: Path) -> None:
    data = tmp_path / "odd.jsonl"
    data.write_text(json.dumps({"foo": "bar"}) + "\n")
    proc = run_cli("eval", "--model", str(TINY_MODEL), "--data", str(data), "--task", "perplexity")
    assert_refused(proc, "cannot detect the data format", "--format")
    assert "on the source" not in proc.stderr and "columns:" not in proc.stderr


def test_a_code_rule_runs_only_with_trust_reward_code(tmp_path: Path) -> None:
    """A module:function rule imports user code: without --trust-reward-code it is refused and never imported."""
    import os

    (tmp_path / "myrule.py").write_text(
        "from pathlib import Path\n"
        "Path(__file__).with_name('imported').write_text('yes')\n"
        "def score(completion, answer):\n    return float(len(completion))\n"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say a word."}\n{"prompt": "Say another."}\n')
    args = ["eval", "--model", str(TINY_MODEL), "--data", str(prompts), "--task", "reward", "--rule", "myrule:score"]
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def cli(*extra: str):
        return run_cli(*args, "--max-new-tokens", "2", *extra, env=env, timeout=300)

    proc = cli()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--trust-reward-code" in proc.stderr and not (tmp_path / "imported").exists()
    proc = cli("--trust-reward-code", "--output", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "imported").exists()
    assert json.loads((tmp_path / "r.json").read_text())["rewards"]["myrule:score"]["mean"] >= 0
