"""Never lose a run: NaN stops, output-dir rules, secrets, exact resume (also after SIGKILL)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    ROOT,
    TINY_MODEL,
    as_if_killed,
    base_recipe,
    read_metrics,
    run_cli,
    start_cli,
    write_recipe,
)
from tests.integration.test_train import unseen_sft_data


def test_nan_loss_stops_with_step_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=64)
    recipe = base_recipe(
        tmp_path,
        finetuning={"method": "full"},
        data={"train": [{"path": str(data)}], "max_length": 64},
        # an absurd learning rate without clipping: the weights overflow after the first update
        train={"max_steps": 10, "lr": 1e30, "max_grad_norm": 0, "save_every": 1, "keep_checkpoints": 3},
    )
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "is nan at step 2" in proc.stderr and "fix:" in proc.stderr
    out = Path(recipe["output_dir"])
    ckpt = out / "checkpoints" / "step-00000001"
    assert (ckpt / "COMPLETE").is_file()
    assert not (out / "model.safetensors").exists()  # no export of broken weights
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_best_checkpoint_is_kept_and_a_misspelled_metric_fails_before_training(tmp_path: Path) -> None:
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=64)
    train = {"max_steps": 12, "lr": 3e-3, "eval_every": 2, "save_every": 2, "keep_checkpoints": 1}
    # best_mode max on eval/loss: the worst checkpoint by loss, an early one, is the "best" that must survive
    recipe = base_recipe(
        tmp_path,
        data={"train": [{"path": str(data)}], "max_length": 64, "eval_split": 0.25},
        train={**train, "best_metric": "eval/loss", "best_mode": "max"},
    )
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(recipe["output_dir"])
    evals = {r["step"]: r["eval/loss"] for r in read_metrics(out) if "eval/loss" in r and r["step"] < 12}
    best = max(evals, key=lambda s: evals[s])
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == sorted({f"step-{best:08d}", "step-00000012"}), (kept, evals)

    recipe = base_recipe(
        tmp_path,
        output_dir=str(tmp_path / "typo"),
        data={"train": [{"path": str(data)}], "max_length": 64, "eval_split": 0.25},
        train={**train, "best_metric": "eval/los"},
    )
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.best_metric eval/los is not a metric" in proc.stderr and "eval/loss" in proc.stderr
    assert not (tmp_path / "typo" / "checkpoints").exists() or not any((tmp_path / "typo" / "checkpoints").iterdir())


def test_foreign_output_dir_is_refused_unless_overwrite(tmp_path: Path) -> None:
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=32)
    recipe = base_recipe(tmp_path, data={"train": [{"path": str(data)}], "max_length": 64}, train={"max_steps": 2})
    out = Path(recipe["output_dir"])
    out.mkdir()
    (out / "notes.txt").write_text("my own file")
    path = write_recipe(tmp_path, recipe)
    proc = run_cli("train", str(path))
    assert proc.returncode == 2
    assert "is not empty" in proc.stderr and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", str(path), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "notes.txt").read_text() == "my own file"  # --overwrite never deletes the user's files
    assert (out / "adapter_model.safetensors").is_file()
    # the same recipe again: a finished run, nothing to do; a changed recipe: refused
    proc = run_cli("train", str(path))
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    proc = run_cli("train", str(path), "--set", "train.lr=0.5")
    assert proc.returncode == 2 and "different recipe" in proc.stderr


def test_secrets_never_reach_outputs(tmp_path: Path) -> None:
    secret_env, secret_recipe = "hf_ENVSECRET1234567890", "hf_RECIPESECRET0987654321"
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=32)
    recipe = base_recipe(
        tmp_path,
        model={"hub_token": secret_recipe},
        data={"train": [{"path": str(data)}], "max_length": 64, "eval_split": 0.2},
        train={"max_steps": 3, "save_every": 2},
    )
    path = write_recipe(tmp_path, recipe)
    proc = run_cli("train", str(path), env={"HF_TOKEN": secret_env, "WANDB_API_KEY": secret_env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in (proc.stdout, proc.stderr):
        assert secret_env not in text and secret_recipe not in text
    files = [p for p in Path(recipe["output_dir"]).rglob("*") if p.is_file()]
    assert len(files) > 8
    for f in files:
        blob = f.read_bytes()
        assert secret_env.encode() not in blob and secret_recipe.encode() not in blob, f


def _resume_recipe(tmp_path: Path, data: Path, stage: str = "sft", **train: object) -> dict:
    return base_recipe(
        tmp_path,
        stage=stage,
        finetuning={"method": "lora", "lora_dropout": 0.2, "lora_r": 8, "modules_to_save": []},
        data={"train": [{"path": str(data)}], "max_length": 64, "shuffle": True},
        train={"micro_batch_size": 4, "lr": 2e-3, "log_every": 1, **train},
    )


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("stage", "method"),
    [
        ("sft", "lora"),
        pytest.param("dpo", "lora", marks=pytest.mark.slow),
        pytest.param("sft", "qlora", marks=pytest.mark.slow),
    ],
)
def test_resume_is_exact_with_dropout_and_shuffling_across_an_epoch_boundary(
    tmp_path: Path, stage: str, method: str
) -> None:
    if stage == "sft":
        data = unseen_sft_data(tmp_path / "echo.jsonl", n=32)  # 8 steps per epoch
    else:  # 32 preference pairs; the reference log-probs are computed again on resume
        lines = (ROOT / "recipes" / "quickstart" / "pairs.jsonl").read_text().splitlines()[:32]
        data = tmp_path / "pairs.jsonl"
        data.write_text("\n".join(lines) + "\n")
    (tmp_path / "a").mkdir()
    straight = _resume_recipe(tmp_path / "a", data, stage, max_steps=12)
    straight["finetuning"]["method"] = method
    assert run_cli("train", str(write_recipe(tmp_path / "a", straight))).returncode == 0

    (tmp_path / "b").mkdir()
    resumed = _resume_recipe(tmp_path / "b", data, stage, max_steps=12, save_every=5, keep_checkpoints=3)
    resumed["finetuning"]["method"] = method
    path = write_recipe(tmp_path / "b", resumed)
    assert run_cli("train", str(path)).returncode == 0
    out = Path(resumed["output_dir"])
    # as if killed while writing the step-10 checkpoint: it never completed; the final step-12 checkpoint,
    # the export and the finished status never happened
    as_if_killed(out, drop=("step-00000012",), unmark=("step-00000010",))
    proc = run_cli("train", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "(step 5)" in proc.stdout
    a, b = _adapter(Path(straight["output_dir"])), _adapter(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-7, rtol=1e-6)
    la = [m["loss"] for m in read_metrics(Path(straight["output_dir"])) if "loss" in m]
    lb = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert la == pytest.approx(lb, rel=1e-6)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=96)
    (tmp_path / "a").mkdir()
    straight = _resume_recipe(tmp_path / "a", data, max_steps=70)
    assert run_cli("train", str(write_recipe(tmp_path / "a", straight))).returncode == 0

    (tmp_path / "b").mkdir()
    recipe = _resume_recipe(tmp_path / "b", data, max_steps=70, save_every=7, keep_checkpoints=2)
    path = write_recipe(tmp_path / "b", recipe)
    out = Path(recipe["output_dir"])
    proc = start_cli("train", str(path), output=subprocess.DEVNULL)
    target = random.Random(os.getpid()).choice([14, 21, 28, 35])
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists()] if out.exists() else []
        if any(int(p.name.split("-")[1]) >= target for p in done):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(random.Random(target).uniform(0, 0.3))  # somewhere in the following steps or a checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists()

    again = run_cli("train", str(path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    a, b = _adapter(Path(straight["output_dir"])), _adapter(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    """Killed while a checkpoint is half written (its directory there, its COMPLETE marker not yet): the
    restart ignores and removes that partial checkpoint, resumes from the one before and ends where an
    uninterrupted run ends."""
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=64)
    full = {"method": "full"}
    (tmp_path / "a").mkdir()
    straight = _resume_recipe(tmp_path / "a", data, max_steps=40)
    straight["finetuning"] = full
    assert run_cli("train", str(write_recipe(tmp_path / "a", straight))).returncode == 0

    (tmp_path / "b").mkdir()
    recipe = _resume_recipe(tmp_path / "b", data, max_steps=40, save_every=1, keep_checkpoints=2)
    recipe["finetuning"] = full
    path = write_recipe(tmp_path / "b", recipe)
    out = Path(recipe["output_dir"])
    ckpts = out / "checkpoints"
    proc = start_cli("train", str(path), output=subprocess.DEVNULL)
    partial = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and partial is None:
        for p in ckpts.glob("step-*") if ckpts.is_dir() else []:
            if int(p.name.split("-")[1]) >= 5 and not (p / "COMPLETE").exists():
                partial = p
                proc.send_signal(signal.SIGKILL)
                break
    assert partial is not None, "no checkpoint write was caught in progress"
    proc.wait()
    if (partial / "COMPLETE").exists():  # the write finished in the moment between the look and the kill
        pytest.skip("the checkpoint write finished before the kill landed")
    assert not (out / "model.safetensors").exists()

    again = run_cli("train", str(path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"removed partial checkpoints (a write was interrupted): {partial.name}" in again.stdout
    assert "resumed from" in again.stdout and partial.name not in again.stdout.split("resumed from")[1].split("\n")[0]
    a, b = load_file(Path(straight["output_dir"]) / "model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file():
            steps = [r.get("step", 0) for r in read_metrics_lenient(out)]
            if steps and max(steps) >= step:
                return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step} (exit {proc.poll()})")


def read_metrics_lenient(out: Path) -> list[dict]:
    records = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return records


def test_sigterm_and_ctrl_c_write_a_checkpoint_and_the_resumed_run_ends_as_an_uninterrupted_one(
    tmp_path: Path,
) -> None:
    """A scheduler's SIGTERM (or Ctrl-C) on one process drops the step in progress at its next micro-batch
    (8 a step here), writes a checkpoint of the last finished step even without save_every, and exits 143
    (130) with a message; the same command then resumes, and the final weights are unchanged (the dropped
    step's dropout draws are not in the checkpoint's random state)."""
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=64)
    (tmp_path / "a").mkdir()
    straight = _resume_recipe(tmp_path / "a", data, max_steps=30, micro_batch_size=1, grad_accum=8)
    assert run_cli("train", str(write_recipe(tmp_path / "a", straight))).returncode == 0

    (tmp_path / "b").mkdir()
    recipe = _resume_recipe(tmp_path / "b", data, max_steps=30, micro_batch_size=1, grad_accum=8)  # no save_every
    path = write_recipe(tmp_path / "b", recipe)
    out = Path(recipe["output_dir"])
    for sig, code, at in ((signal.SIGTERM, 143, 5), (signal.SIGINT, 130, 15)):
        proc = start_cli("train", str(path))
        _wait_for_step(proc, out, at)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == code, stdout[-2000:] + stderr[-3000:]
        assert "Traceback" not in stderr
        assert f"stopped: by {sig.name} after step" in stderr and "run the same command again" in stderr
        step = int(stderr.split("after step ")[1].split(";")[0])
        assert step >= at
        assert (out / "checkpoints" / f"step-{step:08d}" / "COMPLETE").is_file()
        assert json.loads((out / "run.json").read_text())["status"] == "stopped"
        assert not (out / "adapter_model.safetensors").exists()

    again = run_cli("train", str(path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {step})" in again.stdout
    a, b = _adapter(Path(straight["output_dir"])), _adapter(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_processes_after_the_same_step_with_one_checkpoint(tmp_path: Path) -> None:
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=64)
    zero = {"zero_stage": 2}
    (tmp_path / "a").mkdir()
    straight = _resume_recipe(tmp_path / "a", data, max_steps=16)
    straight["distributed"] = zero
    assert run_cli("train", str(write_recipe(tmp_path / "a", straight)), nproc=2).returncode == 0

    (tmp_path / "b").mkdir()
    recipe = _resume_recipe(tmp_path / "b", data, max_steps=16)
    recipe["distributed"] = zero
    path = write_recipe(tmp_path / "b", recipe)
    out = Path(recipe["output_dir"])
    proc = start_cli("train", str(path), nproc=2)
    _wait_for_step(proc, out, 4)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert stderr.count("stopped: by SIGTERM after step") == 2, stderr[-3000:]
    steps = {int(part.split(";")[0]) for part in stderr.split("after step ")[1:]}
    assert len(steps) == 1  # both processes stopped after the same step
    ckpt = out / "checkpoints" / f"step-{steps.pop():08d}"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "rng_state_1.json").is_file()

    again = run_cli("train", str(path), nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpt}" in again.stdout
    a, b = _adapter(Path(straight["output_dir"])), _adapter(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_tokenizer_problems_fail_before_training(tmp_path: Path, tiny_model: Path) -> None:
    import shutil

    from transformers import AutoTokenizer

    data = unseen_sft_data(tmp_path / "echo.jsonl", n=16)
    # a model directory whose tokenizer has no chat template, used by sft
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    (bare / "chat_template.jinja").unlink()
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    recipe = base_recipe(tmp_path, model={"path": str(bare)}, data={"train": [{"path": str(data)}]})
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)))
    assert proc.returncode == 2 and "no chat template" in proc.stderr and "model.chat_template" in proc.stderr
    assert "Traceback" not in proc.stderr and not (Path(recipe["output_dir"]) / "metrics.jsonl").exists()
    # the same with a built-in template named: trains (the failed attempt left nothing that needs --overwrite)
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)), "--set", "model.chat_template=chatml")
    assert proc.returncode == 0, proc.stderr[-2000:]

    # a tokenizer with more tokens than the model has embeddings: trained with another tokenizer
    other = tmp_path / "other-tokenizer"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_tokens([f"<extra_{i}>" for i in range(10)])
    tok.save_pretrained(other)
    recipe = base_recipe(
        tmp_path / "x", model={"path": str(tiny_model), "tokenizer": str(other)}, data={"train": [{"path": str(data)}]}
    )
    (tmp_path / "x").mkdir()
    proc = run_cli("train", str(write_recipe(tmp_path / "x", recipe)))
    assert proc.returncode == 2 and "another tokenizer" in proc.stderr and "Traceback" not in proc.stderr


def _killed_after_step_2(tmp_path: Path) -> tuple[Path, Path]:
    """A 4-step run with checkpoints every 2 steps, left as if killed after its step-2 checkpoint."""
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=32)
    recipe = base_recipe(
        tmp_path,
        data={"train": [{"path": str(data)}], "max_length": 64},
        train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 2},
    )
    path = write_recipe(tmp_path, recipe)
    assert run_cli("train", str(path)).returncode == 0
    out = Path(recipe["output_dir"])
    as_if_killed(out, drop=("step-00000004",))
    return path, out


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused(tmp_path: Path) -> None:
    path, _ = _killed_after_step_2(tmp_path)
    proc = run_cli("train", str(path), nproc=2)
    assert proc.returncode != 0
    assert "written with 1 processes" in proc.stderr and "this run has 2" in proc.stderr


@pytest.mark.slow  # several full runs: the slow tier
def test_a_tampered_checkpoint_cannot_run_code(tmp_path: Path) -> None:
    """Checkpoints are read with weights-only unpickling: a pickle that would run a command is refused."""
    path, out = _killed_after_step_2(tmp_path)
    marker = tmp_path / "pwned"
    target = next((out / "checkpoints" / "step-00000002").rglob("mp_rank_00_model_states.pt"))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"module": Evil()}, target)
    proc = run_cli("train", str(path))
    assert proc.returncode != 0
    assert not marker.exists(), "unpickling the checkpoint ran code"


@pytest.mark.slow  # several full runs: the slow tier
def test_resume_after_the_data_changed_is_refused_unless_asked_for(tmp_path: Path) -> None:
    path, out = _killed_after_step_2(tmp_path)
    data = tmp_path / "echo.jsonl"
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same rows, another order
    proc = run_cli("train", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the training data (file contents) changed since" in proc.stderr and "--resume-from" in proc.stderr
    ckpt = out / "checkpoints" / "step-00000002"
    assert (ckpt / "COMPLETE").is_file()  # refusing kept the checkpoint
    proc = run_cli("train", str(path), "--resume-from", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" in proc.stdout and f"resumed from {ckpt}" in proc.stdout
    # the next resume compares with the data of the checkpoints this run wrote: no complaint
    as_if_killed(out)  # killed before its export: the newest checkpoint (step 4) has the new data's fingerprint
    proc = run_cli("train", str(path))
    assert proc.returncode == 0 and "changed since" not in proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "step-00000004" in proc.stdout


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_the_fix(tmp_path: Path) -> None:
    """A full disk, simulated by a file-size limit on the process (writes past 300 kB fail with EFBIG)."""
    import resource

    data = unseen_sft_data(tmp_path / "echo.jsonl", n=32)
    recipe = base_recipe(
        tmp_path,
        data={"train": [{"path": str(data)}], "max_length": 64},
        train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 2},
    )
    path = write_recipe(tmp_path, recipe)

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    proc = run_cli("train", str(path), timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "could not write checkpoint" in proc.stderr and "step-00000002" in proc.stderr
    assert "free disk space" in proc.stderr and "no checkpoint had been written yet" in proc.stderr
    out = Path(recipe["output_dir"])
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    # with room again, the same command starts over cleanly (the partial checkpoint is removed)
    proc = run_cli("train", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "step-00000004" / "COMPLETE").is_file()


@pytest.mark.slow  # several full runs: the slow tier
def test_an_unfinished_run_is_not_taken_as_a_model(tmp_path: Path) -> None:
    """A killed run's output_dir holds no final model (or an earlier one): the next stage, eval and
    merge-lora refuse it and say how to finish it; once finished, it is accepted."""
    path, out = _killed_after_step_2(tmp_path)
    nxt = base_recipe(tmp_path, output_dir=str(tmp_path / "next"), model={"path": str(out)}, train={"max_steps": 1})
    nxt_path = write_recipe(tmp_path, nxt, "next.yaml")
    pairs = ROOT / "recipes" / "quickstart" / "pairs.jsonl"
    for args in (
        ("train", str(nxt_path)),
        ("validate", str(nxt_path)),
        ("eval", "--model", str(TINY_MODEL), "--adapter", str(out), "--data", str(pairs), "--task", "preference"),
        ("merge-lora", "--adapter", str(out), "--base", str(TINY_MODEL), "--out", str(tmp_path / "merged")),
    ):
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stdout[-1000:], proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        assert "has not finished (run.json status: running)" in proc.stderr and "resumes it" in proc.stderr
    assert not (tmp_path / "next").exists() and not (tmp_path / "merged").exists()
    assert run_cli("train", str(path)).returncode == 0  # finish it
    assert not (out / ".export-in-progress").exists()
    proc = run_cli("merge-lora", "--adapter", str(out), "--base", str(TINY_MODEL), "--out", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # a LoRA output as the next stage's model.path: the message says to merge it first
    proc = run_cli("train", str(nxt_path))
    assert proc.returncode == 2 and "is a LoRA adapter" in proc.stderr and "llmtune merge-lora" in proc.stderr


@pytest.mark.slow  # several full runs: the slow tier
def test_resume_from_with_a_longer_schedule_follows_the_new_schedule(tmp_path: Path) -> None:
    """--resume-from after raising max_steps: the first resumed step runs at the new schedule's rate (not
    at the old one's, which had decayed to about 0), and a fresh run of the new recipe agrees on every rate."""
    data = unseen_sft_data(tmp_path / "echo.jsonl", n=64)
    short = base_recipe(
        tmp_path,
        output_dir=str(tmp_path / "short"),
        data={"train": [{"path": str(data)}], "max_length": 64},
        train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 2, "lr": 2e-3, "log_every": 1, "warmup_steps": 1},
    )
    assert run_cli("train", str(write_recipe(tmp_path, short, "short.yaml"))).returncode == 0
    long = {**short, "output_dir": str(tmp_path / "long"), "train": {**short["train"], "max_steps": 8}}
    assert run_cli("train", str(write_recipe(tmp_path, long, "long.yaml"))).returncode == 0
    cont = {**long, "output_dir": str(tmp_path / "cont")}
    ckpt = tmp_path / "short" / "checkpoints" / "step-00000002"
    proc = run_cli("train", str(write_recipe(tmp_path, cont, "cont.yaml")), "--resume-from", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "long") if "lr" in r}
    resumed = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "cont") if "lr" in r}
    assert sorted(resumed) == [3, 4, 5, 6, 7, 8]
    for step, lr in resumed.items():
        assert lr == pytest.approx(fresh[step], rel=1e-9), (step, lr, fresh[step])
