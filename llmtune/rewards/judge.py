"""Judge models (RLAIF): an instruct causal LM reads a reply with a rubric and scores it, or picks the better
of two replies.

- **pointwise** (a reward source, ``reward.judge``): the rubric (``{prompt}``, ``{reply}``, ``{low}``,
  ``{high}``) is sent as one user turn in the judge's chat template, the judge's reply is started with
  ``Score:`` (``prefill``: small judges then give the number at once instead of restating the question), it
  answers greedily in at most ``max_new_tokens`` tokens, and :func:`parse_score` reads the score: the number after the last ``Score:``
  (or ``Rating:``), else a reply that starts with a number, else the only number in it (``7/10`` and
  ``7 out of 10`` count as 7). A judgement with no such number, or one outside ``[low, high]``, is
  *unparsable*: counted (``reward/<judge>/unparsable`` per step) and scored by the ``unparsable`` policy
  (``mean``: the mean of the call's parsed scores, so that it pushes the policy neither way; or a fixed
  number). The score is reported as ``(s - low) / (high - low)`` in [0, 1] with ``unit_scale`` (default),
  else as the judge gave it.
- **pairwise** (``llmtune data label``, ``llmtune eval --task compare --judge``, and a reward source with
  ``mode: pairwise``, which compares each reply with its row's ``answer``: 1 won, 0 lost, 0.5 a tie or an
  inconsistent pair): the judge sees reply A and
  reply B and answers ``Verdict: A``, ``B`` or ``tie`` (:func:`parse_verdict`; the reply started with
  ``Verdict:`` when prefilled). Each pair is asked in both
  orders, and :func:`combine_swapped` keeps a verdict only when both orders agree: a judge that prefers
  whatever comes first (position bias) gives *inconsistent* verdicts, not a false preference.

Judgements are cached by (prompt, reply) (pairwise: by the prompt and the two replies in the order shown):
greedy decoding makes them deterministic, so a reply seen again (a repeated completion in a group, the
second order of a swapped pair already asked) costs no generation. The cache holds the last
``CACHE_ENTRIES`` judgements of a process.

The judge runs whole on each process (it is not partitioned under ZeRO-3) and in inference mode only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.errors import DataError, RecipeError, UserError

POINTWISE_RUBRIC = """Please act as an impartial judge and rate the quality of the assistant's reply to the \
conversation below. Consider whether it is helpful, correct, relevant and clear. Do not let its length sway you.

[Conversation]
{prompt}

[Assistant's reply]
{reply}

Rate the reply on a scale of {low} to {high}, where {low} is the worst and {high} is the best. Answer with \
"Score:" followed by one number from {low} to {high}, and nothing else."""

PAIRWISE_RUBRIC = """Please act as an impartial judge and compare two replies of an assistant to the \
conversation below. Choose the one that is more helpful, correct, relevant and clear. The order of the \
replies must not sway you, and neither must their length.

[Conversation]
{prompt}

[Reply A]
{reply_a}

[Reply B]
{reply_b}

Which reply is better? Answer with "Verdict:" followed by A (reply A is better), B (reply B is better) or tie, \
and nothing else."""

CACHE_ENTRIES = 200_000
PREFILL = {"pointwise": "Score:", "pairwise": "Verdict:"}
UNPARSABLE = ("empty", "no score", "ambiguous", "out of range", "no verdict")


# --- rubrics (pure) ---------------------------------------------------------------------------------------


def conversation_text(messages: list[dict]) -> str:
    """The prompt turns as the judge reads them: a lone user turn as its text, else ``Role: text`` lines."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return str(messages[0]["content"])
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def read_rubric(rubric: str | None, pairwise: bool = False, what: str = "rubric") -> str:
    """The rubric text: the built-in one (None), the text given, or the file it names (.txt / .md). Checks the
    placeholders the mode needs (pointwise {reply}; pairwise {reply_a} and {reply_b})."""
    if rubric is None:
        return PAIRWISE_RUBRIC if pairwise else POINTWISE_RUBRIC
    text = rubric
    if rubric.strip().lower().endswith((".txt", ".md")) and "\n" not in rubric.strip():
        path = Path(rubric.strip()).expanduser()
        if not path.is_file():
            raise UserError(f"{what} {rubric} does not exist", hint="give the path of a text file holding the rubric")
        text = path.read_text(encoding="utf-8")
    need = ("{reply_a}", "{reply_b}") if pairwise else ("{reply}",)
    missing = [p for p in need if p not in text]
    if missing:
        example = "{prompt}, {reply_a} and {reply_b}" if pairwise else "{prompt} and {reply}"
        raise UserError(
            f"{what} has no {' / '.join(missing)} placeholder: the judge would never see the "
            + ("replies" if pairwise else "reply"),
            hint=f"write {example} where they go in the rubric",
        )
    return text


def fill_pointwise(rubric: str, prompt: list[dict], reply: str, low: float, high: float) -> str:
    """The rubric with its placeholders replaced (plain replacement: braces in the texts stay as they are)."""
    return (
        rubric.replace("{low}", _number(low))
        .replace("{high}", _number(high))
        .replace("{prompt}", conversation_text(prompt))
        .replace("{reply}", reply)
    )


def fill_pairwise(rubric: str, prompt: list[dict], reply_a: str, reply_b: str) -> str:
    return (
        rubric.replace("{prompt}", conversation_text(prompt))
        .replace("{reply_a}", reply_a)
        .replace("{reply_b}", reply_b)
    )


# --- parsing (pure) ---------------------------------------------------------------------------------------

_NUM = r"[-+]?\d+(?:\.\d+)?"
_LABELLED = re.compile(rf"(?i)\b(?:score|rating)\b[^\d\n+-]{{0,12}}?({_NUM})")
_LEADING = re.compile(rf"^[\s*#\"'\[(]*({_NUM})(?!\s*[-:]\s*\d)")


def parse_score(text: str, low: float, high: float) -> tuple[float | None, str | None]:
    """(score, None), or (None, why it is unparsable: empty, no score, ambiguous, out of range).

    The number after the last "Score:" / "Rating:", else a reply that starts with a number, else the one
    distinct number in the reply; "N/high" and "N out of high" count as N."""
    t = text.strip()
    if not t:
        return None, "empty"
    hi = re.escape(_number(high))
    t = re.sub(rf"({_NUM})\s*(?:/|out of)\s*{hi}(?:\.0+)?\b", r"\1", t, flags=re.I)
    labelled = _LABELLED.findall(t)
    if labelled:
        value = float(labelled[-1])
    elif (m := _LEADING.match(t)) is not None:
        value = float(m.group(1))
    else:
        found = {float(x) for x in re.findall(rf"(?<![\w.]){_NUM}(?![\w.]*\d)", t)}
        if not found:
            return None, "no score"
        if len(found) > 1:
            return None, "ambiguous"
        value = found.pop()
    if not low <= value <= high:
        return None, "out of range"
    return value, None


_VERDICT = re.compile(r"(?i)\bverdict\b\W{0,6}(a|b|tie)\b")
_BARE = re.compile(r"(?i)^[\s*#\"'\[(]*(?:reply\s+|response\s+|assistant\s+)?(a|b|tie)(?=[\s.,;:!*\])\"']*$|\s*\n)")
_NAMED = re.compile(r"(?i)\b(?:reply|response|assistant)\s+([AB])\b")


def parse_verdict(text: str) -> tuple[str | None, str | None]:
    """("A" | "B" | "tie", None), or (None, empty / no verdict).

    The word after the last "Verdict:", else a reply that starts with A, B or tie (also "[[A]]", "Reply B"),
    else the one reply named ("Reply A is better")."""
    t = text.strip()
    if not t:
        return None, "empty"
    found = _VERDICT.findall(t)
    if found:
        v = found[-1]
    elif (m := _BARE.match(t)) is not None:
        v = m.group(1)
    else:
        named = {x.upper() for x in _NAMED.findall(t)}
        if len(named) != 1:
            return None, "no verdict"
        v = named.pop()
    return ("tie" if v.lower() == "tie" else v.upper()), None


def combine_swapped(first: str | None, second: str | None) -> str:
    """The outcome of a pair asked in both orders: ``first`` is the verdict with x shown as A and y as B,
    ``second`` with y as A and x as B. "x", "y" or "tie" when the two agree; "inconsistent" when they do not
    (position bias: e.g. "A" both times); "unparsable" when either verdict is None."""
    if first is None or second is None:
        return "unparsable"
    # the second order's verdict read back in the first order's frame: its A is y, its B is x
    a = {"A": "x", "B": "y", "tie": "tie"}[first]
    b = {"A": "y", "B": "x", "tie": "tie"}[second]
    return a if a == b else "inconsistent"


def unit(score: float, low: float, high: float) -> float:
    """(s - low) / (high - low): the scale mapped onto [0, 1]."""
    return (score - low) / (high - low)


# --- the cache --------------------------------------------------------------------------------------------


class JudgeCache:
    """Judgements by key, the oldest dropped past ``size`` entries; counts hits and misses."""

    def __init__(self, size: int = CACHE_ENTRIES) -> None:
        self.size, self.hits, self.misses = size, 0, 0
        self._items: OrderedDict[str, Any] = OrderedDict()

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> Any | None:
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        return None

    def put(self, key: str, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


# --- the judge --------------------------------------------------------------------------------------------


@dataclass
class Judgement:
    """One pointwise judgement: the judge's text, its score on the judge's scale (None: unparsable), why not."""

    text: str
    score: float | None
    reason: str | None = None


@dataclass
class Comparison:
    """One pair asked in both orders: the two texts, their verdicts and the outcome ("x", "y", "tie",
    "inconsistent" or "unparsable"; x is the first reply given)."""

    texts: tuple[str, str]
    verdicts: tuple[str | None, str | None]
    outcome: str


# (rubric texts, prefill) -> the judge's replies, each starting with the prefill (greedy, in order)
Complete = Callable[[list[str], str], list[str]]


class Judge:
    """Pointwise scores and swapped pairwise verdicts from ``complete`` (a judge model's greedy replies to
    filled rubrics; :func:`model_completer`), cached (see the module docstring)."""

    def __init__(
        self,
        complete: Complete,
        *,
        rubric: str | None = None,
        pairwise_rubric: str | None = None,
        scale: tuple[float, float] = (1.0, 10.0),
        cache: JudgeCache | None = None,
        prefill: bool = True,
    ) -> None:
        self.complete = complete
        self.prefill = prefill
        self.rubric = read_rubric(rubric, pairwise=False) if rubric is not None else POINTWISE_RUBRIC
        self.pairwise_rubric = (
            read_rubric(pairwise_rubric, pairwise=True) if pairwise_rubric is not None else PAIRWISE_RUBRIC
        )
        self.low, self.high = float(scale[0]), float(scale[1])
        self.cache = cache if cache is not None else JudgeCache()
        self.requested = 0  # judgements asked for
        self.generated = 0  # judgements the judge model wrote (the rest came from the cache, or were repeats)

    def _ask(self, keys: list[str], texts: list[str], parse: Callable[[str], Any], mode: str) -> list[Any]:
        """Cached answers for keys, asking the judge once for each key not cached (duplicates asked once)."""
        out: list[Any] = [self.cache.get(k) for k in keys]
        todo: dict[str, str] = {}
        for k, t, o in zip(keys, texts, out, strict=True):
            if o is None and k not in todo:
                todo[k] = t
        fresh: dict[str, Any] = {}
        self.requested += len(keys)
        self.generated += len(todo)
        if todo:
            replies = self.complete(list(todo.values()), PREFILL[mode] if self.prefill else "")
            if len(replies) != len(todo):
                raise RuntimeError(f"the judge gave {len(replies)} replies for {len(todo)} rubrics")
            for k, reply in zip(todo, replies, strict=True):
                fresh[k] = parse(reply)
                self.cache.put(k, fresh[k])
        return [o if o is not None else fresh[k] for k, o in zip(keys, out, strict=True)]

    def score(self, prompts: list[list[dict]], replies: list[str]) -> list[Judgement]:
        """One Judgement per (prompt, reply), in order."""
        keys = [self.cache.key("pointwise", p, r) for p, r in zip(prompts, replies, strict=True)]
        texts = [fill_pointwise(self.rubric, p, r, self.low, self.high) for p, r in zip(prompts, replies, strict=True)]

        def parse(reply: str) -> Judgement:
            value, why = parse_score(reply, self.low, self.high)
            return Judgement(reply, value, why)

        return self._ask(keys, texts, parse, "pointwise")

    def verdicts(
        self, prompts: list[list[dict]], firsts: list[str], seconds: list[str]
    ) -> list[tuple[str, str | None]]:
        """(judge text, parsed verdict) with firsts[i] shown as A and seconds[i] as B."""
        keys = [self.cache.key("pairwise", p, a, b) for p, a, b in zip(prompts, firsts, seconds, strict=True)]
        texts = [fill_pairwise(self.pairwise_rubric, p, a, b) for p, a, b in zip(prompts, firsts, seconds, strict=True)]
        return self._ask(keys, texts, lambda reply: (reply, parse_verdict(reply)[0]), "pairwise")

    def compare(self, prompts: list[list[dict]], xs: list[str], ys: list[str]) -> list[Comparison]:
        """Each pair (x, y) judged in both orders (x first, then y first), in one batch of 2 n rubrics."""
        n = len(prompts)
        both = self.verdicts(prompts + prompts, list(xs) + list(ys), list(ys) + list(xs))
        out = []
        for i in range(n):
            (t1, v1), (t2, v2) = both[i], both[n + i]
            out.append(Comparison((t1, t2), (v1, v2), combine_swapped(v1, v2)))
        return out


ChatComplete = Callable[..., list[tuple[str, bool]]]  # (conversations, seed) -> (reply, ended) per conversation


def chat_completer(
    model: str,
    *,
    max_new_tokens: int,
    batch_size: int,
    chat_template: str | None,
    device: Any,
    dtype: Any,
    what: str,
    adapter: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    console: Any = None,
) -> tuple[ChatComplete, Callable[[], None]]:
    """(complete, close) for a local causal LM (a directory, hub id or .gguf file, with an optional adapter):
    complete(conversations, seed=0, prefill="") renders each conversation (messages ending with a user turn)
    with the chat template (plain text without one), left-truncated to leave room for the reply, and answers
    it with llmtune.generation.sample.generate (greedy at temperature 0): (reply decoded without special
    tokens, whether it ended) per conversation. ``prefill``: text the reply starts with (written after the
    generation prompt, the model continues it; returned as part of the reply)."""
    import torch

    from llmtune.data.chat import resolve_chat_template
    from llmtune.data.prompts import render_prompt
    from llmtune.generation.sample import end_tokens, generate
    from llmtune.model.gguf import resolve_gguf
    from llmtune.model.resolve import free, load_causal_lm, pick_dtype

    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = pick_dtype(dtype, device)
    path = resolve_gguf(model, console)
    loaded: Any = load_causal_lm(path, adapter, dtype, device, what)
    tok = loaded.tokenizer
    template = resolve_chat_template(tok, chat_template, required=False)
    stops = end_tokens(loaded.model, tok, template)
    limit = getattr(loaded.model.config, "max_position_embeddings", None) or 2048
    budget = max(8, limit - max_new_tokens)

    def complete(conversations: list[list[dict]], seed: int = 0, prefill: str = "") -> list[tuple[str, bool]]:
        if loaded is None:
            raise RuntimeError(f"the model {model} was closed")
        rendered = [render_prompt(tok, template, c) + prefill for c in conversations]
        ids = [tok(r, add_special_tokens=template is None)["input_ids"][-budget:] for r in rendered]
        outs = generate(
            loaded.model, tok, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            batch_size=batch_size, seed=seed, device=device, stops=stops,
        )  # fmt: skip
        return [(prefill + tok.decode(o, skip_special_tokens=True), ended) for o, ended in outs]

    def close() -> None:
        nonlocal loaded
        loaded = None
        free()

    return complete, close


def model_completer(
    model: str,
    *,
    max_new_tokens: int,
    batch_size: int,
    chat_template: str | None,
    device: Any,
    dtype: Any,
    what: str,
    console: Any = None,
) -> tuple[Complete, Callable[[], None]]:
    """(complete, close) for a judge model: each rubric text is one user turn, answered greedily from the
    prefill on (chat_completer)."""
    chat, close = chat_completer(
        model, max_new_tokens=max_new_tokens, batch_size=batch_size, chat_template=chat_template, device=device,
        dtype=dtype, what=what, console=console,
    )  # fmt: skip

    def complete(texts: list[str], prefill: str = "") -> list[str]:
        return [reply for reply, _ in chat([[{"role": "user", "content": t}] for t in texts], 0, prefill)]

    return complete, close


def judge_source_name(model: str) -> str:
    """``judge/<last path part>`` (a .gguf file without its suffix)."""
    tail = model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or model
    return "judge/" + (tail[: -len(".gguf")] if tail.lower().endswith(".gguf") else tail)


class JudgeSource:
    """A RewardSource backed by a judge model (pointwise, or pairwise against each row's answer; see the module
    docstring). After each ``score`` call, ``stats`` holds that call's counts: ``judged`` (replies scored),
    ``unparsable`` (judgements without a usable score) and ``cached`` (judgements that cost no generation: in
    the cache, or a repeat within the call); ``totals`` the same summed over the source's life."""

    STAT_KEYS = ("judged", "unparsable", "cached")

    def __init__(self, cfg: Any, *, device: Any, dtype: Any, name: str | None = None, what: str = "reward.judge"):
        self.cfg = cfg
        self.name = name or judge_source_name(cfg.model)
        self.needs_answer = cfg.mode == "pairwise"  # the reference each reply is compared with
        rubric = read_rubric(cfg.rubric, pairwise=self.needs_answer, what=f"{what}.rubric")
        complete, self._close = model_completer(
            cfg.model, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, chat_template=cfg.chat_template,
            device=device, dtype=dtype, what=f"{what}.model",
        )  # fmt: skip
        rubrics = {"pairwise_rubric": rubric} if self.needs_answer else {"rubric": rubric}
        self.judge = Judge(complete, scale=(cfg.scale[0], cfg.scale[1]), prefill=cfg.prefill, **rubrics)
        self.stats: dict[str, float] = dict.fromkeys(self.STAT_KEYS, 0.0)
        self.totals: dict[str, float] = dict.fromkeys(self.STAT_KEYS, 0.0)
        self.reasons: dict[str, int] = {}

    @classmethod
    def from_judge(cls, cfg: Any, judge: Judge, name: str | None = None) -> JudgeSource:
        """A source over a Judge the caller built (its own completer)."""
        self = cls.__new__(cls)
        self.cfg, self.judge, self._close = cfg, judge, lambda: None
        self.name = name or judge_source_name(cfg.model)
        self.needs_answer = cfg.mode == "pairwise"
        self.stats = dict.fromkeys(cls.STAT_KEYS, 0.0)
        self.totals = dict.fromkeys(cls.STAT_KEYS, 0.0)
        self.reasons = {}
        return self

    def score(self, prompts: list[list[dict]], completions: list[str], answers: list[str | None]) -> list[float]:
        before = self.judge.requested - self.judge.generated
        if self.needs_answer:
            scores, reasons = self._against_answers(prompts, completions, answers)
        else:
            judged = self.judge.score(prompts, completions)
            low, high = self.judge.low, self.judge.high
            scores = [
                (unit(j.score, low, high) if self.cfg.unit_scale else j.score) if j.score is not None else None
                for j in judged
            ]
            reasons = [j.reason for j in judged]
        fallback = self.fallback([s for s in scores if s is not None])
        for reason in reasons:
            if reason is not None:
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.stats = {
            "judged": float(len(scores)),
            "unparsable": float(sum(s is None for s in scores)),
            "cached": float(self.judge.requested - self.judge.generated - before),
        }
        for k, v in self.stats.items():
            self.totals[k] += v
        return [s if s is not None else fallback for s in scores]

    def _against_answers(
        self, prompts: list[list[dict]], completions: list[str], answers: list[str | None]
    ) -> tuple[list[float | None], list[str | None]]:
        """Pairwise: each completion against its row's answer, in both orders: 1.0 won, 0.0 lost, 0.5 a tie
        or an inconsistent pair (position bias), None unparsable; and the reason of each None."""
        missing = sum(1 for a in answers if a is None)
        if missing:
            raise DataError(
                f"the judge {self.name} (mode pairwise) compares each reply with its prompt's `answer`, and "
                f"{missing} of {len(answers)} prompts have none",
                hint="give every prompt row an `answer` (a reference reply), or use mode: pointwise",
            )
        reference = [a or "" for a in answers]
        outcomes = [c.outcome for c in self.judge.compare(prompts, completions, reference)]
        value = {"x": 1.0, "y": 0.0, "tie": 0.5, "inconsistent": 0.5}
        return [value.get(o) for o in outcomes], [None if o in value else "no verdict" for o in outcomes]

    def fallback(self, parsed: list[float]) -> float:
        """The score of an unparsable judgement: ``unparsable`` (a number), or the mean of ``parsed``; with
        nothing parsed, the scale's middle (pairwise: 0.5, a tie)."""
        if self.cfg.unparsable != "mean":
            return float(self.cfg.unparsable)
        if parsed:
            return sum(parsed) / len(parsed)
        return 0.5 if self.cfg.unit_scale or self.needs_answer else (self.judge.low + self.judge.high) / 2

    def close(self) -> None:
        self._close()


def check_judge(cfg: Any, what: str) -> None:
    """What can be told before the judge loads: its rubric reads and has its placeholders, and a local model
    path exists (a causal LM; a .gguf file is converted when it loads)."""
    from llmtune.paths import looks_local, missing_path_message

    try:
        read_rubric(cfg.rubric, pairwise=cfg.mode == "pairwise", what=f"{what}.rubric")
    except UserError as e:
        raise RecipeError(e.message, hint=e.hint) from None
    if looks_local(cfg.model) and not Path(cfg.model).expanduser().exists():
        msg, hint = missing_path_message(f"{what}.model", cfg.model)
        raise RecipeError(msg, hint=hint)


def require_judge_model(model: str, what: str) -> None:
    """Refuse a reward model (a score head, no language-model head) as a judge; a .gguf file passes (it holds
    a causal LM by construction)."""
    from llmtune.model.gguf import gguf_file

    if gguf_file(model) is not None:
        return
    from llmtune.model.resolve import require_causal_lm

    try:
        require_causal_lm(model, None, what, hint="a judge is an instruct causal LM that writes its verdict")
    except UserError as e:
        raise RecipeError(e.message, hint=e.hint) from None
