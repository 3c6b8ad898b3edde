"""``llmtune data revise``: critique-then-revise with a list of principles (Constitutional AI's supervised phase,
Bai et al., 2022), written as sft rows and dpo pairs.

For each input row (a prompt, with the reply to improve; a row without a reply gets one from the model
first), the model is asked, in one conversation that goes on in its chat template::

    user: <prompt>                     assistant: <reply>
    user: <the principle's critique request>      assistant: <critique>
    user: <the principle's revision request>      assistant: <revision>

``--rounds N`` repeats the critique and revision on the newest revision, each round with a principle drawn
for the row (seeded: row i, round k always draws the same). Principles are a built-in list
(:data:`PRINCIPLES`), or ``--principles FILE``: a .txt file with one principle per line (it fills both
requests: "Identify specific ways in which the reply fails to <line>" and "Rewrite the reply so that it
<line>"), or a JSON / JSONL / YAML list of such lines or of ``{name, critique, revision}`` objects.

Kept: a revision that is not empty, ended (not cut at ``--max-new-tokens``) and differs from the reply it
revises and from the critique it follows (small models echo their critique) after whitespace is collapsed
and a leading "Revision:" is dropped; an empty critique, an empty or
cut initial reply are dropped too, each reason counted. Written: ``--out`` sft rows ``{messages: prompt +
revision, row, principles}`` and ``--pairs-out`` dpo pairs ``{prompt, chosen: revision, rejected: original,
row}``, as they are made; resumable like ``data label`` (llmtune.commands.resumable).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.commands.resumable import ResumableOutputs, run_with_status
from llmtune.errors import DataError, UserError


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str


def _principle(name: str, rule: str) -> Principle:
    return Principle(
        name,
        f"Identify specific ways in which your last reply fails to {rule}",
        f"Rewrite your last reply so that it does {rule} Reply with the rewritten reply only.",
    )


PRINCIPLES = (
    Principle(
        "harmless",
        "Identify specific ways in which your last reply is harmful, unethical, dangerous or illegal.",
        "Rewrite your last reply to remove anything harmful, unethical, dangerous or illegal, while still "
        "helping as far as is safe. Reply with the rewritten reply only.",
    ),
    Principle(
        "helpful",
        "Identify specific ways in which your last reply fails to answer the question that was asked, or leaves "
        "out something the user needs.",
        "Rewrite your last reply so that it answers the question that was asked fully and directly. Reply with "
        "the rewritten reply only.",
    ),
    Principle(
        "correct",
        "Identify any statement in your last reply that is false, misleading or unsupported.",
        "Rewrite your last reply so that every statement in it is correct, and say when you are unsure. Reply "
        "with the rewritten reply only.",
    ),
    Principle(
        "honest",
        "Identify ways in which your last reply claims more certainty, knowledge or ability than it has.",
        "Rewrite your last reply so that it is honest about what it knows and cannot do. Reply with the "
        "rewritten reply only.",
    ),
    Principle(
        "clear",
        "Identify ways in which your last reply is unclear, disorganised, repetitive or longer than it needs to be.",
        "Rewrite your last reply so that it is clear, well organised and concise. Reply with the rewritten reply only.",
    ),
    Principle(
        "respectful",
        "Identify anything in your last reply that is rude, condescending, biased or stereotyping.",
        "Rewrite your last reply so that it is polite and respectful and free of bias. Reply with the rewritten "
        "reply only.",
    ),
)


def read_principles(path: str | None) -> list[Principle]:
    """The built-in PRINCIPLES (None), or the file's (see the module docstring)."""
    if path is None:
        return list(PRINCIPLES)
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"--principles {path} does not exist",
            hint="give a .txt file (one principle per line) or a JSON / YAML list",
        )
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json", ".yaml", ".yml"):
        raise UserError(
            f"--principles {path}: unknown file type {suffix or '(none)'}", hint="use .txt, .json, .jsonl or .yaml"
        )
    try:
        if suffix == ".txt":
            items: Any = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        elif suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif suffix == ".json":
            items = json.loads(text)
        else:
            import yaml

            items = yaml.safe_load(text)
    except Exception as e:  # a JSON or YAML syntax error
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"--principles {path} does not parse: {first}", hint="fix the file's syntax") from None
    if not isinstance(items, list) or not items:
        raise DataError(
            f"--principles {path} holds no principle",
            hint="write a list: one principle per line (.txt) or a JSON / YAML list",
        )
    out = []
    for n, item in enumerate(items, start=1):
        if isinstance(item, str) and item.strip():
            rule = item.strip()
            out.append(_principle(f"{n}", rule if rule.endswith((".", "!", "?")) else rule + "."))
        elif isinstance(item, dict) and isinstance(item.get("critique"), str) and isinstance(item.get("revision"), str):
            out.append(Principle(str(item.get("name") or n), item["critique"].strip(), item["revision"].strip()))
        else:
            raise DataError(
                f"--principles {path}: item {n} is neither a principle (text) nor an object with critique and revision",
                hint='write e.g. "be honest about uncertainty", or {"name": ..., "critique": ..., "revision": ...}',
            )
    return out


def clean_revision(text: str) -> str:
    """The revision without a leading "Revision:" / "Rewritten reply:" / "Here is the rewritten reply:"."""
    t = text.strip()
    t = re.sub(r"(?is)^(?:here(?:'s| is) (?:the|my) (?:rewritten|revised) (?:reply|response)[^:\n]*:|"
               r"(?:rewritten|revised) (?:reply|response)\s*:|revision\s*:)\s*", "", t)  # fmt: skip
    return t.strip()


def squash(text: str) -> str:
    return " ".join(text.split())


@dataclass
class ReviseConfig:
    rounds: int = 1
    batch_size: int = 8  # input rows per batch (and per commit)
    seed: int = 0
    max_rows: int | None = None


@dataclass
class Item:
    row: int
    messages: list[dict]  # the prompt, ending with a user turn
    reply: str | None  # the reply to revise (None: the model writes one first)


def read_items(path: str, on_drop: Callable[[str, str], None]) -> list[Item]:
    """Rows with a prompt, and the reply to revise when they have one: an sft row's last assistant turn,
    ``response`` / ``reply`` / ``output`` / ``completion``, or ``answer``; prompts-only rows get a reply from the model."""
    from llmtune.data.formats import RowError
    from llmtune.data.prompts import to_prompt
    from llmtune.data.sources import read_rows
    from llmtune.recipe.data import DataSource

    items = []
    for r in read_rows(DataSource(path=path)):
        if r.data is None:
            on_drop("unreadable row", r.error or r.where)
            continue
        data = r.data
        reply = next((data[k] for k in ("response", "reply", "completion") if isinstance(data.get(k), str)), None)
        try:
            p = to_prompt({k: v for k, v in data.items() if k not in ("response", "reply", "completion")})
        except (RowError, ValueError):
            on_drop("no prompt", r.where)
            continue
        reply = reply if reply is not None else p.answer  # alpaca output, messages' reply, answer
        items.append(Item(r.index, p.messages, reply if reply is not None and reply.strip() else None))
    if not items:
        raise DataError(
            f"{path}: no row has a prompt",
            hint='give sft rows (alpaca, messages, sharegpt) or prompts ({"prompt": ...}, optionally with a '
            '"response" to revise)',
        )
    return items


class Reviser:
    """Critique-then-revise for ``items`` with ``complete`` (conversations, seed) -> (reply, ended) per
    conversation, appending to ``out`` (sft rows) and ``pairs_out`` (dpo pairs)."""

    def __init__(
        self,
        complete: Callable[..., list[tuple[str, bool]]],
        items: list[Item],
        principles: list[Principle],
        out: Path,
        pairs_out: Path,
        cfg: ReviseConfig,
    ) -> None:
        if not principles:
            raise UserError("no principles to revise by")
        self.complete, self.items, self.principles, self.cfg = complete, items, principles, cfg
        self.outputs = ResumableOutputs({"sft": out, "pairs": pairs_out}, "data revise")

    def todo(self) -> list[Item]:
        items = [it for it in self.items if it.row >= self.outputs.done]
        if self.cfg.max_rows is not None:
            done = sum(1 for it in self.items if it.row < self.outputs.done)
            items = items[: max(0, self.cfg.max_rows - done)]
        return items

    def principle(self, row: int, k: int) -> Principle:
        return random.Random(self.cfg.seed * 1000003 + row * 31 + k).choice(self.principles)

    def run(self, on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
        todo = self.todo()
        for start in range(0, len(todo), self.cfg.batch_size):
            batch = todo[start : start + self.cfg.batch_size]
            sft, pairs = self._revise(batch)
            self.outputs.commit({"sft": sft, "pairs": pairs}, batch[-1].row + 1)
            if on_batch is not None:
                on_batch(len(batch))
        return {
            "sft": self.outputs.written["sft"],
            "pairs": self.outputs.written["pairs"],
            "done": self.outputs.done,
            "dropped": dict(self.outputs.dropped),
        }

    def _revise(self, batch: list[Item]) -> tuple[list[dict], list[dict]]:
        seed = self.cfg.seed + batch[0].row
        convs: dict[int, list[dict]] = {}
        original: dict[int, str] = {}
        alive = list(batch)
        need = [it for it in alive if it.reply is None]
        if need:  # a first reply from the model
            made = self.complete([it.messages for it in need], seed)
            for it, (text, ended) in zip(need, made, strict=True):
                if not text.strip() or not ended:
                    self.outputs.drop("empty reply" if not text.strip() else "reply cut off")
                    alive.remove(it)
                else:
                    original[it.row] = text.strip()
        for it in alive:
            original.setdefault(it.row, (it.reply or "").strip())
            convs[it.row] = [*it.messages, {"role": "assistant", "content": original[it.row]}]
        used: dict[int, list[str]] = {it.row: [] for it in alive}
        current = dict(original)
        done: list[Item] = []  # rows revised in an earlier round whose later round failed: they keep that revision
        for k in range(self.cfg.rounds):
            if not alive:
                break
            ps = {it.row: self.principle(it.row, k) for it in alive}
            asks = [[*convs[it.row], {"role": "user", "content": ps[it.row].critique}] for it in alive]
            critiques = self.complete(asks, seed + 7919 * (2 * k + 1))
            keep = []
            for it, ask, (text, _ended) in zip(list(alive), asks, critiques, strict=True):
                if text.strip():
                    convs[it.row] = [*ask, {"role": "assistant", "content": text.strip()}]
                    keep.append(it)
                elif used[it.row]:
                    done.append(it)
                else:
                    self.outputs.drop("empty critique")
            alive = keep
            if not alive:
                break
            asks = [[*convs[it.row], {"role": "user", "content": ps[it.row].revision}] for it in alive]
            revisions = self.complete(asks, seed + 7919 * (2 * k + 2))
            keep = []
            for it, ask, (text, ended) in zip(list(alive), asks, revisions, strict=True):
                revised = clean_revision(text)
                why = (
                    "empty revision" if not revised
                    else "revision cut off" if not ended
                    else "unchanged" if squash(revised) == squash(current[it.row])
                    else "a copy of the critique" if squash(revised) == squash(ask[-2]["content"])
                    else None
                )  # fmt: skip
                if why is None:
                    convs[it.row] = [*ask, {"role": "assistant", "content": revised}]
                    current[it.row] = revised
                    used[it.row].append(ps[it.row].name)
                    keep.append(it)
                elif used[it.row]:
                    done.append(it)
                else:
                    self.outputs.drop(why)
            alive = keep
        alive = sorted(alive + done, key=lambda it: it.row)
        sft, pairs = [], []
        for it in alive:
            revised = current[it.row]
            if squash(revised) == squash(original[it.row]):  # a later round went back to the original
                self.outputs.drop("unchanged")
                continue
            sft.append(
                {
                    "messages": [*it.messages, {"role": "assistant", "content": revised}],
                    "row": it.row,
                    "principles": used[it.row],
                }
            )
            pairs.append({"prompt": it.messages, "chosen": revised, "rejected": original[it.row], "row": it.row})
        return sft, pairs


def revise_command(
    data: str,
    out: Path,
    pairs_out: Path,
    model: str,
    *,
    cfg: ReviseConfig,
    principles: str | None,
    adapter: str | None,
    max_new_tokens: int,
    temperature: float,
    generation_batch: int,
    chat_template: str | None,
    console: Any,
) -> dict[str, Any]:
    """The command: checks (before the model loads), reads rows and principles, revises what is not done yet,
    prints the summary. A run that kept no revision at all is a UserError (exit 2) naming the drops."""
    from llmtune.model.hub import check_model_options
    from llmtune.paths import check_path_length, looks_local, same_path
    from llmtune.rewards.judge import chat_completer, require_judge_model

    for key, value in (("--out", out), ("--pairs-out", pairs_out), ("--data", data), ("--model", model)):
        check_path_length(key, str(value))
    check_model_options([("--adapter", adapter)], hub_ok=False)
    from llmtune.runtime import quiet_libraries

    quiet_libraries(loading_bars=False)

    for key, path in (("--out", out), ("--pairs-out", pairs_out)):
        if path.is_dir():
            raise UserError(f"{key} {path} is a directory", hint="name a .jsonl file")
    if same_path(str(out), str(pairs_out)):
        raise UserError("--out and --pairs-out name the same file", hint="give the sft rows and the pairs a file each")
    if looks_local(model) and not Path(model).expanduser().exists():
        raise UserError(f"--model {model} does not exist", hint="give an instruct model directory or .gguf file")
    rules = read_principles(principles)
    require_judge_model(model, "--model")
    first_drops: dict[str, str] = {}
    read_drops: dict[str, int] = {}

    def on_drop(why: str, where: str) -> None:
        read_drops[why] = read_drops.get(why, 0) + 1
        first_drops.setdefault(why, where)

    items = read_items(data, on_drop)
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs_out.parent.mkdir(parents=True, exist_ok=True)
    reviser = Reviser(lambda *a: [], items, rules, out, pairs_out, cfg)
    todo = reviser.todo()
    if reviser.outputs.resumed:
        console.print(
            f"{out} holds {reviser.outputs.written['sft']} revisions from an earlier run ({reviser.outputs.done} "
            "input rows done): continuing"
        )
    elif read_drops:
        for why, n in read_drops.items():
            reviser.outputs.drop(why, n)
    for why, where in first_drops.items():
        console.print(f"note: {read_drops[why]} x {why} (first: {where})")
    if todo:
        from llmtune.model.resolve import pick_device

        with console.status(f"loading {model}"):
            complete, close = chat_completer(
                model, adapter=adapter, max_new_tokens=max_new_tokens, batch_size=generation_batch,
                chat_template=chat_template, device=pick_device("auto"), dtype="auto", what="--model",
                temperature=temperature, console=console,
            )  # fmt: skip
        try:
            reviser.complete = complete
            result = run_with_status(
                console, "revising", len(todo), reviser.run, lambda: f"{reviser.outputs.written['sft']} kept"
            )
        finally:
            close()
    else:
        result = reviser.run()
    dropped = reviser.outputs.dropped_text()
    print(
        f"{result['sft']} revisions in {out} and {result['pairs']} pairs in {pairs_out} from {result['done']} input "
        f"rows ({len(rules)} principles, {cfg.rounds} round{'s' if cfg.rounds > 1 else ''})"
        + (f"; dropped: {dropped}" if dropped else "")
    )
    if result["sft"] == 0:
        raise UserError(
            f"no revision was kept ({dropped or 'nothing was revised'})",
            hint="use a stronger instruct model, raise --max-new-tokens if revisions are cut off, or give "
            "principles the model can act on (--principles)",
        )
    return result
