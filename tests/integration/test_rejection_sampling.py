"""stage: rejection_sampling through the real CLI on the tiny model: best-of-N, then sft on the winners.

The learnable task: "Say: WORD" -> "WORD". The start model is the tiny model sft-trained on replies that are
half "WORD" and half "WORD WORD", so that greedy decoding repeats the word for some words and sampling gets
some replies right. Rejection sampling with exact_match keeps the single-word replies of half the words; the
behaviour (stop after the word) carries over to the held-out words.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from llmtune.engine.trackers import numbers
from tests.conftest import assert_curves, assert_ok, assert_refused, base_recipe, run_cli, write_recipe

WORDS = ["river", "stone", "cloud", "apple", "tiger", "lamp", "green", "paper"]
HELD_OUT = ["seven", "music", "winter", "bread", "glass", "orange", "house", "light"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _prompts(path: Path, words: list[str]) -> Path:
    return _jsonl(path, [{"prompt": f"Say: {w}", "answer": w} for w in words])


@pytest.fixture(scope="module")
def start_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after a short sft on "WORD" / "WORD WORD" replies: right for some words, not all."""
    tmp = tmp_path_factory.mktemp("rs-start")
    rows = []
    for w in WORDS + HELD_OUT:
        for reply in (w, f"{w} {w}"):
            rows.append(
                {"messages": [{"role": "user", "content": f"Say: {w}"}, {"role": "assistant", "content": reply}]}
            )
    data = _jsonl(tmp / "pre.jsonl", rows)
    recipe = base_recipe(
        tmp,
        output_dir=str(tmp / "start"),
        finetuning={"method": "full"},
        data={"train": [{"path": str(data), "format": "messages"}], "max_length": 64},
        train={"max_steps": 80, "micro_batch_size": 8, "lr": 3e-3, "lr_scheduler": "constant", "log_every": 20},
    )
    assert_ok(run_cli("train", str(write_recipe(tmp, recipe))))
    return tmp / "start"


def rs_recipe(tmp_path: Path, model: Path, **sections) -> dict:
    prompts = _prompts(tmp_path / "prompts.jsonl", WORDS)
    recipe = base_recipe(
        tmp_path,
        stage="rejection_sampling",
        model={"path": str(model)},
        finetuning={"method": "full"},
        data={"train": [{"path": str(prompts), "format": "prompts"}], "max_length": 64},
        train={"epochs": 3, "micro_batch_size": 4, "lr": 1e-3, "lr_scheduler": "constant", "log_every": 5},
        rejection_sampling={"num_samples": 8, "rounds": 1, "reward": {"rule": "exact_match"}},
        generation={"max_new_tokens": 8, "temperature": 0.7},
    )
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and key in recipe else value
    return recipe


def greedy_exact_match(model_dir: Path, words: list[str], adapter: Path | None = None) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.generation.sample import generate

    tok = AutoTokenizer.from_pretrained(adapter or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    texts = [
        tok.apply_chat_template([{"role": "user", "content": f"Say: {w}"}], add_generation_prompt=True, tokenize=False)
        for w in words
    ]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    outs = [o for o, _ in generate(model, tok, ids, max_new_tokens=8, temperature=0.0, batch_size=len(ids))]
    return sum(tok.decode(o, skip_special_tokens=True).strip() == w for o, w in zip(outs, words, strict=True)) / len(
        words
    )


def test_one_round_learns_writes_its_files_and_the_output_loads(tmp_path: Path, start_model: Path) -> None:
    recipe = rs_recipe(tmp_path, start_model, rejection_sampling={"selection": "best_and_worst"})
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert_ok(proc)
    out = Path(recipe["output_dir"])
    r1 = out / "round-1"

    # samples: num_samples completions per prompt, each with its rewards
    samples = _read(r1 / "samples.jsonl")
    assert len(samples) == 8 * len(WORDS)
    for w in WORDS:
        mine = [s for s in samples if s["answer"] == w]
        assert len(mine) == 8 and all(s["prompt"] == [{"role": "user", "content": f"Say: {w}"}] for s in mine)
    assert all(set(s["rewards"]) == {"rule/exact_match"} and isinstance(s["ended"], bool) for s in samples)
    right = {s["answer"] for s in samples if s["total"] == 1.0}
    wrong = {s["answer"] for s in samples if s["total"] == 0.0}
    assert right, "the start model should get some replies right"

    # selected: the right reply of every prompt that had a right and a wrong one (the default threshold of
    # exact_match is 1.0, and a group whose samples all score alike teaches nothing), read by the round's sft run
    selected = _read(r1 / "selected.jsonl")
    kept = right & wrong
    assert {row["messages"][0]["content"].removeprefix("Say: ") for row in selected} == kept
    for row in selected:
        user, reply = row["messages"]
        assert reply == {"role": "assistant", "content": user["content"].removeprefix("Say: ")}
    sft_run = json.loads((r1 / "model" / "run.json").read_text())
    assert sft_run["status"] == "finished" and sft_run["stage"] == "sft"

    # pairs: best vs worst where they differ, in the shape dpo reads
    from llmtune.data.preference import to_preference

    pairs = _read(r1 / "pairs.jsonl")
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    assert [p["prompt"] for p in pairs] == [row["messages"][:1] for row in selected]  # the same filter
    for p in pairs:
        row = to_preference(p, "pairs")
        assert row.responses == [p["chosen"], p["rejected"]]

    # rounds.jsonl: the round's statistics
    (stats,) = _read(out / "rounds.jsonl")
    assert stats["round"] == 1 and stats["prompts"] == len(WORDS) and stats["samples"] == 8 * len(WORDS)
    assert stats["kept_fraction"] == len(selected) / len(WORDS)
    assert stats["no_spread"] == len(WORDS) - len(right & wrong) and stats["threshold"] == 1.0
    assert stats["kept"] + stats["no_spread"] + stats["under_threshold"] + stats["empty"] == len(WORDS)
    assert stats["exact_match"] == pytest.approx(sum(s["total"] for s in samples) / len(samples))
    assert stats["mean_best_reward"] == len(right) / len(WORDS)
    assert 0 <= stats["ended_fraction"] <= 1 and stats["mean_completion_tokens"] > 0
    assert "round 1: 8 prompts, 64 samples" in proc.stdout

    # the final model is in output_dir, finished, loadable as an sft output; it learned (held-out words too)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "finished" and manifest["stage"] == "rejection_sampling"
    assert (out / "recipe.yaml").is_file() and (out / "model.safetensors").is_file()
    card = (out / "README.md").read_text()  # the model card of the whole run, not of round 1's sft
    assert "| stage | rejection_sampling |" in card and "Rejection sampling: 1 round(s)" in card
    assert_curves(out, "loss", "reward per round (sampling)")  # drawn from output_dir's metrics, not copied
    assert_curves(r1 / "model", "loss")
    before = greedy_exact_match(start_model, HELD_OUT)
    after = greedy_exact_match(out, HELD_OUT)
    assert after > before, (before, after)
    assert greedy_exact_match(out, WORDS) > greedy_exact_match(start_model, WORDS)

    # a later stage accepts it as model.path (finished run, same tokenizer)
    from llmtune.commands.preflight import check_paths
    from llmtune.recipe import load_recipe

    dpo = base_recipe(
        tmp_path,
        stage="dpo",
        output_dir=str(tmp_path / "dpo"),
        model={"path": str(out)},
        data={"train": [{"path": str(r1 / "pairs.jsonl"), "format": "pairs"}], "max_length": 64},
    )
    check_paths(load_recipe(write_recipe(tmp_path, dpo, "dpo.yaml")))

    # a rerun of the finished run does nothing
    again = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert_ok(again)
    assert "nothing to do" in again.stdout


def test_two_lora_rounds_resume_after_an_interruption(tmp_path: Path, start_model: Path) -> None:
    recipe = rs_recipe(
        tmp_path,
        start_model,
        finetuning={"method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        train={"lr": 5e-3, "epochs": 2, "save_every": 2, "keep_checkpoints": 2},
        rejection_sampling={"rounds": 2, "max_prompts": 6},
    )
    trackers = [name for name in ("tensorboard", "mlflow") if importlib.util.find_spec(name)]  # llmtune[trackers]
    recipe["train"]["report_to"] = trackers
    path = write_recipe(tmp_path, recipe)
    assert_ok(run_cli("train", str(path), env={"MLFLOW_TRACKING_URI": ""}))
    out = Path(recipe["output_dir"])
    r1, r2 = out / "round-1", out / "round-2"
    ids = json.loads((out / "trackers.json").read_text())
    assert (r1 / "merged" / "config.json").is_file()  # round 2 started from the merged round-1 model
    assert "round-1/merged" in (r2 / "model" / "recipe.yaml").read_text()
    assert len(_read(out / "rounds.jsonl")) == 2
    assert [s["prompts"] for s in _read(out / "rounds.jsonl")] == [6, 6]
    assert all(s["round"] in (1, 2) for s in _read(out / "metrics.jsonl"))

    # the output is an adapter on the round-2 base, loadable with peft
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).resolve() == (r1 / "merged").resolve()
    greedy_exact_match(r1 / "merged", WORDS[:2], adapter=out)

    # as if killed during round 2's training: its model and the final export missing, run.json running
    for f in ("adapter_model.safetensors",):
        (out / f).unlink()
        (r2 / "model" / f).unlink()
    for d in (out, r2 / "model"):
        manifest = json.loads((d / "run.json").read_text())
        (d / "run.json").write_text(json.dumps({**manifest, "status": "running"}))
    r1_samples = os.stat(r1 / "samples.jsonl").st_mtime_ns
    r1_model = os.stat(r1 / "model" / "adapter_model.safetensors").st_mtime_ns
    r2_samples = os.stat(r2 / "samples.jsonl").st_mtime_ns

    proc = run_cli("train", str(path), env={"MLFLOW_TRACKING_URI": ""})
    assert_ok(proc)
    assert "round 1/2: finished earlier, skipped" in proc.stdout
    assert "round 2: generation was complete" in proc.stdout
    assert "resumed from" in proc.stdout  # round 2's sft run continued from its checkpoint
    assert os.stat(r1 / "samples.jsonl").st_mtime_ns == r1_samples
    assert os.stat(r1 / "model" / "adapter_model.safetensors").st_mtime_ns == r1_model
    assert os.stat(r2 / "samples.jsonl").st_mtime_ns == r2_samples
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert len(_read(out / "rounds.jsonl")) == 2

    # one tracker run for both rounds, continued after the interruption: round 2's steps follow round 1's, the
    # rows are metrics.jsonl's (with their round) and each round's statistics at the step its training starts
    assert json.loads((out / "trackers.json").read_text()) == ids
    offsets = {1: 0, 2: json.loads((r1 / "model" / "run.json").read_text())["total_steps"]}
    want: dict[str, dict[int, float]] = {}
    for row in _read(out / "metrics.jsonl"):
        for k, v in numbers(row).items():
            want.setdefault(k, {})[row["step"] + offsets[row["round"]]] = v
    for stats in _read(out / "rounds.jsonl"):
        for k, v in numbers(stats).items():
            want.setdefault(f"rounds/{k}", {})[offsets[stats["round"]]] = v
    if "tensorboard" in trackers:
        from tests.integration.test_trackers import assert_same, tensorboard_scalars

        assert_same(tensorboard_scalars(out / "tensorboard"), want, "tensorboard")
    if "mlflow" in trackers:
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=ids["mlflow_uri"])
        run = client.get_run(ids["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        history = {k: client.get_metric_history(run.info.run_id, k) for k in run.data.metrics}
        got = {k: {m.step: m.value for m in sorted(ms, key=lambda m: m.timestamp)} for k, ms in history.items()}
        assert_same(got, want, "mlflow")  # (the steps logged again after the resume: their last values)


def test_iterative_dpo_two_lora_rounds_train_dpo_on_each_rounds_pairs_and_learn(
    tmp_path: Path, start_model: Path
) -> None:
    """train_with: dpo: each round trains dpo on its own best / worst pairs, round 2 sampling from round 1's
    merged model (its reference); the behaviour carries over to held-out words."""
    recipe = rs_recipe(
        tmp_path,
        start_model,
        finetuning={"method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        train={"lr": 5e-3, "epochs": 3},
        rejection_sampling={"rounds": 2, "train_with": "dpo"},
        dpo={"beta": 0.1},
    )
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert_ok(proc)
    out = Path(recipe["output_dir"])
    for k in (1, 2):
        rk = out / f"round-{k}"
        run = json.loads((rk / "model" / "run.json").read_text())
        assert run["status"] == "finished" and run["stage"] == "dpo"
        pairs = _read(rk / "pairs.jsonl")
        assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
        # the dpo run read exactly this round's pairs
        assert str(rk / "pairs.jsonl") in (rk / "model" / "recipe.yaml").read_text()
        assert any("margin" in row and "accuracy" in row for row in _read(rk / "model" / "metrics.jsonl"))
    assert "round-1/merged" in (out / "round-2" / "model" / "recipe.yaml").read_text()
    assert [s["pairs"] for s in _read(out / "rounds.jsonl")] == [s["kept"] for s in _read(out / "rounds.jsonl")]
    assert "iterative dpo" in (out / "README.md").read_text()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).resolve() == (out / "round-1" / "merged").resolve()
    before = greedy_exact_match(start_model, HELD_OUT)
    after = greedy_exact_match(out / "round-1" / "merged", HELD_OUT, adapter=out)
    assert after > before, (before, after)


def test_bad_input_is_refused_before_any_model_loads(tmp_path: Path, start_model: Path) -> None:
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "no prompt here"}, {"prompt": ""}])
    recipe = rs_recipe(tmp_path, start_model)
    recipe["data"]["train"] = [{"path": str(bad)}]
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert_refused(proc, "no usable example", "bad.jsonl")
    assert "round 1" not in proc.stdout

    recipe = rs_recipe(tmp_path, start_model, output_dir=str(tmp_path / "out2"))
    recipe["rejection_sampling"]["reward"] = {"rule": "exact_matsh"}
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert_refused(proc, "exact_matsh")
    assert "round 1" not in proc.stdout

    no_answer = _jsonl(tmp_path / "noanswer.jsonl", [{"prompt": "Say: river"}])
    recipe = rs_recipe(tmp_path, start_model, output_dir=str(tmp_path / "out3"))
    recipe["data"]["train"] = [{"path": str(no_answer)}]
    assert_refused(run_cli("train", str(write_recipe(tmp_path, recipe))), "answer")


def test_a_threshold_nothing_clears_is_a_data_error(tmp_path: Path, start_model: Path) -> None:
    recipe = rs_recipe(tmp_path, start_model, rejection_sampling={"threshold": 2.0, "num_samples": 2})
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert_refused(proc, "threshold 2.0", "lower rejection_sampling.threshold")
    assert not (Path(recipe["output_dir"]) / "round-1" / "generated.json").exists()


def test_a_round_that_keeps_nothing_stops_with_exit_2_instead_of_fine_tuning_on_failures(tmp_path: Path) -> None:
    """The untrained tiny model never says the word: with the defaults (exact_match, threshold null = 1.0)
    every group has no reward spread, so the round keeps nothing and the run stops (exit 2, what to change)
    rather than fine-tuning on wrong answers. The round's samples and statistics stay for inspection."""
    from tests.conftest import TINY_MODEL

    recipe = rs_recipe(
        tmp_path,
        TINY_MODEL,
        rejection_sampling={"num_samples": 2, "reward": {"rule": "exact_match"}},
        generation={"max_new_tokens": 3, "temperature": 1.0},
    )
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    err = assert_refused(proc, "no prompt kept", "no reward spread", "raise rejection_sampling.num_samples")
    assert "easier prompts" in err and "lower rejection_sampling.threshold" in err
    r1 = Path(recipe["output_dir"]) / "round-1"
    stats = json.loads((r1 / "stats.json").read_text())
    assert (stats["kept"], stats["no_spread"], stats["threshold"]) == (0, len(WORDS), 1.0)
    assert "no spread 8" in proc.stdout
    # never silent: what it samples, in batches sized for generation (not the micro-batch of 4), with progress
    assert "round 1: sampling 8 prompts x 2 = 16 completions, 32 per generate call" in proc.stdout
    assert "round 1: sampled: 16/16 completions (100%)" in proc.stdout
    assert not (r1 / "generated.json").exists() and not (r1 / "model").exists()  # nothing fine-tuned


@pytest.mark.slow
def test_two_processes_write_one_set_of_files(tmp_path: Path, start_model: Path) -> None:
    """Under torchrun each process samples and scores its share of the prompts; rank 0 writes every
    prompt's samples once, and the round's sft run trains on both processes."""
    recipe = rs_recipe(tmp_path, start_model, distributed={"zero_stage": 2}, precision="bf16")
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)), nproc=2)
    assert_ok(proc)
    out = Path(recipe["output_dir"])
    samples = _read(out / "round-1" / "samples.jsonl")
    assert sorted({s["answer"] for s in samples}) == sorted(WORDS)
    assert all(sum(s["answer"] == w for s in samples) == 8 for w in WORDS)  # 8 per prompt, none twice
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert "x 2 proc" in proc.stdout


def test_sigkill_in_a_rounds_fine_tune_then_the_same_command_finishes(tmp_path: Path, start_model: Path) -> None:
    """A real SIGKILL while round 1's sft run trains (after a checkpoint): the same command keeps round 1's
    generation, resumes its fine-tune from the checkpoint, and ends with the weights of an uninterrupted
    run."""
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    from tests.conftest import start_cli

    train = {"epochs": 12, "save_every": 2, "keep_checkpoints": 2}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = rs_recipe(tmp_path / "a", start_model, train=train)
    assert_ok(run_cli("train", str(write_recipe(tmp_path / "a", straight))))
    recipe = rs_recipe(tmp_path / "b", start_model, train=train)
    path = write_recipe(tmp_path / "b", recipe)
    out = Path(recipe["output_dir"])
    ckpts = out / "round-1" / "model" / "checkpoints"
    proc = start_cli("train", str(path), output=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any((p / "COMPLETE").exists() for p in ckpts.glob("step-*")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "round-1" / "generated.json").is_file() and not (out / "model.safetensors").exists()
    generated = (out / "round-1" / "samples.jsonl").stat().st_mtime

    again = run_cli("train", str(path))
    assert_ok(again)
    assert "generation was complete" in again.stdout and "resumed from" in again.stdout
    assert (out / "round-1" / "samples.jsonl").stat().st_mtime == generated  # not sampled again
    a = load_file(Path(straight["output_dir"]) / "model.safetensors")
    b = load_file(out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
