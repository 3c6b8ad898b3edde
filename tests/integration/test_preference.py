"""rm and dpo end to end through the real CLI on the tiny offline model, on preference data the project never
ships: the chosen reply is always polite, the rejected one rude (varied words, so the base model has no
consistent preference to start from)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, assert_curves, base_recipe, read_metrics, run_cli, write_recipe

TOPICS = ["river", "stone", "cloud", "apple", "tiger", "lamp", "paper", "music", "winter", "bread", "glass"]
POLITE = ["please enjoy", "thank you kindly", "with pleasure", "happy to help", "you are welcome"]
RUDE = ["go away", "not my problem", "stop asking", "whatever then", "leave me alone"]


def polite_pairs(path: Path, n: int = 240, seed: int = 3) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.sample(TOPICS, 2)
            row = {
                "prompt": f"Tell me about the {a} and the {b}.",
                "chosen": f"The {a} and the {b}, {rng.choice(POLITE)}.",
                "rejected": f"The {a} and the {b}, {rng.choice(RUDE)}.",
            }
            f.write(json.dumps(row) + "\n")
    return path


def _train(tmp_path: Path, recipe: dict, nproc: int = 1) -> tuple[Path, str]:
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)), nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr
    return Path(recipe["output_dir"]), proc.stdout


def _held_out(data: Path, n: int = 40) -> list[dict]:
    return [json.loads(line) for line in data.read_text().splitlines()][-n:]


def _render(tok, row: dict, key: str) -> dict[str, torch.Tensor]:
    msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[key]}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    return tok(text, return_tensors="pt", add_special_tokens=False)


def _rm_accuracy(model, tok, rows: list[dict]) -> float:
    with torch.no_grad():
        wins = [
            model(**_render(tok, r, "chosen")).logits.item() > model(**_render(tok, r, "rejected")).logits.item()
            for r in rows
        ]
    return sum(wins) / len(wins)


def _rm_recipe(tmp_path: Path, data: Path, method: str, **extra) -> dict:
    return base_recipe(
        tmp_path,
        stage="rm",
        finetuning={"method": method, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        # the last 40 rows are held out (data.eval): the test scores them again with transformers
        data={"train": [{"path": str(data), "max_samples": 200}], "eval": [], "max_length": 64, **extra},
        train={"max_steps": 25, "micro_batch_size": 8, "lr": 2e-3 if method == "full" else 5e-3, "log_every": 1},
    )


def _eval_rows(tmp_path: Path, data: Path) -> Path:
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps(r) for r in _held_out(data)) + "\n")
    return held


def test_rm_full_separates_held_out_pairs_and_loads_with_auto_class(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = polite_pairs(tmp_path / "pairs.jsonl")
    recipe = _rm_recipe(tmp_path, data, "full")
    recipe["data"]["eval"] = [{"path": str(_eval_rows(tmp_path, data))}]
    out, _ = _train(tmp_path, recipe)
    metrics = read_metrics(out)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # a fresh head scores both alike
    final = [m for m in metrics if "eval/accuracy" in m][-1]
    assert final["eval/accuracy"] > 0.8, final
    assert final["eval/reward_chosen"] > final["eval/reward_rejected"]

    model = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    assert model.config.pad_token_id is not None
    acc = _rm_accuracy(model, AutoTokenizer.from_pretrained(out), _held_out(data))
    assert acc > 0.8, acc
    assert acc == pytest.approx(final["eval/accuracy"], abs=0.1)


def test_rm_lora_adapter_with_head_and_merged_export_load(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = polite_pairs(tmp_path / "pairs.jsonl")
    recipe = _rm_recipe(tmp_path, data, "lora", eval_split=0.1)
    out, stdout = _train(tmp_path, recipe)
    assert "merged/" in stdout
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(TINY_MODEL, num_labels=1, pad_token_id=tok.pad_token_id)
    adapter = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged", num_labels=1).eval()
    rows = _held_out(data)
    assert _rm_accuracy(adapter, tok, rows) > 0.8
    x = _render(tok, rows[0], "chosen")
    with torch.no_grad():
        torch.testing.assert_close(adapter(**x).logits, merged(**x).logits, atol=1e-4, rtol=1e-4)


def _sequence_logp(model, tok, row: dict, key: str) -> float:
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    x = _render(tok, row, key)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    ids = x["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(**x).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # the reply and its <|im_end|>, not the newline after it
    return picked[n_prompt - 1 : -1].sum().item()


def test_dpo_lora_raises_held_out_implicit_reward_accuracy(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = polite_pairs(tmp_path / "pairs.jsonl")
    recipe = base_recipe(
        tmp_path,
        stage="dpo",
        finetuning={"method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        data={
            "train": [{"path": str(data), "max_samples": 200}],
            "eval": [{"path": str(_eval_rows(tmp_path, data))}],
            "max_length": 64,
        },
        dpo={"beta": 0.1},
        train={"max_steps": 25, "micro_batch_size": 8, "lr": 5e-3, "log_every": 1},
    )
    out, _ = _train(tmp_path, recipe)
    metrics = read_metrics(out)
    # step 1: the policy is the reference (adapter B = 0), so every pair's loss is log 2
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics[0]["accuracy"] == 0.0 and metrics[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    final = [m for m in metrics if "eval/accuracy" in m][-1]
    assert final["eval/accuracy"] > 0.8, final
    assert final["eval/margin"] > 0.3
    assert_curves(out, "loss", "reward", "accuracy")

    # the same implicit rewards recomputed with transformers + peft: beta * (log pi - log ref), ref = base
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), out).eval()
    rows = _held_out(data)
    diffs = {
        k: [_sequence_logp(tuned, tok, r, k) - _sequence_logp(base, tok, r, k) for r in rows]
        for k in ("chosen", "rejected")
    }
    acc = sum(c > r for c, r in zip(diffs["chosen"], diffs["rejected"], strict=True)) / len(rows)
    assert acc == pytest.approx(final["eval/accuracy"], abs=0.05)
    reward_c = 0.1 * sum(diffs["chosen"]) / len(rows)
    assert reward_c == pytest.approx(final["eval/reward_chosen"], abs=0.02)
    # the policy moved toward the chosen (polite) style and away from the rejected one
    assert sum(diffs["chosen"]) > 0 > sum(diffs["rejected"])


def test_shared_demo_files_train(tmp_path: Path, shared_data: Path) -> None:
    """LLaMA-Factory's dpo_en / dpo_zh pairs (rm with lora, dpo in full with a per-step reference) and
    kto_en unpaired rows and dpo_en pairs (kto) load and train a few steps."""
    lf = shared_data / "llama-factory"
    runs = [
        ("rm", {"method": "lora"}, "dpo_en_demo.json", {}),
        ("dpo", {"method": "full"}, "dpo_zh_demo.json", {"dpo": {"precompute_reference": False, "sft_weight": 0.1}}),
        ("dpo", {"method": "lora"}, "kto_en_demo.json", {"dpo": {"loss": "kto"}}),
        ("dpo", {"method": "lora"}, "dpo_en_demo.json", {"dpo": {"loss": "kto"}}),  # pairs split for KTO
    ]
    for i, (stage, ft, name, extra) in enumerate(runs):
        sub = tmp_path / str(i)
        sub.mkdir()
        recipe = base_recipe(
            sub,
            stage=stage,
            finetuning=ft,
            data={"train": [{"path": str(lf / name), "max_samples": 48}], "max_length": 256},
            train={"max_steps": 3, "micro_batch_size": 4, "lr": 1e-4, "log_every": 1},
            **extra,
        )
        out, stdout = _train(sub, recipe)
        assert name in stdout
        if i == 2:  # 3 steps x 4 rows: the reference log-probs of those 12 rows only, not of all 48
            assert "reference log-probs: 12 training and 0 eval rows" in stdout, stdout
        losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
        if stage == "dpo" and ft["method"] == "full":
            # a frozen copy of the starting model is the reference: step 1 is log 2 (+ the SFT term)
            m = read_metrics(out)[0]
            assert m["margin"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "method"), [("rm", "full"), ("dpo", "lora"), ("dpo", "full")])
def test_two_process_zero3(tmp_path: Path, stage: str, method: str) -> None:
    """dpo full: the reference is a frozen copy, partitioned over the two processes like the policy, and
    (precompute_reference false) run in every step."""
    data = polite_pairs(tmp_path / "pairs.jsonl", n=64)
    extra = {"dpo": {"precompute_reference": False}} if (stage, method) == ("dpo", "full") else {}
    recipe = base_recipe(
        tmp_path,
        stage=stage,
        **extra,
        finetuning={"method": method, "lora_dropout": 0.0},
        data={"train": [{"path": str(data)}], "max_length": 64, "eval_split": 0.25},
        train={"max_steps": 3, "micro_batch_size": 4, "lr": 1e-3, "log_every": 1},
        distributed={"zero_stage": 3},
        precision="bf16",
    )
    out, stdout = _train(tmp_path, recipe, nproc=2)
    assert "x 2 proc" in stdout
    metrics = read_metrics(out)
    if stage == "dpo":
        assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=0.02)  # bf16 reference vs policy
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if method == "lora":
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), out)
        else:
            assert "(frozen, partitioned over 2 processes (ZeRO-3))" in stdout
            AutoModelForCausalLM.from_pretrained(out)
            train = [m["loss"] for m in metrics if "loss" in m]
            assert train[-1] < train[0]  # the reference in the loss is the frozen start, the policy moves
    else:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)
        assert model.score.weight.shape == (1, 64)
        assert (out / "model.safetensors").is_file()
    assert any("eval/accuracy" in m for m in metrics)


def test_raw_hh_rlhf_file_trains_rm_and_dpo(tmp_path: Path) -> None:
    """Anthropic HH-RLHF's raw shape ({chosen, rejected} dialogue strings, no prompt column, no format:) is
    parsed into turns and trains rm and dpo; its 4 unusable rows are dropped with their reasons."""
    data = Path(__file__).resolve().parents[1] / "assets" / "hh_rlhf_sample.jsonl"
    for stage in ("rm", "dpo"):
        sub = tmp_path / stage
        sub.mkdir()
        recipe = base_recipe(
            sub,
            stage=stage,
            data={"train": [{"path": str(data)}], "max_length": 256},
            train={"max_steps": 3, "micro_batch_size": 4, "lr": 1e-4, "log_every": 1},
        )
        out, stdout = _train(sub, recipe)
        assert "dropped 4 of 39 rows" in stdout, stdout
        assert "differ before their last reply" in stdout and "no prompt" in stdout
        losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
        if stage == "dpo":  # the reference is the starting model: step 1 is log 2
            assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
