"""Every llmtune stage against its TRL trainer, in one run: step time, tokens/s and peak memory.

    python benchmarks/run.py --quick                       # CI-sized: tiny model, a few steps, every case
    python benchmarks/run.py --size vocab --cases sft_lora sft_full dpo_lora grpo_lora --json vocab.json
    python benchmarks/run.py --device cuda --json gpu.json # a Llama-3.2-1B shape, bf16, 1,024-token rows

Each case trains the same random-weight model on the same rows with the same settings twice, once with
llmtune (``python -m llmtune train RECIPE``) and once with TRL's trainer for that stage
(benchmarks/trl_driver.py), each in its own child process, interleaved (llmtune, TRL, llmtune, TRL, ...).
Both children run under benchmarks/probe.py, which counts the rows and non-padding tokens of every training
forward the same way on both sides; a case whose two sides did not train the same tokens fails the run.
Rows are built so that every row of a case has the same length in tokens: padding is the same whatever the
order the two samplers draw them in. Step time is the median over the steps after the warm-up (step end to
step end: data, forward, backward, optimizer; generation for grpo / ppo); peak memory is the child's peak
resident set (CPU, from wait4) or ``torch.cuda.max_memory_allocated()`` (CUDA). Ratios > 1 mean llmtune is
faster / smaller: ``ratio_vs_trl`` = TRL step time / llmtune step time, ``memory_ratio_vs_trl`` = TRL peak /
llmtune peak.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_MODEL = ROOT / "recipes" / "quickstart" / "model"


@dataclass(frozen=True)
class Size:
    """A benchmark model shape and the row / step settings every case of that size uses."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # the LM head's rows: what the logits (and their memory) scale with
    tie: bool
    tokenizer: str  # "quickstart" (vocab 1,024) or "bpe" (a byte-level BPE trained here to the model's vocab)
    max_length: int
    row_tokens: int  # every sft / rm / dpo row (the whole conversation) is exactly this long
    prompt_tokens: int  # grpo / ppo prompts (with the generation prompt)
    max_new_tokens: int
    micro_batch: int
    steps: int
    warmup: int
    repeats: int
    precision: str = "fp32"


SIZES = {
    # the quickstart model's shape (Llama, 2 layers, hidden 64, vocab 1,024), random weights
    "tiny": Size(64, 2, 176, 4, 2, 16, 1024, False, "quickstart", 128, 96, 24, 16, 8, 30, 5, 2),
    # vocab 128,256 at hidden 256: the LM head and the logits dominate, as on real models
    "vocab": Size(256, 2, 688, 4, 2, 64, 128256, False, "bpe", 64, 64, 16, 16, 8, 12, 4, 2),
    # Llama-3.2-1B's shape (1.24B parameters), bf16, rows of 1,024 tokens: one pass on one GPU
    "1b": Size(2048, 16, 8192, 32, 8, 64, 128256, True, "bpe", 1024, 1024, 128, 128, 8, 8, 3, 1, "bf16"),
}

QUICK = {"steps": 6, "warmup": 2, "repeats": 1}


@dataclass(frozen=True)
class Case:
    name: str
    stage: str
    method: str
    precompute: bool = False  # dpo: reference log-probs computed once before training
    trl: str | None = "trl"  # None: no TRL trainer to compare with (the reason is in `note`)
    note: str = ""


CASES = [
    Case("cpt_full_packed", "cpt", "full"),
    Case("sft_lora", "sft", "lora"),
    Case("sft_full", "sft", "full"),
    Case("sft_qlora", "sft", "qlora"),
    Case("rm_lora", "rm", "lora"),
    Case("dpo_lora", "dpo", "lora"),
    Case("dpo_lora_precomputed", "dpo", "lora", precompute=True),
    Case("grpo_lora", "grpo", "lora"),
    Case("ppo_lora", "ppo", "lora", trl=None, note="TRL 1.16 has no PPO trainer (PPOTrainer was removed in TRL 1.13)"),
]
CASE_NAMES = [c.name for c in CASES]


class TokenMismatch(RuntimeError):
    """llmtune and TRL did not train the same rows / tokens: the timings would not be comparable."""


# ---------------------------------------------------------------- pure parts (tests/unit/test_bench.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), default=None, help="default: tiny (cpu), 1b (cuda)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cases", nargs="+", choices=CASE_NAMES, default=None, help="default: all")
    p.add_argument("--quick", action="store_true", help="a few steps, tiny size, one repeat: every case reported")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the median")
    p.add_argument("--repeats", type=int, default=None, help="llmtune / TRL pairs per case, interleaved")
    p.add_argument("--json", type=Path, default=None, help="write the results here (rewritten after each case)")
    p.add_argument("--threads", type=int, default=1, help="CPU: OMP / torch threads per child (the same on both sides)")
    p.add_argument(
        "--kernels", choices=["none", "liger"], default="none", help="llmtune's train.kernels (TRL runs without)"
    )
    p.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache", help="built models and data")
    a = p.parse_args(argv)
    if a.size is None:
        a.size = "1b" if a.device == "cuda" else "tiny"
    if a.quick:
        if a.size != "tiny" and a.device == "cpu":
            p.error("--quick runs the tiny size")
        for k, v in QUICK.items():
            if getattr(a, k) is None:
                setattr(a, k, v)
    size = SIZES[a.size]
    a.steps = a.steps if a.steps is not None else size.steps
    a.warmup = a.warmup if a.warmup is not None else size.warmup
    a.repeats = a.repeats if a.repeats is not None else size.repeats
    if a.warmup >= a.steps - 1:
        p.error(f"--warmup {a.warmup} leaves no step to measure out of --steps {a.steps}")
    a.cases = [c for c in CASES if a.cases is None or c.name in a.cases]
    return a


def check_tokens(case: str, ours: dict[str, int], trl: dict[str, int]) -> None:
    """Fail loudly unless both sides trained the same rows and non-padding tokens (probe.py's counts)."""
    bad = [k for k in ("rows", "tokens") if ours.get(k) != trl.get(k)]
    if bad or not ours.get("tokens"):
        detail = ", ".join(
            f"{k}: llmtune {ours.get(k)} vs TRL {trl.get(k)}" for k in ("rows", "tokens", "padded_tokens")
        )
        raise TokenMismatch(f"{case}: llmtune and TRL did not train the same tokens ({detail})")


def side_summary(runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """One side of a case over its repeats: median step time after the warm-up (of all repeats' steps
    together), tokens per step from the probe, tokens/s, and the largest peak memory of the repeats."""
    steps = [t for r in runs for t in r["times"][warmup:]]
    step_s = statistics.median(steps)
    tokens_per_step = runs[0]["counts"]["tokens"] / runs[0]["steps"]
    peak = max(r["peak_bytes"] for r in runs)
    return {
        "step_s": step_s,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / step_s,
        "peak_bytes": peak,
        "peak_mb": peak / 2**20,
        "tokens": runs[0]["counts"]["tokens"],
        "rows": runs[0]["counts"]["rows"],
        "padded_tokens": runs[0]["counts"]["padded_tokens"],
        "repeats": [{"step_s": statistics.median(r["times"][warmup:]), "peak_bytes": r["peak_bytes"]} for r in runs],
    }


def case_result(case: Case, ours: dict[str, Any], trl: dict[str, Any] | None, memory: str) -> dict[str, Any]:
    """A case's JSON entry; the ratios are None when there is no TRL side."""
    return {
        "case": case.name,
        "stage": case.stage,
        "method": case.method,
        "memory": memory,  # "rss" (the child's peak resident set) or "cuda" (max_memory_allocated)
        "llmtune": ours,
        "trl": trl,
        "trl_note": case.note or None,
        "tokens_match": None if trl is None else True,
        "ratio_vs_trl": None if trl is None else trl["step_s"] / ours["step_s"],
        "memory_ratio_vs_trl": None if trl is None else trl["peak_bytes"] / ours["peak_bytes"],
    }


def table(results: list[dict[str, Any]]) -> str:
    head = "| case | llmtune step | TRL step | speed (TRL / llmtune) | tokens/s llmtune | peak llmtune / TRL | memory (TRL / llmtune) |"
    lines = [head, "|" + "---|" * 7]
    for r in results:
        o, t = r["llmtune"], r["trl"]
        if t is None:
            lines.append(
                f"| {r['case']} | {o['step_s'] * 1e3:.1f} ms | - | - ({r['trl_note']}) | {o['tokens_per_s']:.0f} "
                f"| {o['peak_mb']:.0f} MB / - | - |"
            )
            continue
        lines.append(
            f"| {r['case']} | {o['step_s'] * 1e3:.1f} ms | {t['step_s'] * 1e3:.1f} ms | {r['ratio_vs_trl']:.2f}x "
            f"| {o['tokens_per_s']:.0f} | {o['peak_mb']:.0f} / {t['peak_mb']:.0f} MB | {r['memory_ratio_vs_trl']:.2f}x |"
        )
    return "\n".join(lines)


def llmtune_times(records: list[dict[str, Any]]) -> list[float]:
    """Per-step wall times from metrics.jsonl written with log_every 1: each record's rate covers exactly the
    time since the previous record, so time = units trained in the step / units per second."""
    times, prev = [], 0.0
    for r in records:
        if "step" not in r or "loss" not in r:
            continue
        unit = next(k[: -len("_per_s")] for k in r if k.endswith("_per_s") and k[: -len("_per_s")] in r)
        times.append((r[unit] - prev) / r[f"{unit}_per_s"])
        prev = r[unit]
    return times[1:]  # the first record's window starts before the loop (set-up): not a step


# ---------------------------------------------------------------- building the model and the rows


def _stop_ids(tok: Any) -> list[int]:
    return sorted({int(i) for i in tok.all_special_ids})


def build_tokenizer(size: Size, out: Path) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if size.tokenizer == "quickstart":
        tok = AutoTokenizer.from_pretrained(QUICKSTART_MODEL)
        tok.save_pretrained(out)
        return tok
    # A byte-level BPE trained to the model's vocabulary on random words: the benchmark's text is made of
    # these words, so its token ids spread over the whole 128k vocabulary (each word is one token).
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(6, 10))) for _ in range(52000)]
    text = [" ".join(words[i : i + 50]) for i in range(0, len(words), 50)] * 2
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size.vocab, min_frequency=2, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    bpe.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", model_max_length=size.max_length * 4)
    tok.chat_template = (QUICKSTART_MODEL / "chat_template.jinja").read_text()
    tok.save_pretrained(out)
    return tok


def build_model(size: Size, tok: Any, out: Path) -> None:
    """A random LlamaForCausalLM of the size's shape, saved with its tokenizer. The end-of-turn / special
    tokens are made (nearly) impossible to sample, so every grpo / ppo completion runs to max_new_tokens on
    both sides: a constant +3 in hidden dimension 0 of every embedding, and -3 in that dimension of the special
    tokens' LM-head rows (a logit gap of about 6 x sqrt(hidden) against the other tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim, tie_word_embeddings=size.tie, max_position_embeddings=max(2048, 2 * size.max_length),
        eos_token_id=tok.eos_token_id, rms_norm_eps=1e-6,
    )  # fmt: skip
    device = "cuda" if torch.cuda.is_available() and size.precision == "bf16" else "cpu"
    dtype = torch.bfloat16 if size.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    stops = _stop_ids(tok)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 3.0
        head = model.get_output_embeddings().weight
        if not size.tie:
            head[:, 0] = 0.0
        head[stops, 0] = -3.0
        # check: the special tokens' probability after a few random rows
        ids = torch.randint(len(stops), min(size.vocab, len(tok)), (4, 16), device=device)
        probs = model(input_ids=ids).logits.float().softmax(-1)[..., stops].sum(-1)
        assert probs.max().item() < 1e-6, f"special tokens still sampled (p = {probs.max().item():.2e})"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model  # the children need the device, not this process
    if device == "cuda":
        torch.cuda.empty_cache()


def _word_pool(tok: Any, limit: int = 20000) -> list[str]:
    """Words that are one token each wherever they stand after a space: ' word' -> [id]."""
    rng = random.Random(1)
    ids = list(range(len(tok)))
    rng.shuffle(ids)
    pool = []
    for i in ids:
        w = tok.decode([i])
        word = len(w) > 2 and w[0] == " " and w[1:].isalpha() and w[1:].isascii()
        if word and tok.encode(w, add_special_tokens=False) == [i]:
            pool.append(w[1:])
        if len(pool) >= limit:
            break
    return pool


def _fit(length: Any, target: int, what: str) -> int:
    """The number of words n with length(n) == target (length grows by one token per word)."""
    n = max(1, target // 2)
    for _ in range(8):
        got = length(n)
        if got == target:
            return n
        n = max(1, n + target - got)
    raise RuntimeError(f"could not build a {what} of exactly {target} tokens")


def build_data(size: Size, tok: Any, out: Path, rows: int) -> dict[str, Any]:
    """Rows of fixed token lengths for every stage; returns what the data covers of the vocabulary."""
    rng = random.Random(0)
    pool = _word_pool(tok)

    def words(n: int) -> str:
        return " ".join(rng.choice(pool) for _ in range(n))

    def chat_len(user: str, reply: str | None) -> int:
        msgs = [{"role": "user", "content": user}]
        if reply is not None:
            msgs.append({"role": "assistant", "content": reply})
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=reply is None, return_dict=False)
        return len(ids)

    def text_len(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    seen: set[int] = set()
    files = {}
    # cpt: documents of max_length - 1 tokens: with the EOS both sides add, one document fills one packed row
    cpt = []
    for _ in range(rows):
        base = [rng.choice(pool) for _ in range(size.max_length)]
        n = _fit(lambda k, b=base: text_len(" ".join(b[:k])), size.max_length - 1, "document")
        cpt.append({"text": " ".join(base[:n])})
    # sft / pairs: a user turn and a reply, the whole conversation row_tokens long
    sft, pairs = [], []
    for _ in range(rows):
        user = words(size.row_tokens // 4)
        cand = [rng.choice(pool) for _ in range(size.row_tokens)]
        other = cand[:1] + [
            rng.choice(pool) for _ in range(size.row_tokens)
        ]  # the first word (no space before it) may be several tokens: the same in both
        n = _fit(lambda k, c=cand, u=user: chat_len(u, " ".join(c[:k])), size.row_tokens, "conversation")
        chosen, rejected = " ".join(cand[:n]), " ".join(other[:n])
        assert chat_len(user, rejected) == size.row_tokens
        sft.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": chosen}]})
        pairs.append({"prompt": user, "chosen": chosen, "rejected": rejected})
    # prompts: prompt_tokens with the generation prompt
    prompts = []
    for _ in range(rows):
        cand = [rng.choice(pool) for _ in range(size.prompt_tokens)]
        n = _fit(lambda k, c=cand: chat_len(" ".join(c[:k]), None), size.prompt_tokens, "prompt")
        prompts.append({"prompt": " ".join(cand[:n]), "answer": rng.choice(pool)})
    for name, data in (("cpt", cpt), ("sft", sft), ("pairs", pairs), ("prompts", prompts)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        files[name] = str(path)
    for r in sft:
        seen.update(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
    return {"files": files, "distinct_token_ids": len(seen), "max_token_id": max(seen)}


def prepare(size_name: str, cache: Path, rows: int) -> dict[str, Any]:
    """The size's model and rows under cache/size (built once; rebuilt if it holds fewer rows)."""
    size = SIZES[size_name]
    where = (cache / size_name).resolve()
    info_path = where / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info["rows"] >= rows:
            return info
    (where / "model").mkdir(parents=True, exist_ok=True)
    print(f"building the {size_name} model and rows under {where} ...", flush=True)
    tok = build_tokenizer(size, where / "model")
    build_model(size, tok, where / "model")
    data = build_data(size, tok, where, rows)
    info = {"model": str(where / "model"), "rows": rows, "vocab": size.vocab, "tokenizer_size": len(tok), **data}
    info_path.write_text(json.dumps(info, indent=1))
    return info


# ---------------------------------------------------------------- the two sides


@dataclass
class Settings:
    size: str
    model: str
    files: dict[str, str]
    steps: int
    micro_batch: int
    max_length: int
    max_new_tokens: int
    num_generations: int
    lr: float
    lora_r: int
    precision: str
    extra: dict[str, Any] = field(default_factory=dict)
    kernels: str = "none"


def llmtune_recipe(case: Case, s: Settings, out: Path) -> dict[str, Any]:
    fmt = {"cpt": "text", "sft": "messages", "rm": "pairs", "dpo": "pairs", "grpo": "prompts", "ppo": "prompts"}
    data_file = {"cpt": "cpt", "sft": "sft", "rm": "pairs", "dpo": "pairs", "grpo": "prompts", "ppo": "prompts"}
    finetuning: dict[str, Any] = {"method": case.method}
    if case.method in ("lora", "qlora"):
        finetuning |= {
            "lora_r": s.lora_r,
            "lora_alpha": 2 * s.lora_r,
            "lora_dropout": 0.0,
            "target_modules": "all-linear",
        }
    recipe: dict[str, Any] = {
        "stage": case.stage,
        "output_dir": str(out),
        "seed": 0,
        "model": {"path": s.model, "attn_implementation": "sdpa"},
        "finetuning": finetuning,
        "data": {
            "train": [{"path": s.files[data_file[case.stage]], "format": fmt[case.stage]}],
            "max_length": s.max_length,
            "eval_split": 0.0,
        },
        "train": {
            "max_steps": s.steps,
            "micro_batch_size": s.micro_batch,
            "grad_accum": 1,
            "lr": s.lr,
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "gradient_checkpointing": False,
            "log_every": 1,
            **({"kernels": s.kernels} if s.kernels != "none" else {}),
        },
        "precision": s.precision,
    }
    if case.stage == "cpt":
        recipe["data"]["packing"] = True
    if case.stage == "dpo":
        recipe["dpo"] = {"beta": 0.1, "loss": "sigmoid", "precompute_reference": case.precompute}
    if case.stage == "grpo":
        recipe["grpo"] = {
            "num_generations": s.num_generations, "beta": 0.0, "loss_type": "dapo", "epsilon": 0.2,
            "scale_rewards": "group", "num_iterations": 1, "mask_truncated_completions": False,
            "reward": {"rule": "exact_match"},
            # TRL's step: micro_batch completions = micro_batch / num_generations prompts
            "prompts_per_step": max(1, s.micro_batch // s.num_generations),
        }  # fmt: skip
    if case.stage == "ppo":
        recipe["ppo"] = {
            "memory": "shared", "rollout_batch_size": s.micro_batch, "ppo_epochs": 1, "critic_init": "policy",
            "reward": {"rule": "exact_match"}, "prompts_per_step": s.micro_batch,
        }  # fmt: skip
    if case.stage in ("grpo", "ppo"):
        recipe["generation"] = {"max_new_tokens": s.max_new_tokens, "temperature": 1.0, "top_p": 1.0}
    return recipe


def _child(cmd: list[str], env: dict[str, str], what: str) -> tuple[str, int]:
    """Run a child; return its stdout and its own peak resident memory in bytes (wait4). Fails loudly."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{err.read()[-4000:]}\n{out.read()[-2000:]}")
        return out.read(), usage.ru_maxrss * 1024  # Linux reports kilobytes


def run_llmtune(case: Case, s: Settings, work: Path, env: dict[str, str]) -> dict[str, Any]:
    import yaml

    out = work / f"llmtune-{case.name}"
    path = work / f"{case.name}.yaml"
    path.write_text(yaml.safe_dump(llmtune_recipe(case, s, out), sort_keys=False))
    counts_path = work / "counts.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "probe.py"), str(counts_path)]
    _, rss = _child([*cmd, "-m", "llmtune", "train", str(path), "--overwrite"], env, f"llmtune {case.name}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    counts = json.loads(counts_path.read_text())
    return _side(llmtune_times(records), counts, rss, s.steps)


def run_trl(case: Case, s: Settings, work: Path, env: dict[str, str]) -> dict[str, Any]:
    data_file = {"cpt": "cpt", "sft": "sft", "rm": "pairs", "dpo": "pairs", "grpo": "prompts"}[case.stage]
    args = {
        "stage": case.stage, "method": case.method, "model": s.model, "data": s.files[data_file],
        "micro_batch": s.micro_batch, "steps": s.steps, "lr": s.lr, "max_length": s.max_length,
        "precision": s.precision, "lora_r": s.lora_r, "precompute": case.precompute,
        "num_generations": s.num_generations, "max_new_tokens": s.max_new_tokens, "out": str(work / "trl"),
    }  # fmt: skip
    counts_path = work / "counts.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "probe.py"), str(counts_path)]
    out, rss = _child([*cmd, str(ROOT / "benchmarks" / "trl_driver.py"), json.dumps(args)], env, f"TRL {case.name}")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    return _side(result["times"], json.loads(counts_path.read_text()), rss, s.steps)


def _side(times: list[float], counts: dict[str, Any], rss: int, steps: int) -> dict[str, Any]:
    cuda = counts.pop("cuda_peak", None)
    return {"times": times, "counts": counts, "peak_bytes": cuda if cuda is not None else rss, "steps": steps}


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "trl", "peft")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    size = SIZES[a.size]
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device here")
    num_generations = 4
    rows = max(a.steps * size.micro_batch, 64)
    info = prepare(a.size, a.cache, rows)
    s = Settings(
        size=a.size, model=info["model"], files=info["files"], steps=a.steps, micro_batch=size.micro_batch,
        max_length=size.max_length, max_new_tokens=size.max_new_tokens, num_generations=num_generations,
        lr=1e-4 if a.size == "1b" else 1e-3, lora_r=16, precision=size.precision, kernels=a.kernels,
    )  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH", "")) if x)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(a.threads)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "size": a.size,
        "device": a.device,
        "versions": _versions(),
        "settings": {
            **asdict(size),
            "threads": a.threads,
            "steps": a.steps,
            "warmup": a.warmup,
            "repeats": a.repeats,
            "lr": s.lr,
        },
        "data": {k: info[k] for k in ("vocab", "tokenizer_size", "distinct_token_ids", "max_token_id")},
        "cases": [],
    }
    print(
        f"size {a.size} | {a.device} | vocab {size.vocab} (data: {info['distinct_token_ids']} distinct ids, "
        f"max {info['max_token_id']}) | micro-batch {size.micro_batch} | max_length {size.max_length} | "
        f"{a.steps} steps, median after {a.warmup} | {a.repeats} repeat(s) | {size.precision}"
        + (f" | {a.threads} thread(s) a process" if a.device == "cpu" else ""),
        flush=True,
    )
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for case in a.cases:
            ours_runs, trl_runs = [], []
            try:
                for _ in range(a.repeats):  # interleaved: llmtune, TRL, llmtune, TRL, ...
                    ours_runs.append(run_llmtune(case, s, work, env))
                    if case.trl is not None:
                        trl_runs.append(run_trl(case, s, work, env))
                        check_tokens(case.name, ours_runs[-1]["counts"], trl_runs[-1]["counts"])
            except (RuntimeError, TokenMismatch) as e:
                print(f"FAILED {case.name}: {e}", flush=True)
                failures.append(case.name)
                report["cases"].append({"case": case.name, "error": str(e)[-2000:]})
                continue
            result = case_result(
                case,
                side_summary(ours_runs, a.warmup),
                side_summary(trl_runs, a.warmup) if trl_runs else None,
                "cuda" if a.device == "cuda" else "rss",
            )
            report["cases"].append(result)
            print(table([result]).splitlines()[-1], flush=True)
            if a.json:
                a.json.write_text(json.dumps(report, indent=1))
    print()
    print(table([r for r in report["cases"] if "error" not in r]))
    for name in failures:
        print(f"{name}: FAILED (see the JSON / the message above)")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    if failures:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
