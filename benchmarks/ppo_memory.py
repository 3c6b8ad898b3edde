"""Peak memory of ppo's two memory layouts: memory shared (one base holds the policy, critic, reference and a
lora reward model as adapters) against separate (each model its own weights), on the same LoRA recipe.

A random Llama of a size where the weights dominate (default ~100M parameters, fp32, the quickstart's
tokenizer) is written to a temporary folder; a lora reward model is trained on it by the rm stage (a few
steps); then `llmtune train` runs the same ppo recipe with ppo.memory shared and separate, interleaved
(A B A B ...), and each child's own peak resident memory is read from wait4. Prints the medians and the
ratio separate / shared.

    python benchmarks/ppo_memory.py [--hidden 1024 --layers 8] [--repeats 2]
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
TINY = ROOT / "recipes" / "quickstart" / "model"


def _run(cmd: list[str], env: dict[str, str]) -> int:
    """Run a child; return its own peak resident memory in bytes."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            out.seek(0)
            sys.exit(f"{' '.join(cmd[:4])} failed:\n{out.read()[-3000:]}")
        return usage.ru_maxrss * 1024


def make_model(path: Path, hidden: int, layers: int) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TINY)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "generation_config.json").write_text((TINY / "generation_config.json").read_text())
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n = make_model(work / "base", a.hidden, a.layers)
        pairs = work / "pairs.jsonl"
        pairs.write_text(
            "".join(
                json.dumps({"prompt": f"Say something about {w}.", "chosen": f"{w} is lovely.", "rejected": "No."})
                + "\n"
                for w in ("rivers", "stones", "clouds", "tigers") * 8
            )
        )
        lora = {"method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
        common = {"seed": 0, "model": {"path": str(work / "base")}, "finetuning": lora, "precision": "fp32"}
        rm = {
            **common,
            "stage": "rm",
            "output_dir": str(work / "rm"),
            "data": {"train": [{"path": str(pairs)}], "max_length": 64},
            "train": {"max_steps": 1, "micro_batch_size": 4},
        }
        (work / "rm.yaml").write_text(yaml.safe_dump(rm))
        _run([sys.executable, "-m", "llmtune", "train", str(work / "rm.yaml")], env)
        prompts = work / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"Say the word {i}."}) + "\n" for i in range(32)))
        rss: dict[str, list[int]] = {"shared": [], "separate": []}
        for r in range(a.repeats):
            for memory in ("shared", "separate"):
                recipe = {
                    **common,
                    "stage": "ppo",
                    "output_dir": str(work / f"ppo-{memory}-{r}"),
                    "data": {"train": [{"path": str(prompts)}], "max_length": 64},
                    "ppo": {
                        "memory": memory,
                        "ppo_epochs": 1,
                        "prompts_per_step": 4,
                        "reward": {"model": str(work / "rm")},
                    },
                    "generation": {"max_new_tokens": 8, "batch_size": 4},
                    "train": {"max_steps": a.steps, "micro_batch_size": 4, "lr": 1e-4},
                }
                path = work / f"ppo-{memory}.yaml"
                path.write_text(yaml.safe_dump(recipe))
                rss[memory].append(_run([sys.executable, "-m", "llmtune", "train", str(path)], env))
    shared, separate = (statistics.median(rss[m]) for m in ("shared", "separate"))
    print(f"random Llama h{a.hidden} x {a.layers} layers, {n / 1e6:.0f}M params ({n * 4 / 2**20:.0f} MB fp32), lora")
    print(f"{'memory':10} {'peak RSS (MB)':>14}   runs")
    for m, v in (("shared", shared), ("separate", separate)):
        print(f"{m:10} {v / 2**20:14.0f}   {', '.join(f'{x / 2**20:.0f}' for x in rss[m])}")
    print(f"separate / shared peak RSS: {separate / shared:.2f}x")


if __name__ == "__main__":
    main()
