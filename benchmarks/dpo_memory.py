"""dpo's peak memory on a model of a real vocabulary, where the logits (B, T, V) dominate.

    python benchmarks/dpo_memory.py                  # random Llama h128 x 2 layers, vocabulary 128,256, LoRA, fp32

A random Llama built offline on the quickstart tokenizer (as sft_vs_trl.py --vocab does), pairs whose
replies fill max_length, one `llmtune train` child process (reference log-probs precomputed, then the
policy's chosen and rejected rows in one forward pass); the figure is the child's own peak resident memory
(wait4). Run it from a checkout to measure that checkout's code.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_vs_trl import ROOT, _run, build_model


def pairs(path: Path, n: int = 32, words: int = 300) -> Path:
    rng = random.Random(0)
    vocab = ["the", "a", "model", "of", "data", "train", "token", "loss", "step", "learn", "rate", "batch"]
    with path.open("w") as f:
        for i in range(n):
            chosen = " ".join(rng.choice(vocab) for _ in range(words))
            rejected = " ".join(rng.choice(vocab) for _ in range(words))
            f.write(json.dumps({"prompt": f"say {i}", "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipe = {
            "stage": "dpo",
            "output_dir": str(work / "out"),
            "seed": 0,
            "model": {"path": build_model(work, a.vocab, a.hidden, a.layers)},
            "finetuning": {"method": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
            "data": {"train": [{"path": str(pairs(work / "pairs.jsonl"))}], "max_length": a.max_length},
            "train": {"max_steps": a.steps, "micro_batch_size": a.micro_batch, "lr": 1e-4, "log_every": 1},
            "precision": "fp32",
        }
        path = work / "dpo.yaml"
        path.write_text(yaml.safe_dump(recipe))
        _, rss = _run([sys.executable, "-m", "llmtune", "train", str(path), "--overwrite"], env)
        losses = [json.loads(x).get("loss") for x in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    print(f"dpo lora | vocab {a.vocab} | micro-batch {a.micro_batch} pairs | max_length {a.max_length} | {ROOT}")
    print(f"peak RSS {rss / 2**20:.0f} MB; losses {losses}")


if __name__ == "__main__":
    main()
