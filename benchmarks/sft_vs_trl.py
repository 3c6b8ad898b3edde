"""SFT step time and peak memory: llmtune against TRL's SFTTrainer, measured in the same run.

    pip install trl                      # the reference library (not a dependency of llmtune)
    python benchmarks/sft_vs_trl.py      # tiny model, CPU, ~2 minutes
    python benchmarks/sft_vs_trl.py --model Qwen/Qwen2.5-0.5B-Instruct --method lora --steps 50 --max-length 1024
    python benchmarks/sft_vs_trl.py --vocab 128256 --hidden 128 --max-length 512 --micro-batch 4 --steps 20
        # a random Llama (2 layers) of a real vocabulary built offline on the quickstart tokenizer, and rows
        # long enough to be cut at --max-length: where the logits (B, T, V) dominate the memory

Both train the same model with the same LoRA (or full) set-up, micro-batch, sequence cut, learning rate and
data (conversations in OpenAI messages form; both pad each batch to its longest row, no packing), each in
its own process. Step time is the median over the steps after a warm-up; peak memory is the process's
maximum resident set size (CPU) or the peak CUDA allocation (GPU). Ratios > 1 mean llmtune is faster /
smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

TRL_SCRIPT = r"""
import json, sys, time, resource, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
args = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(args["model"])
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
rows = [json.loads(l) for l in open(args["data"]) if l.strip()]
ds = Dataset.from_list([{"messages": r["messages"]} for r in rows])
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args["precision"]]
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=dtype, attn_implementation="sdpa")
peft_config = None
if args["method"] == "lora":
    from peft import LoraConfig
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
times = []
class Timer(TrainerCallback):  # step end to step end: data loading, forward, backward, optimizer, callbacks
    t = None
    def on_step_end(self, a, s, c, **k):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        now = time.perf_counter()
        if self.t is not None: times.append(now - self.t)
        self.t = now
cfg = SFTConfig(
    output_dir=args["out"], per_device_train_batch_size=args["micro_batch"], max_steps=args["steps"],
    learning_rate=args["lr"], max_length=args["max_length"], logging_steps=10**6, report_to=[],
    save_strategy="no", packing=False, assistant_only_loss=False, bf16=args["precision"] == "bf16",
    use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0, lr_scheduler_type="cosine",
    gradient_checkpointing=False,
)
trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                     callbacks=[Timer()])
trainer.train()
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print("RESULT " + json.dumps({"times": times, "cuda_peak": peak}))
"""


def _run(cmd: list[str], env: dict[str, str]) -> tuple[str, int]:
    """Run a child; return its stdout and its own peak resident memory in bytes (from wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd[:4])} failed:\n{err.read()[-3000:]}")
        return out.read(), usage.ru_maxrss * 1024  # Linux reports kilobytes


def run_llmtune(a: argparse.Namespace, work: Path, env: dict[str, str]) -> dict:
    recipe = {
        "stage": "sft",
        "output_dir": str(work / "llmtune"),
        "seed": 0,
        "model": {"path": a.model, "attn_implementation": "sdpa"},
        "finetuning": {"method": a.method, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        "data": {"train": [{"path": str(a.data), "format": "messages"}], "max_length": a.max_length},
        "train": {"max_steps": a.steps, "micro_batch_size": a.micro_batch, "lr": a.lr, "log_every": 1},
        "precision": a.precision,
    }
    path = work / "llmtune.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _, rss = _run([sys.executable, "-m", "llmtune", "train", str(path), "--overwrite"], env)
    records = [json.loads(x) for x in (work / "llmtune" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    times, prev = [], 0
    for r in steps:  # tokens_per_s is measured over exactly this step's window (log_every 1)
        times.append((r["tokens"] - prev) / r["tokens_per_s"])
        prev = r["tokens"]
    return {"times": times, "rss": rss}


def run_trl(a: argparse.Namespace, work: Path, env: dict[str, str]) -> dict:
    args = {
        "model": a.model, "data": str(a.data), "method": a.method, "micro_batch": a.micro_batch,
        "steps": a.steps, "lr": a.lr, "max_length": a.max_length, "precision": a.precision,
        "out": str(work / "trl"),
    }  # fmt: skip
    out, rss = _run([sys.executable, "-c", TRL_SCRIPT, json.dumps(args)], env)
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    return {"times": result["times"], "rss": rss, "cuda_peak": result["cuda_peak"]}


def build_model(work: Path, vocab: int, hidden: int, layers: int) -> str:
    """A random Llama of the given vocabulary on the quickstart tokenizer (its ids are a subset), saved offline."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ROOT / "recipes" / "quickstart" / "model")
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    out = work / "model"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def long_rows(path: Path, n: int = 64, words: int = 700) -> Path:
    """Conversations whose reply is long enough to be cut at any --max-length up to about 1000 tokens."""
    import random

    rng = random.Random(0)
    vocab = [
        "the",
        "a",
        "model",
        "of",
        "data",
        "train",
        "token",
        "loss",
        "step",
        "learn",
        "rate",
        "batch",
        "memory",
        "value",
        "layer",
        "head",
    ]
    with path.open("w") as f:
        for i in range(n):
            reply = " ".join(rng.choice(vocab) for _ in range(words))
            f.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": reply}]}
                )
                + "\n"
            )
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "recipes" / "quickstart" / "model"))
    p.add_argument("--data", type=Path, default=ROOT / "recipes" / "quickstart" / "sft.jsonl")
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--vocab", type=int, default=None, help="build a random Llama of this vocabulary (offline)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--only", choices=["llmtune", "trl"], default=None, help="run one side only")
    a = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if a.vocab:
            a.model = build_model(work, a.vocab, a.hidden, a.layers)
            a.data = long_rows(work / "long.jsonl")
        none = {"times": [float("nan")] * (a.warmup + 1), "rss": float("nan")}
        trl = run_trl(a, work, env) if a.only != "llmtune" else none
        ours = run_llmtune(a, work, env) if a.only != "trl" else none
    t_ours = statistics.median(ours["times"][a.warmup :])
    t_trl = statistics.median(trl["times"][a.warmup :])
    print(f"model {a.model} | {a.method} | micro-batch {a.micro_batch} | max_length {a.max_length} | {a.precision}")
    print(f"{'':10} {'step (ms)':>10} {'steps/s':>9} {'peak RSS (MB)':>14}")
    for name, t, r in (("llmtune", t_ours, ours["rss"]), ("trl", t_trl, trl["rss"])):
        print(f"{name:10} {t * 1000:10.1f} {1 / t:9.2f} {r / 2**20:14.0f}")
    print(f"speed ratio (trl step time / llmtune step time): {t_trl / t_ours:.2f}x")
    print(f"memory ratio (trl peak RSS / llmtune peak RSS): {trl['rss'] / ours['rss']:.2f}x")


if __name__ == "__main__":
    main()
