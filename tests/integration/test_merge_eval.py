"""merge-lora and eval through the real CLI: tiny LoRA / QLoRA sft outputs trained here, merged, reloaded
and compared with base + adapter; eval numbers checked against independent transformers computations."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import TINY_MODEL, assert_ok, assert_refused, base_recipe, run_cli, write_recipe

TEXTS = [
    "The river runs past the old stone mill and into the green valley.",
    "Seven glasses of orange juice stood on the winter table.",
    "Music from the lamp-lit room drifted over the paper boats.",
    "A tiger and an apple walked into a cloud; nobody laughed.",
    "Bread and stone, river and cloud: the words of a small song.",
]


# recipe-validation refusals there name the fix as a did-you-mean, not always on a `fix:` line
assert_refused_plain = functools.partial(assert_refused, fix=False)  # refusals whose message needs no fix: line


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LoRA (fp32) and a QLoRA (4-bit base, bf16) sft output, a few steps each."""
    outs = {}
    for method in ("lora", "qlora"):
        tmp = tmp_path_factory.mktemp(method)
        recipe = base_recipe(
            tmp,
            finetuning={"method": method, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            train={"max_steps": 3, "micro_batch_size": 4, "lr": 1e-2, "log_every": 1},
            precision="bf16" if method == "qlora" else "fp32",
        )
        assert_ok(run_cli("train", str(write_recipe(tmp, recipe))))
        outs[method] = Path(recipe["output_dir"])
    return outs


def _probe_logits(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    x = torch.randint(0, 1024, (3, 20), generator=g)
    with torch.no_grad():
        return model(input_ids=x).logits.float()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merge_lora_matches_base_plus_adapter(trained: dict[str, Path], tmp_path: Path, method: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, out = trained[method], tmp_path / "merged"
    proc = run_cli(
        "merge-lora", "--base", str(TINY_MODEL), "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32"
    )
    assert_ok(proc)
    assert "max |logit difference| vs base + adapter" in proc.stdout
    if method == "qlora":
        assert "qlora adapter" in proc.stdout and "never into 4-bit" in proc.stdout
    printed = float(proc.stdout.split("on probe inputs: ")[1].split()[0])
    assert printed < 1e-4
    # reload both independently: the merged model and the full-precision (dequantized) base + the adapter
    merged = AutoModelForCausalLM.from_pretrained(out)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32), adapter)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    diff = (_probe_logits(merged) - _probe_logits(ref)).abs().max().item()
    assert diff < 1e-4, diff
    assert (_probe_logits(merged) - _probe_logits(base)).abs().max().item() > 1e-3  # the adapter is in it
    assert not any(p.name.startswith("adapter") for p in out.iterdir())
    assert (out / "chat_template.jinja").is_file() and (out / "generation_config.json").is_file()

    if method == "lora":  # a non-empty --out is refused (the message names --overwrite)
        assert_refused_plain(
            run_cli("merge-lora", "--adapter", str(adapter), "--out", str(out)), "is not empty", "--overwrite"
        )


def test_merge_lora_bad_inputs(trained: dict[str, Path], tmp_path: Path) -> None:
    assert_refused_plain(
        run_cli(
            "merge-lora", "--base", str(TINY_MODEL), "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")
        ),
        "does not exist",
    )
    assert_refused_plain(
        run_cli(
            "merge-lora",
            "--base",
            str(tmp_path / "nobase"),
            "--adapter",
            str(trained["lora"]),
            "--out",
            str(tmp_path / "o"),
        ),
        "could not load a model config",
    )


def _ppl_reference(texts: list[str]) -> tuple[float, int]:
    """Independent: each text's tokens (tokenizer ids + EOS), the model's mean loss, weighted by targets."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    total, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([[*tok(t)["input_ids"], tok.eos_token_id]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        total += loss * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    return total / n, n


def test_eval_perplexity_matches_transformers_and_yaml_form(tmp_path: Path) -> None:
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    report = tmp_path / "ppl.json"
    proc = run_cli(
        "eval", "--model", str(TINY_MODEL), "--data", str(data), "--task", "perplexity",
        "--batch-size", "2", "--output", str(report),
    )  # fmt: skip
    assert_ok(proc)
    assert "perplexity" in proc.stdout
    got = json.loads(report.read_text())
    loss, n = _ppl_reference(TEXTS)
    assert got["tokens"] == n
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)

    # the same as a file, with an option on top
    cfg = {"task": "perplexity", "model": str(TINY_MODEL), "data": str(data), "output": str(tmp_path / "ignored.json")}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report2 = tmp_path / "ppl2.json"
    assert_ok(run_cli("eval", str(path), "--output", str(report2)))
    assert json.loads(report2.read_text())["loss"] == pytest.approx(loss, rel=1e-5)
    assert not (tmp_path / "ignored.json").exists()

    # a misspelled key in the file: exit 2 with a suggestion, before any model is loaded
    path.write_text(yaml.safe_dump({**cfg, "batchsize": 4}))
    assert_refused_plain(run_cli("eval", str(path)), "batchsize", "Did you mean 'batch_size'?")


def _greedy(prompts: list[str], max_new: int) -> list[str]:
    """Independent greedy completions, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    outs = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids, max_new_tokens=max_new, do_sample=False, eos_token_id=[2, 0], pad_token_id=2
            )
        new = gen[0, ids.shape[1] :].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in (0, 2)), len(new))]
        outs.append(tok.decode(new, skip_special_tokens=True))
    return outs


def test_eval_generate_exact_match_equals_independent_count(tmp_path: Path) -> None:
    prompts = [
        f"Say the word number {i}: {w}" for i, w in enumerate(["river", "stone", "cloud", "apple", "tiger", "lamp"])
    ]
    expected = _greedy(prompts, 6)
    # rows 0, 2, 4 carry the model's own greedy reply as the answer, the others a wrong one
    answers = [e if i % 2 == 0 else "definitely not this" for i, e in enumerate(expected)]
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers, strict=True))
    )
    report = tmp_path / "gen.json"
    proc = run_cli(
        "eval", "--model", str(TINY_MODEL), "--data", str(data), "--task", "generate", "--max-new-tokens", "6",
        "--batch-size", "4", "--output", str(report),
    )  # fmt: skip
    assert_ok(proc)
    got = json.loads(report.read_text())
    from llmtune.rewards.metrics import normalize

    count = sum(normalize(e) == normalize(a) for e, a in zip(expected, answers, strict=True))
    assert count >= 3
    assert got["exact_match_count"] == count and got["exact_match"] == pytest.approx(count / len(prompts))
    gens = [json.loads(line) for line in Path(got["generations"]).read_text().splitlines()]
    assert [g["completion"] for g in gens] == expected
    n = len(gens)
    assert got["truncated_share"] == pytest.approx(sum(not g["ended"] for g in gens) / n)
    assert got["empty_share"] == pytest.approx(sum(not g["completion"].strip() for g in gens) / n)


def _reward_model(path: Path) -> Path:
    """A reward model built here: the tiny model's body with a seeded random one-output score head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(TINY_MODEL, num_labels=1)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    rm.config.pad_token_id = tok.eos_token_id
    rm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_eval_preference_reward_and_compare(trained: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = _reward_model(tmp_path / "rm")
    words = ["river", "stone", "cloud", "apple", "tiger", "lamp", "green", "paper"]
    pairs = [
        {"prompt": f"Name a thing like {w}.", "chosen": f"A {w}.", "rejected": f"{words[i - 1]} {w} {w}"}
        for i, w in enumerate(words)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    report = tmp_path / "pref.json"
    assert_ok(
        run_cli(
            "eval",
            "--model",
            str(rm_dir),
            "--data",
            str(data),
            "--task",
            "preference",
            "--batch-size",
            "3",
            "--output",
            str(report),
        )
    )
    got = json.loads(report.read_text())

    # independent: each conversation scored alone by AutoModelForSequenceClassification (no padding)
    tok = AutoTokenizer.from_pretrained(rm_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()

    def score(prompt: str, reply: str) -> float:
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            h = rm.model(input_ids=ids["input_ids"]).last_hidden_state[:, -1]
            return rm.score(h).item()

    diffs = [score(p["prompt"], p["chosen"]) - score(p["prompt"], p["rejected"]) for p in pairs]
    assert got["pairs"] == len(pairs) and got["scored_by"] == "reward_model"
    assert got["correct"] == sum(d > 0 for d in diffs)
    assert got["accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / len(pairs))
    assert got["margin"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-4)

    # a policy's implicit DPO reward: the lora output against its base (the adapter disabled)
    assert_ok(
        run_cli(
            "eval",
            "--model",
            str(trained["lora"]),
            "--data",
            str(data),
            "--task",
            "preference",
            "--output",
            str(report),
        )
    )
    dpo = json.loads(report.read_text())
    assert dpo["scored_by"] == "dpo_implicit_reward" and 0 <= dpo["accuracy"] <= 1

    # reward: generations scored by the reward model and a rule; compare: base vs lora, judged by the rm
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Name a thing like {w}.", "answer": w}) + "\n" for w in words[:4])
    )
    assert_ok(run_cli(
        "eval", "--model", str(TINY_MODEL), "--data", str(prompts), "--task", "reward", "--reward-model", str(rm_dir),
        "--rule", "contains", "--max-new-tokens", "4", "--output", str(tmp_path / "reward.json"),
    ))  # fmt: skip
    rew = json.loads((tmp_path / "reward.json").read_text())
    assert set(rew["rewards"]) == {str(rm_dir), "contains"} and rew["examples"] == 4
    rows = [json.loads(line) for line in Path(rew["generations"]).read_text().splitlines()]
    assert rew["mean_reward"] == pytest.approx(sum(r["reward"] for r in rows) / 4)
    assert_ok(run_cli(
        "eval", "--model", str(TINY_MODEL), "--model-b", str(trained["lora"]), "--data", str(prompts), "--task", "compare",
        "--reward-model", str(rm_dir), "--max-new-tokens", "4", "--output", str(tmp_path / "cmp.json"),
    ))  # fmt: skip
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert cmp["wins"] + cmp["ties"] + cmp["losses"] == 4
    assert cmp["win_rate"] + cmp["tie_rate"] + cmp["loss_rate"] == pytest.approx(1.0)


def test_eval_bad_paths_and_formats(tmp_path: Path) -> None:
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "hello"}) + "\n")
    assert_refused_plain(
        run_cli("eval", "--model", str(TINY_MODEL), "--data", str(tmp_path / "missing.jsonl"), "--task", "perplexity"),
        "does not exist",
    )
    assert_refused_plain(
        run_cli("eval", "--model", str(tmp_path / "nomodel"), "--data", str(text), "--task", "perplexity"),
        "does not exist",
    )
    assert_refused_plain(
        run_cli("eval", "--model", str(TINY_MODEL), "--data", str(text), "--task", "perplexity", "--format", "csv"),
        "format",
    )
    assert_refused_plain(
        run_cli("eval", "--model", str(TINY_MODEL), "--data", str(text), "--task", "perplx"), "Did you mean perplexity"
    )
    assert_refused_plain(
        run_cli("eval", "--model", str(TINY_MODEL), "--data", str(text), "--task", "preference"), "no preference pairs"
    )
    assert_refused_plain(run_cli("eval", str(tmp_path / "nope.yaml")), "does not exist")


def test_merge_fisher_matches_an_independent_fisher_average(trained: dict[str, Path], tmp_path: Path) -> None:
    """merge --method fisher: each weight element is sum_i w_i F_i theta_i / sum_i w_i F_i, with F_i model
    i's mean squared gradient of each document's mean token loss (recomputed here with transformers)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "fisher"
    proc = run_cli(
        "merge", "--model", str(TINY_MODEL), "--model", str(trained["lora"]), "--weight", "1", "--weight", "3",
        "--method", "fisher", "--fisher-data", str(docs), "--fisher-samples", "4", "--out", str(out),
    )  # fmt: skip
    assert_ok(proc)
    assert "Fisher importance from 4 sample(s)" in proc.stdout
    assert json.loads((out / "merge.json").read_text())["method"] == "fisher"

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in TEXTS[:4]]
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32), trained["lora"]
    ).merge_and_unload()
    thetas, fishers = [], []
    for model in (base, tuned):
        model.eval().requires_grad_(True)  # peft froze the base it merged into
        f = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for x in ids:
            model.zero_grad()
            t = torch.tensor([x])
            model(input_ids=t, labels=t).loss.backward()
            for n, p in model.named_parameters():
                f[n] += p.grad**2 / len(ids)
        thetas.append({n: p.detach() for n, p in model.named_parameters()})
        fishers.append(f)
    w = [0.25, 0.75]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    closer_to_tuned = 0
    for n, p in merged.named_parameters():
        num = w[0] * fishers[0][n] * thetas[0][n] + w[1] * fishers[1][n] * thetas[1][n]
        den = w[0] * fishers[0][n] + w[1] * fishers[1][n]
        plain = w[0] * thetas[0][n] + w[1] * thetas[1][n]
        expected = torch.where(den > 0, num / den.clamp_min(1e-38), plain)
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-4, msg=n)
        closer_to_tuned += int(not torch.allclose(p.detach(), plain, atol=1e-7))
    assert closer_to_tuned > 0  # it is not the plain weighted average


def test_merge_fisher_bad_options(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    m = ["--model", str(TINY_MODEL), "--model", str(TINY_MODEL), "--out", out]
    assert_refused_plain(run_cli("merge", *m, "--method", "fisher"), "--method fisher needs --fisher-data")
    assert_refused_plain(run_cli("merge", *m, "--fisher-data", "x.txt"), "only read by --method fisher")
    assert_refused_plain(run_cli("merge", *m, "--method", "soup"), "--method 'soup'")
    pairs = str(TINY_MODEL.parent / "pairs.jsonl")
    assert_refused_plain(
        run_cli("merge", *m, "--method", "fisher", "--fisher-data", pairs), "cannot detect the data format", "text"
    )
    assert not Path(out).exists()
