"""``llmtune data synth``: synthetic instruction data from a local model, written as an sft file.

- ``self-instruct`` (Wang et al., 2023): show the model a few instructions drawn from the seed tasks and
  the ones it made so far, ask for a new one, keep it when it passes the filters, then ask the model to
  answer it.
- ``evol`` (Evol-Instruct, Xu et al., 2023): rewrite instructions from the pool with one evolution drawn
  per attempt: in depth (add a constraint, deepen, concretise, ask for more reasoning steps, complicate
  the input) or in breadth (a new instruction of the same domain and shape, on another topic); keep the
  rewrite when it passes the filters (and is not a copy of its parent), then answer it.

The filters are Self-Instruct's: the instruction's length in words, its ROUGE-L similarity to every
instruction kept so far (seed tasks included) below ``similarity``, no heavily repeated 3-grams, no
leftovers of the prompt's own markers; the answer must be non-empty and must have ended (not cut at
``max_new_tokens``). Rows are alpaca JSONL (``instruction``, ``input``, ``output``, ``method``, and
``parent`` for evol), appended one at a time; ``OUT.state.json`` records the attempts made, so running the
same command again continues where a killed run stopped (attempt i always draws from seed ``seed + i``).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.errors import DataError, UserError

EVOLUTIONS = {
    "constraints": "Add one more constraint or requirement to it.",
    "deepen": "Make the inquiry it asks for deeper and broader.",
    "concretize": "Replace general concepts in it with more specific ones.",
    "reasoning": "Rewrite it so that answering it explicitly needs several steps of reasoning.",
    "complicate": "Make its input more complex (add data, a table, code or a longer text to work on).",
    "breadth": "Write a brand-new instruction of the same domain and shape, but on a rarer topic.",
}
MARKERS = ("#given prompt#", "#rewritten prompt#", "given prompt", "rewritten prompt", "task 1", "new task:")


@dataclass
class SynthConfig:
    method: str = "self-instruct"
    num: int = 100  # rows to write
    max_attempts: int | None = None  # default: 20 x num
    examples: int = 3  # instructions shown per self-instruct prompt
    similarity: float = 0.7  # ROUGE-L F1 bound to every kept instruction
    min_words: int = 3
    max_words: int = 150
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0


# --- filters (pure) -----------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two word lists (longest common subsequence)."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def repetitive(ws: list[str], n: int = 3, limit: float = 0.5) -> bool:
    """More than half of the word n-grams are repeats (a model looping)."""
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    return len(grams) >= 4 and len(set(grams)) / len(grams) < limit


def reject_reason(instruction: str, kept: list[list[str]], cfg: SynthConfig) -> str | None:
    """Why an instruction is not kept (None: keep it)."""
    ws = words(instruction)
    if len(ws) < cfg.min_words:
        return "too short"
    if len(ws) > cfg.max_words:
        return "too long"
    low = instruction.lower()
    if any(m in low for m in MARKERS):
        return "holds the prompt's markers"
    if repetitive(ws):
        return "repetitive"
    if any(rouge_l(ws, k) >= cfg.similarity for k in kept):
        return "too similar to a kept instruction"
    return None


# --- prompts -----------------------------------------------------------------------------------------


def self_instruct_prompt(shown: list[str]) -> str:
    lines = ["Come up with a new, different task instruction. Here are some examples:", ""]
    lines += [f"Task {i}: {t}" for i, t in enumerate(shown, start=1)]
    lines += ["", "Reply with the new task instruction only."]
    return "\n".join(lines)


def evol_prompt(parent: str, evolution: str) -> str:
    return (
        "I want you to act as a prompt rewriter. Rewrite the given prompt into a harder version that a person "
        f"can still understand and answer. {EVOLUTIONS[evolution]} Reply with the rewritten prompt only.\n\n"
        f"#Given Prompt#:\n{parent}\n\n#Rewritten Prompt#:"
    )


def clean(text: str) -> str:
    """The model's reply as one instruction: stripped, without a leading 'Task N:' or quotes."""
    text = text.strip()
    text = re.sub(r"^(task\s*\d*\s*[:.]|instruction\s*[:.]|#rewritten prompt#\s*:?)\s*", "", text, flags=re.I)
    return text.strip().strip('"').strip()


# --- the loop ----------------------------------------------------------------------------------------


def read_seeds(path: str) -> list[str]:
    """The first user turn of every usable row of an sft file (alpaca, sharegpt, messages) or a prompts file."""
    from llmtune.data.formats import RowError, detect_format, to_conversation
    from llmtune.data.prompts import to_prompt
    from llmtune.data.sources import read_rows
    from llmtune.recipe.data import DataSource

    rows = [r for r in read_rows(DataSource(path=path)) if r.data is not None]
    if not rows:
        raise DataError(f"--seeds {path}: no readable row", hint="give an sft file (alpaca, sharegpt, messages)")
    try:
        fmt = detect_format([r.data for r in rows[:50]])
    except DataError:
        fmt = "prompts"  # {prompt} / {question} rows; to_prompt refuses the rest row by row
    out: list[str] = []
    for r in rows:
        try:
            if fmt == "prompts":
                msgs = to_prompt(r.data).messages
            else:
                msgs = to_conversation(r.data, fmt).messages
        except (RowError, ValueError):
            continue
        user = next((m["content"] for m in msgs if m["role"] == "user" and str(m["content"]).strip()), None)
        if user:
            out.append(str(user).strip())
    if not out:
        raise DataError(f"--seeds {path}: no row has a user instruction ({fmt} rows)", hint="check the file")
    return list(dict.fromkeys(out))


class Synthesizer:
    """Writes cfg.num rows to out (appending to what an earlier run wrote), asking ``complete`` for texts.
    complete(list of user messages, seed) -> list of (reply, ended)."""

    def __init__(
        self,
        complete: Callable[[list[str], int], list[tuple[str, bool]]],
        seeds: list[str],
        out: Path,
        cfg: SynthConfig,
    ) -> None:
        if cfg.method not in ("self-instruct", "evol"):
            raise UserError(f"--method {cfg.method!r} is not one of self-instruct, evol")
        self.complete, self.seeds, self.out, self.cfg = complete, seeds, out, cfg
        self.state_path = out.with_name(out.name + ".state.json")
        self.rows: list[dict[str, Any]] = []
        self.attempts = 0
        self.rejected: dict[str, int] = {}
        if out.exists():
            for n, line in enumerate(out.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise DataError(
                            f"{out} line {n} is not JSON: it is not a file data synth wrote",
                            hint="choose another --out, or remove the file to start again",
                        ) from None
            if self.state_path.is_file():
                state = json.loads(self.state_path.read_text())
                self.attempts, self.rejected = int(state["attempts"]), dict(state["rejected"])
        self.kept = [words(t) for t in seeds] + [words(r["instruction"]) for r in self.rows]
        self.pool = list(seeds) + [r["instruction"] for r in self.rows]

    def run(self, on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        cfg = self.cfg
        limit = cfg.max_attempts or 20 * cfg.num
        while len(self.rows) < cfg.num and self.attempts < limit:
            n = min(cfg.batch_size, limit - self.attempts)
            rngs = [random.Random(cfg.seed * 1000003 + self.attempts + i) for i in range(n)]
            asks, parents, evolutions = [], [], []
            for rng in rngs:
                if cfg.method == "self-instruct":
                    asks.append(self_instruct_prompt(rng.sample(self.pool, min(cfg.examples, len(self.pool)))))
                    parents.append(None)
                    evolutions.append(None)
                else:
                    parent, evolution = rng.choice(self.pool), rng.choice(sorted(EVOLUTIONS))
                    asks.append(evol_prompt(parent, evolution))
                    parents.append(parent)
                    evolutions.append(evolution)
            made = self.complete(asks, cfg.seed + self.attempts)
            candidates = []
            for (text, _ended), parent, evolution in zip(made, parents, evolutions, strict=True):
                instruction = clean(text)
                why = reject_reason(instruction, self.kept, cfg)
                if why is None and parent is not None and rouge_l(words(instruction), words(parent)) >= 0.95:
                    why = "a copy of its parent"
                if why is None and any(rouge_l(words(instruction), words(c[0])) >= cfg.similarity for c in candidates):
                    why = "too similar to a kept instruction"
                if why is not None:
                    self.rejected[why] = self.rejected.get(why, 0) + 1
                    continue
                candidates.append((instruction, parent, evolution))
            answers = self.complete([c[0] for c in candidates], cfg.seed + self.attempts + 500009) if candidates else []
            self.attempts += n
            with open(self.out, "a", encoding="utf-8") as f:
                for (instruction, parent, evolution), (answer, ended) in zip(candidates, answers, strict=True):
                    if len(self.rows) >= cfg.num:
                        break
                    why = "empty answer" if not answer.strip() else None if ended else "answer cut off"
                    if why is not None:
                        self.rejected[why] = self.rejected.get(why, 0) + 1
                        continue
                    row: dict[str, Any] = {"instruction": instruction, "input": "", "output": answer.strip()}
                    row["method"] = cfg.method if evolution is None else f"evol:{evolution}"
                    if parent is not None:
                        row["parent"] = parent
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    self.rows.append(row)
                    self.kept.append(words(instruction))
                    self.pool.append(instruction)
                    if on_row:
                        on_row(row)
                f.flush()
                os.fsync(f.fileno())
            tmp = self.state_path.with_name(self.state_path.name + ".tmp")
            tmp.write_text(json.dumps({"attempts": self.attempts, "rejected": self.rejected}))
            os.replace(
                tmp, self.state_path
            )  # after the rows it counts: a kill between leaves them counted twice at most
        return {"rows": len(self.rows), "attempts": self.attempts, "rejected": dict(self.rejected)}


def model_completer(model: str, adapter: str | None, cfg: SynthConfig, chat_template: str | None, console: Any):
    """complete() for a local causal LM: each ask is a user turn rendered with the chat template; sampled."""
    from llmtune.data.chat import resolve_chat_template
    from llmtune.data.prompts import render_prompt
    from llmtune.generation.sample import end_tokens, generate
    from llmtune.model.gguf import resolve_gguf
    from llmtune.model.resolve import load_causal_lm, pick_device, pick_dtype

    device = pick_device("auto")
    model = resolve_gguf(model, console)
    loaded = load_causal_lm(model, adapter, pick_dtype("auto", device), device, "--model")
    tok = loaded.tokenizer
    template = resolve_chat_template(tok, chat_template, required=False)
    stops = end_tokens(loaded.model, tok, template)
    limit = getattr(loaded.model.config, "max_position_embeddings", None) or 2048

    def complete(asks: list[str], seed: int) -> list[tuple[str, bool]]:
        texts = [render_prompt(tok, template, [{"role": "user", "content": a}]) for a in asks]
        budget = max(8, limit - cfg.max_new_tokens)
        ids = [tok(t, add_special_tokens=template is None)["input_ids"][-budget:] for t in texts]
        outs = generate(
            loaded.model, tok, ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_p=cfg.top_p, batch_size=cfg.batch_size, seed=seed, device=device, stops=stops,
        )  # fmt: skip
        return [(tok.decode(o, skip_special_tokens=True), ended) for o, ended in outs]

    return complete


def synth_command(
    model: str,
    seeds: str,
    out: Path,
    cfg: SynthConfig,
    adapter: str | None,
    chat_template: str | None,
    err: Any,
) -> None:
    """``llmtune data synth``: the options checked, the model loaded, rows written to ``out`` (a rerun
    continues it) with a status line, and a summary printed."""
    from llmtune.model.hub import check_model_options
    from llmtune.paths import check_path_lengths
    from llmtune.runtime import quiet_libraries

    check_path_lengths(("--out", out), ("--seeds", seeds), ("--model", model))
    check_model_options([("--model", model)])
    check_model_options([("--adapter", adapter)], hub_ok=False)
    if not 0 < cfg.similarity <= 1:
        raise UserError(f"--similarity {cfg.similarity} must be in (0, 1]")
    if cfg.method not in ("self-instruct", "evol"):
        raise UserError(f"--method {cfg.method!r} is not one of self-instruct, evol")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory", hint="name a .jsonl file")
    tasks = read_seeds(seeds)
    quiet_libraries(loading_bars=False)
    with err.status(f"loading {model}"):
        complete = model_completer(model, adapter, cfg, chat_template, err)
    out.parent.mkdir(parents=True, exist_ok=True)
    synth = Synthesizer(complete, tasks, out, cfg)
    method, num = cfg.method, cfg.num
    if synth.rows:
        err.print(f"{out} holds {len(synth.rows)} rows from an earlier run ({synth.attempts} attempts): continuing")
    with err.status(f"{method}: {len(synth.rows)} / {num} rows") as status:
        result = synth.run(lambda row: status.update(f"{method}: {len(synth.rows)} / {num} rows"))
    rejected = ", ".join(f"{why} {n}" for why, n in sorted(result["rejected"].items(), key=lambda kv: -kv[1]))
    print(
        f"{result['rows']} rows in {out} after {result['attempts']} attempts"
        + (f"; rejected: {rejected}" if rejected else "")
    )
    if result["rows"] == 0:
        raise UserError(
            f"no generated row passed the filters in {result['attempts']} attempts",
            hint="use a stronger (instruction-tuned) model, raise --max-new-tokens or --max-attempts, or loosen "
            "--similarity / --min-words",
        )
    if result["rows"] < num:
        print(f"note: {num - result['rows']} rows short of --num: the attempts ran out (--max-attempts)")
