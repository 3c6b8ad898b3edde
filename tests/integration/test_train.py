"""End-to-end training through the real CLI, DeepSpeed, peft and bitsandbytes on the tiny offline model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    ROOT,
    TINY_MODEL,
    as_if_killed,
    assert_curves,
    assert_ok,
    base_recipe,
    read_metrics,
    run_cli,
    write_recipe,
)

WORDS = [
    "river",
    "stone",
    "cloud",
    "apple",
    "tiger",
    "lamp",
    "green",
    "paper",
    "seven",
    "music",
    "winter",
    "bread",
    "glass",
    "orange",
]


def unseen_sft_data(path: Path, n: int = 160, seed: int = 1) -> Path:
    """Data the project never ships: echo tasks in three formats' worth of shapes (messages here)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.sample(WORDS, 2)
            row = {
                "messages": [
                    {"role": "user", "content": f"Echo twice: {a} {b}"},
                    {"role": "assistant", "content": f"{a} {b} {a} {b}"},
                ]
            }
            f.write(json.dumps(row) + "\n")
    return path


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _train(tmp_path: Path, recipe: dict, *extra: str, nproc: int = 1):
    path = write_recipe(tmp_path, recipe)
    proc = run_cli("train", str(path), *extra, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr
    return Path(recipe["output_dir"]), proc


def _losses(out: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("full", {}),
        ("lora", {}),
        ("qlora", {"gradient_checkpointing": True}),
        ("freeze", {"optimizer": "adamw_8bit"}),
    ],
)
def test_sft_methods_learn_and_outputs_load(tmp_path: Path, method: str, extra: dict) -> None:
    data = unseen_sft_data(tmp_path / "echo.jsonl")
    ft = {"method": method, "trainable_layers": 1, "trainable_modules": ["lm_head"]}
    if method in ("lora", "qlora"):
        ft["modules_to_save"] = ["lm_head"]
    recipe = base_recipe(
        tmp_path,
        finetuning=ft,
        data={"train": [{"path": str(data)}], "max_length": 64, "eval_split": 0.1},
        train={"max_steps": 40, "micro_batch_size": 8, "lr": 5e-3, "warmup_ratio": 0.1, **extra},
        precision="bf16" if method == "qlora" else "fp32",
    )
    out, proc = _train(tmp_path, recipe)
    losses = _losses(out)
    assert len(losses) == 40
    # memory said plainly: the estimate at the start, the measured peak at the end and in run.json
    assert "memory (expected, per process): weights" in proc.stdout
    assert "LM head: applied per chunk of" in proc.stdout  # the head split off, whatever the method made of it
    peak = json.loads((out / "run.json").read_text())["peak_memory"]["peak_rss_gb"]
    assert 0.05 < peak < 100 and f"peak memory: {peak:.2f} GB resident (CPU)" in proc.stdout
    assert _mean(losses[-5:]) < 0.8 * _mean(losses[:5]), losses

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    x = torch.tensor([[1, 100, 200, 300, 2]])
    if method in ("lora", "qlora"):
        from peft import PeftModel

        assert (out / "adapter_model.safetensors").is_file()
        assert not (out / "model.safetensors").exists()
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), out)
    else:
        tuned = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        diff = (tuned(x).logits.float() - base(x).logits.float()).abs().max().item()
    assert diff > 1e-3, "the exported model equals the base model"

    if method == "freeze":  # only the last decoder layer was trained
        new, old = load_file(out / "model.safetensors"), load_file(TINY_MODEL / "model.safetensors")
        assert torch.equal(new["model.layers.0.mlp.up_proj.weight"], old["model.layers.0.mlp.up_proj.weight"])
        assert not torch.equal(new["model.layers.1.mlp.up_proj.weight"], old["model.layers.1.mlp.up_proj.weight"])
        assert torch.equal(new["model.embed_tokens.weight"], old["model.embed_tokens.weight"])

    saved = (out / "recipe.yaml").read_text()
    assert "max_grad_norm" in saved  # defaults are filled in
    evals = [m for m in read_metrics(out) if "eval/loss" in m]
    assert evals and evals[-1]["step"] == 40
    assert_curves(out, "loss")


def test_sft_packing_trains(tmp_path: Path) -> None:
    data = unseen_sft_data(tmp_path / "echo.jsonl")
    recipe = base_recipe(
        tmp_path,
        finetuning={"method": "full"},
        data={"train": [{"path": str(data)}], "max_length": 128, "packing": True},
        train={"max_steps": 25, "micro_batch_size": 2, "lr": 5e-3},
    )
    out, proc = _train(tmp_path, recipe)
    assert "packing on" in proc.stdout
    losses = _losses(out)
    assert _mean(losses[-5:]) < 0.8 * _mean(losses[:5]), losses


def test_cpt_packing_on_shared_text(tmp_path: Path, shared_data: Path) -> None:
    lf = shared_data / "llama-factory"
    recipe = base_recipe(
        tmp_path,
        stage="cpt",
        finetuning={"method": "full"},
        data={
            "train": [
                {"path": str(lf / "c4_demo.jsonl"), "max_samples": 40},
                {"path": str(lf / "wiki_demo.txt"), "max_samples": 10},
            ],
            "max_length": 128,
            "packing": True,
        },
        train={"max_steps": 12, "micro_batch_size": 4, "lr": 3e-3},
    )
    out, proc = _train(tmp_path, recipe)
    assert "packing on" in proc.stdout
    losses = _losses(out)
    assert _mean(losses[-3:]) < _mean(losses[:3]), losses
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_shared_sft_datasets_load_and_train(tmp_path: Path, shared_data: Path) -> None:
    """alpaca (en, zh), sharegpt with tool turns and OpenAI messages, mixed in one run."""
    lf = shared_data / "llama-factory"
    sources = [
        {"path": str(lf / "alpaca_en_demo.json"), "max_samples": 40},
        {"path": str(lf / "alpaca_zh_demo.json"), "max_samples": 40},
        {"path": str(lf / "glaive_toolcall_en_demo.json"), "max_samples": 40},
        {"path": str(lf / "kto_en_demo.json"), "max_samples": 40, "weight": 0.5},
        {"path": str(lf / "identity.json"), "format": "alpaca"},
    ]
    recipe = base_recipe(
        tmp_path,
        data={"train": sources, "max_length": 2048},
        train={"max_steps": 3, "micro_batch_size": 4},
    )
    out, proc = _train(tmp_path, recipe)
    for s in sources:
        assert Path(s["path"]).name in proc.stdout
    # every source kept most of its rows (the summary table: source | rows | kept | ...)
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")]
        if len(cells) >= 3 and cells[0].endswith(".json") and cells[1].isdigit():
            rows, kept = int(cells[1]), int(cells[2])
            # KTO rows with label false (undesirable replies) are left out of sft, and counted
            assert kept >= (0.5 if cells[0].endswith("kto_en_demo.json") else 0.8) * rows, line
    assert "label false" in proc.stdout  # said, not silent
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_grad_accum_invariance(tmp_path: Path) -> None:
    """batch 4 x accum 1 and batch 2 x accum 2 see the same rows per step and must give the same weights."""
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=48)
    outs = []
    for mb, ga in ((4, 1), (2, 2)):
        sub = tmp_path / f"mb{mb}"
        sub.mkdir()
        recipe = base_recipe(
            sub,
            finetuning={"method": "full"},
            data={"train": [{"path": str(data)}], "max_length": 64},
            train={"max_steps": 3, "micro_batch_size": mb, "grad_accum": ga, "lr": 1e-3},
        )
        out, _ = _train(sub, recipe)
        outs.append(load_file(out / "model.safetensors"))
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], atol=2e-5, rtol=1e-4)


def test_checkpoints_and_resume_match_uninterrupted_run(tmp_path: Path) -> None:
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=64)
    common = {
        "finetuning": {"method": "full"},
        "data": {"train": [{"path": str(data)}], "max_length": 64},
    }
    straight = base_recipe(tmp_path / "a", train={"max_steps": 6, "micro_batch_size": 4}, **common)
    (tmp_path / "a").mkdir()
    out_a, _ = _train(tmp_path / "a", straight)

    (tmp_path / "b").mkdir()
    resumed = base_recipe(
        tmp_path / "b",
        train={"max_steps": 6, "micro_batch_size": 4, "save_every": 2, "keep_checkpoints": 2},
        **common,
    )
    out_b, _ = _train(tmp_path / "b", resumed)
    ckpts = sorted(p.name for p in (out_b / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000006"]  # keep-last-2
    assert all((out_b / "checkpoints" / c / "COMPLETE").is_file() for c in ckpts)
    # A finished run of the same recipe has nothing left to do.
    _, proc = _train(tmp_path / "b", resumed)
    assert "nothing to do" in proc.stdout
    # Pretend the run died after step 4 (as a SIGKILL leaves it): newest checkpoint half-written, no export.
    as_if_killed(out_b, unmark=("step-00000006",))
    out_b, proc = _train(tmp_path / "b", resumed)
    assert "removed partial checkpoints" in proc.stdout
    assert "resumed from" in proc.stdout and "step 4" in proc.stdout
    steps = [m["step"] for m in read_metrics(out_b) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps logged after the checkpoint by the dead run are not doubled
    a, b = load_file(out_a / "model.safetensors"), load_file(out_b / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("zero", "method"), [(2, "full"), (3, "full"), (3, "lora")])
def test_two_process_zero(tmp_path: Path, zero: int, method: str) -> None:
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=64)
    held_out = unseen_sft_data(tmp_path / "held_out.jsonl", n=5, seed=7)  # uneven over 2 ranks x batch 2
    recipe = base_recipe(
        tmp_path,
        finetuning={"method": method},
        data={"train": [{"path": str(data)}], "eval": [{"path": str(held_out)}], "max_length": 64},
        train={"max_steps": 4, "micro_batch_size": 4, "lr": 3e-3, "eval_every": 2, "eval_batch_size": 2},
        distributed={"zero_stage": zero},
        precision="bf16",
    )
    out, proc = _train(tmp_path, recipe, nproc=2)
    assert "x 2 proc" in proc.stdout
    evals = [m for m in read_metrics(out) if "eval/loss" in m]
    assert [m["step"] for m in evals] == [2, 4] and all(m["eval/units"] > 0 for m in evals)
    from transformers import AutoModelForCausalLM

    if method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), out)
        adapter = load_file(out / "adapter_model.safetensors")
        assert adapter and all(t.numel() > 0 for t in adapter.values())
    else:
        weights = load_file(out / "model.safetensors")
        ref = load_file(TINY_MODEL / "model.safetensors")
        assert set(weights) == set(ref)
        assert all(weights[k].shape == ref[k].shape for k in ref)  # consolidated, not partitioned shards
        model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_zero2_optimizer_offload(tmp_path: Path) -> None:
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=32)
    recipe = base_recipe(
        tmp_path,
        finetuning={"method": "full"},
        data={"train": [{"path": str(data)}], "max_length": 64},
        train={"max_steps": 3, "micro_batch_size": 4},
        distributed={"zero_stage": 2, "offload": "optimizer"},
    )
    out, _ = _train(tmp_path, recipe)
    assert (out / "model.safetensors").is_file()
    assert len(_losses(out)) == 3


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_single_process_zero_stages_bf16(tmp_path: Path, zero: int) -> None:
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=48)
    recipe = base_recipe(
        tmp_path,
        data={"train": [{"path": str(data)}], "max_length": 64, "eval_split": 0.1},
        train={"max_steps": 6, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3},
        distributed={"zero_stage": zero},
        precision="bf16",
    )
    out, proc = _train(tmp_path, recipe)
    assert f"ZeRO-{zero} bf16" in proc.stdout
    # ZeRO-3 partitions the head's weight (it exists only inside the module's own call): the logits path
    assert ("LM head: applied per chunk" in proc.stdout) == (zero < 3)
    records = read_metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in records if "loss" in r)
    assert (out / "adapter_model.safetensors").is_file()


def test_reward_model_with_lm_regulariser_through_the_cli(tmp_path: Path) -> None:
    from tests.conftest import ROOT

    recipe = base_recipe(
        tmp_path,
        stage="rm",
        finetuning={"method": "lora", "modules_to_save": []},
        data={"train": [{"path": str(ROOT / "recipes" / "quickstart" / "pairs.jsonl"), "max_samples": 64}]},
        train={"max_steps": 6, "micro_batch_size": 8},
        rm={"lm_loss_weight": 0.5, "export_merged": False},
        distributed={"zero_stage": 2},
        precision="bf16",
    )
    out, _ = _train(tmp_path, recipe)
    records = [r for r in read_metrics(out) if "loss" in r]
    assert len(records) == 6 and all(r["lm_loss"] > 0 for r in records)
    assert (out / "adapter_model.safetensors").is_file()


def test_console_holds_no_library_noise(tmp_path: Path) -> None:
    """A row longer than the tokenizer's model_max_length is cut by llmtune, not a transformers warning about
    indexing errors; DeepSpeed's accelerator warning is not shown either."""
    long_row = {"messages": [{"role": "user", "content": "word " * 3000}, {"role": "assistant", "content": "ok"}]}
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(long_row) + "\n" + (ROOT / "recipes" / "quickstart" / "sft.jsonl").read_text())
    recipe = base_recipe(tmp_path, data={"train": [{"path": str(data)}], "max_length": 128}, train={"max_steps": 1})
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)), fresh=True)  # import-time warnings too
    assert_ok(proc)
    console = proc.stdout + proc.stderr
    assert "indexing errors" not in console and "Setting accelerator" not in console
    assert "dropped" in proc.stdout  # the long row, cut to nothing to learn, is counted
