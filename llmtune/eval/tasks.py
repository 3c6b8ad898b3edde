"""The five eval tasks. Each reads the data, runs the model(s) in batches and returns the report's metrics
(plain names) plus per-example rows for the JSONL file.

perplexity  loss = sum of -log p over learned tokens / their count (labels as training puts them:
            assistant replies for conversations, every token for text); perplexity = exp(loss)
preference  accuracy = share of pairs with score(chosen) > score(rejected); margin = mean difference.
            score = a reward model's score, or a policy's implicit DPO reward
            beta * (log pi(y|x) - log pi_ref(y|x)), summed over the reply tokens
reward      generate, then score with reward models and rules: mean / std of the weighted total
generate    generate, then exact_match / contains / gsm8k_accuracy (/ regex_match) against `answer`
compare     generate with two models; a judge reward model scores both: win / tie / loss rates
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console

from llmtune.data.chat import encode_conversation, encode_text, resolve_chat_template
from llmtune.data.formats import Conversation, RowError, detect_format, to_conversation, to_text
from llmtune.data.pipeline import Sample, SourceReport, collate
from llmtune.data.prompts import Prompt, render_prompt, to_prompt
from llmtune.data.sources import read_rows
from llmtune.errors import DataError, UserError
from llmtune.eval.config import EvalConfig
from llmtune.eval.fewshot import select_examples
from llmtune.eval.pairs import Pair, is_pair_row, to_pair
from llmtune.generation.sample import end_tokens, generate
from llmtune.model.load import LoadedModel
from llmtune.model.resolve import (
    check_reference_tokenizer,
    free,
    is_reward_model,
    load_causal_lm,
    load_reward_model,
    pick_device,
    pick_dtype,
    require_causal_lm,
    require_reward_model,
)
from llmtune.objectives.logprobs import hidden_states_as_logits, lm_loss_sum_from_hidden, token_logps_from_hidden
from llmtune.recipe.schema import DataSource
from llmtune.rewards import metrics
from llmtune.rewards.model import score_conversations as score_with_model
from llmtune.rewards.model import with_reply
from llmtune.rewards.rules import get_rule, reference_answer


@dataclass
class TaskResult:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)  # per-example output (JSONL)
    notes: list[str] = field(default_factory=list)


@dataclass
class Env:
    cfg: EvalConfig
    console: Console
    device: torch.device
    dtype: torch.dtype


def run_task(cfg: EvalConfig, console: Console) -> TaskResult:
    device = pick_device(cfg.device)
    env = Env(cfg, console, device, pick_dtype(cfg.dtype, device))
    check_models(cfg)
    torch.manual_seed(cfg.seed)
    tasks: dict[str, Callable[[Env], TaskResult]] = {
        "perplexity": perplexity,
        "preference": preference,
        "reward": reward,
        "generate": generate_task,
        "compare": compare,
    }
    return tasks[cfg.task](env)


def check_models(cfg: EvalConfig) -> None:
    """Each model is of the kind its role needs, from configs only (before any data is read or model loaded):
    generating and token log-probabilities need a causal LM (a reward model's lm_head would be random), and
    judging needs a reward model (a causal LM's score head would be random)."""
    if cfg.task == "preference":
        if is_reward_model(cfg.model, cfg.adapter):
            return  # a reward model scores the pairs itself
        policy_hint = (
            "task preference takes a reward model as --model (scored directly) or a causal-LM policy "
            "(scored by its implicit DPO reward against --reference)"
        )
        require_causal_lm(cfg.model, cfg.adapter, "--model", policy_hint)
        if cfg.reference is not None:
            require_causal_lm(cfg.reference, None, "--reference", "pass the causal LM the policy was trained from")
        return
    require_causal_lm(cfg.model, cfg.adapter, "--model", _causal_hint(cfg.task))
    if cfg.task == "compare" and cfg.model_b is not None:
        require_causal_lm(cfg.model_b, cfg.adapter_b, "--model-b", _causal_hint(cfg.task))
    if cfg.task in ("reward", "compare"):
        from llmtune.rewards.prm import is_prm, require_prm

        for path in cfg.reward_models:
            if is_prm(path):  # a process reward model: scored per step (llmtune.rewards.prm)
                require_prm(path, "--reward-model")
            else:
                require_reward_model(path, "--reward-model")


def _causal_hint(task: str) -> str:
    if task == "perplexity":
        return "task perplexity scores a causal LM; for a reward model use --task preference on pairs"
    judge = "; a reward model goes in --reward-model" if task in ("reward", "compare") else ""
    return f"task {task} generates with a causal LM (a cpt / sft / dpo output, or a base model){judge}"


# ------------------------------------------------------------------------------------------------ data


def read_data(path: str, max_samples: int | None) -> list[Any]:
    rows = read_rows(DataSource(path=path))
    return rows[:max_samples] if max_samples is not None else rows


def convert(
    rows: list[Any], fn: Callable[[dict], Any], name: str, what: str
) -> tuple[list[tuple[int, Any]], SourceReport]:
    """Apply fn to every readable row; bad rows are dropped and counted. No usable row is a DataError."""
    report = SourceReport(name=name, rows=len(rows))
    out: list[tuple[int, Any]] = []
    for row in rows:
        if row.data is None:
            report.drop(row.index, row.error or "unreadable row", row.where)
            continue
        try:
            out.append((row.index, fn(row.data)))
            report.kept += 1
        except RowError as e:
            report.drop(row.index, str(e), row.where)
    if not out:
        top = _eval_names("; ".join(report.first_dropped(3)))
        raise DataError(f"{name}: no row is usable as {what} ({report.rows} rows; e.g. {top})", hint=_format_hint(what))
    return out, report


def _format_hint(what: str) -> str:
    return {
        "prompts": "rows need a prompt: prompt / question / instruction (+input) / messages, and `answer` to score",
        "pairs": "rows need prompt, chosen and rejected (or LLaMA-Factory's conversations + chosen / rejected)",
    }.get(what, "check --format and the file's columns")


def _drop_metrics(report: SourceReport) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": report.rows, "dropped": report.dropped}
    if report.dropped:
        out["dropped_reasons"] = dict(report.reasons.most_common(5))
    return out


@contextmanager
def progress(console: Console, total: int, label: str) -> Iterator[Callable[[int], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _template(tokenizer: Any, override: str | None, required: bool) -> str | None:
    try:
        return resolve_chat_template(tokenizer, override, required=required)
    except UserError as e:  # the shared message names the recipe key; eval's is --chat-template
        raise type(e)(_eval_names(e.message), hint=_eval_names(e.hint) if e.hint else None) from None


def _eval_names(text: str) -> str:
    """A shared (recipe-side) message in eval's terms: its options rather than recipe keys."""
    for recipe_key, option in (
        ("set model.chat_template to", "pass --chat-template"),
        ("check model.chat_template", "check --chat-template"),
        ("model.chat_template", "--chat-template"),
        ("this stage renders", "this task renders"),
    ):
        text = text.replace(recipe_key, option)
    return text


def _detect_format(rows: list[Any], path: str) -> str:
    """detect_format, with eval's fix: the --format option (the shared hint names a recipe's `format:`)."""
    try:
        return detect_format([r.data for r in rows[:50] if r.data is not None])
    except DataError as e:
        raise DataError(
            f"{path}: {e.message}",
            hint="pass --format text|alpaca|sharegpt|messages (format: in an eval file), "
            "or rename the file's columns to the names of one of those formats",
        ) from None


# ------------------------------------------------------------------------------------------ perplexity


def lm_rows(path: str, fmt: str | None, max_samples: int | None = None) -> tuple[list[Any], str]:
    """The rows of a text or sft data file and their format (detected when None); other data is refused."""
    rows = read_data(path, max_samples)
    if fmt is None:
        fmt = _detect_format(rows, path)
    if fmt in ("prompts", "pairs"):
        raise UserError(
            f"{path} holds {fmt} rows: perplexity and Fisher weights are computed on text or sft data "
            "(text, alpaca, sharegpt, messages)",
            hint="use --task generate for prompts, --task preference for pairs",
        )
    return rows, fmt


def lm_samples(
    rows: list[Any],
    fmt: str,
    path: str,
    tok: Any,
    chat_template: str | None,
    max_length: int,
    system: str | None = None,
) -> tuple[list[Sample], SourceReport]:
    """Rows (from lm_rows) as scored token samples, labelled as training labels them: every token of a text
    document, cut into max_length pieces; the assistant replies of a conversation. Used by task perplexity
    and by Fisher-weighted merging."""
    template = _template(tok, chat_template, required=fmt != "text")

    def encode(row: dict) -> list[Sample]:
        if fmt == "text":  # a document, cut into max_length pieces as cpt does; every token is learned
            ids = encode_text(tok, to_text(row))
            return [
                Sample(c, list(c))
                for c in (ids[i : i + max_length] for i in range(0, len(ids), max_length))
                if len(c) >= 2
            ]
        assert template is not None
        conv = to_conversation(row, fmt, default_system=system)
        ids, labels = encode_conversation(tok, template, conv, max_length, train_on_prompt=False)
        return [Sample(ids, labels)]

    encoded, report = convert(rows, encode, path, fmt)
    return [s for _, ss in encoded for s in ss], report


def perplexity(env: Env) -> TaskResult:
    cfg = env.cfg
    rows, fmt = lm_rows(cfg.data, cfg.format, cfg.max_samples)  # before the model loads
    policy = load_causal_lm(cfg.model, cfg.adapter, env.dtype, env.device, "--model")
    samples, report = lm_samples(rows, fmt, cfg.data, policy.tokenizer, cfg.chat_template, cfg.max_length, cfg.system)
    tok = policy.tokenizer
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))  # less padding
    loss_sum, count = 0.0, 0
    with progress(env.console, len(samples), "perplexity") as advance, torch.no_grad():
        for start in range(0, len(order), cfg.batch_size):
            batch = collate([samples[i] for i in order[start : start + cfg.batch_size]], tok.pad_token_id)
            with hidden_states_as_logits(policy.model) as head:  # the head per chunk: no (B, T, V) logits
                hidden = policy.model(
                    input_ids=batch["input_ids"].to(env.device), attention_mask=batch["attention_mask"].to(env.device)
                ).logits
            s, n = lm_loss_sum_from_hidden(hidden, batch["labels"].to(env.device), head)
            loss_sum += s.item()
            count += int(n.item())
            advance(min(cfg.batch_size, len(order) - start))
    if count == 0:
        raise DataError(f"{cfg.data}: no token to score", hint="check --max-length and the rows")
    loss = loss_sum / count
    return TaskResult(
        {
            "perplexity": math.exp(loss),
            "loss": loss,
            "tokens": count,
            "examples": len(samples),
            "format": fmt,
            **_drop_metrics(report),
        }
    )


# ------------------------------------------------------------------------------------------- generation


@dataclass
class Generated:
    index: int
    prompt: Prompt
    text: str  # the rendered prompt
    completion: str
    new_tokens: int
    ended: bool = True  # False: cut at max_new_tokens without an end token


def read_prompts(env: Env) -> tuple[list[tuple[int, Prompt]], SourceReport]:
    cfg = env.cfg
    if cfg.format not in (None, "prompts", "alpaca", "messages", "sharegpt"):
        raise UserError(
            f"task {cfg.task} reads prompts (prompts, alpaca, messages, sharegpt), not format {cfg.format}",
            hint="rows like {prompt: ..., answer: ...} or {question, answer}",
        )
    rows = read_data(cfg.data, cfg.max_samples)
    return convert(rows, lambda r: to_prompt(r, cfg.system), cfg.data, "prompts")


def few_shot_messages(env: Env, prompts: list[tuple[int, Prompt]]) -> list[list[dict]]:
    """Each prompt's turns, with k solved examples put before them as earlier user / assistant turns."""
    cfg = env.cfg
    if cfg.few_shot == 0:
        return [p.messages for _, p in prompts]
    if cfg.few_shot_data:
        pool_rows = read_data(cfg.few_shot_data, None)
        pool_all, _ = convert(pool_rows, lambda r: to_prompt(r, None), cfg.few_shot_data, "prompts")
        same = False
    else:
        pool_all, same = prompts, True
    pool = [(i, p) for i, p in pool_all if p.answer is not None]
    if len(pool) < cfg.few_shot + (1 if same else 0):
        raise DataError(
            f"few_shot {cfg.few_shot} needs that many rows with an answer to draw from; there are {len(pool)}",
            hint="lower --few-shot or pass --few-shot-data with solved examples",
        )
    position = {i: j for j, (i, _) in enumerate(pool)}
    exclude = [position.get(i) if same else None for i, _ in prompts]
    chosen = select_examples(
        [p.user_text for _, p in prompts],
        [p.user_text for _, p in pool],
        cfg.few_shot,
        cfg.few_shot_selection,
        cfg.seed,
        exclude,
    )
    out = []
    for (_, p), picks in zip(prompts, chosen, strict=True):
        shots: list[dict] = []
        for j in picks:
            shot = pool[j][1]
            shots += [{"role": "user", "content": shot.user_text}, {"role": "assistant", "content": shot.answer or ""}]
        head = [m for m in p.messages[:1] if m["role"] == "system"]
        out.append([*head, *shots, *p.messages[len(head) :]])
    return out


def run_generation(
    env: Env, model: str, adapter: str | None, prompts: list[tuple[int, Prompt]], messages: list[list[dict]], label: str
) -> list[Generated]:
    cfg = env.cfg
    policy = load_causal_lm(model, adapter, env.dtype, env.device, label)
    tok = policy.tokenizer
    template = _template(tok, cfg.chat_template, required=False)
    texts = [render_prompt(tok, template, m) for m in messages]
    budget = max(1, cfg.max_length - cfg.max_new_tokens)
    ids = [tok(t, add_special_tokens=template is None)["input_ids"][-budget:] for t in texts]
    with progress(env.console, len(ids), f"generate ({label.lstrip('-')})") as advance:
        outs = generate(
            policy.model,
            tok,
            ids,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            device=env.device,
            on_batch=advance,
            stops=end_tokens(policy.model, tok, template),
        )
    free(policy)
    return [
        Generated(i, p, t, tok.decode(o, skip_special_tokens=True), len(o), ended)
        for (i, p), t, (o, ended) in zip(prompts, texts, outs, strict=True)
    ]


def output_shape(gens: list[Generated], suffix: str = "") -> dict[str, float]:
    """The share of empty completions and of truncated ones (never ended: cut at max_new_tokens), reported
    beside every generation metric: a model that wins by saying nothing, or by never stopping, shows it."""
    n = max(len(gens), 1)
    return {
        f"empty_share{suffix}": sum(not g.completion.strip() for g in gens) / n,
        f"truncated_share{suffix}": sum(not g.ended for g in gens) / n,
    }


def generate_task(env: Env) -> TaskResult:
    cfg = env.cfg
    prompts, report = read_prompts(env)
    gens = run_generation(env, cfg.model, cfg.adapter, prompts, few_shot_messages(env, prompts), "--model")
    names = ["exact_match", "contains", "gsm8k_accuracy", *(["regex_match"] if cfg.regex else [])]
    hits = dict.fromkeys(names, 0)
    rows = []
    answered = 0
    for g in gens:
        row: dict[str, Any] = {"index": g.index, "prompt": g.text, "completion": g.completion, "ended": g.ended}
        if g.prompt.answer is not None:
            answered += 1
            gold = reference_answer(g.prompt.answer)
            checks = {
                "exact_match": metrics.exact_match(g.completion, gold),
                "contains": metrics.contains(g.completion, gold),
                "gsm8k_accuracy": metrics.gsm8k_match(g.completion, g.prompt.answer),
            }
            if cfg.regex:
                checks["regex_match"] = metrics.regex_match(g.completion, gold, cfg.regex)
            for k, v in checks.items():
                hits[k] += int(v)
            row.update({"answer": g.prompt.answer, "gold": gold, **checks})
        rows.append(row)
    out: dict[str, Any] = {}
    notes = []
    if answered:
        out.update({k: hits[k] / answered for k in names})
        out.update({f"{k}_count": hits[k] for k in names})
    else:
        notes.append("no row has an `answer`: generations are saved, no accuracy is computed")
    out.update(
        {
            "examples": len(gens),
            "answered": answered,
            "mean_new_tokens": sum(g.new_tokens for g in gens) / len(gens),
            **output_shape(gens),
            "few_shot": cfg.few_shot,
            **_drop_metrics(report),
        }
    )
    return TaskResult(out, rows, notes)


# ---------------------------------------------------------------------------------------------- scoring


def score_conversations(env: Env, rm: LoadedModel, convs: list[list[dict]], label: str) -> list[float]:
    """A reward model's score of each conversation (prompt turns + the assistant reply): the score head's
    output at the last real token (see llmtune.rewards.model), with a progress bar."""
    cfg = env.cfg
    template = _template(rm.tokenizer, cfg.chat_template, required=False)
    with progress(env.console, len(convs), f"score ({label})") as advance:
        return score_with_model(
            rm.model,
            rm.tokenizer,
            convs,
            template=template,
            device=env.device,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            on_batch=advance,
        )


def _judge(env: Env, path: str, sets: list[tuple[list[Any], str]]) -> list[list[float]]:
    """A reward model's score of each generation of each (generations, label) set, the model loaded once; a
    process reward model (prm.json) scores each step and aggregates them with min (llmtune.rewards.prm)."""
    from llmtune.rewards.prm import PrmSource, is_prm

    if is_prm(path):
        prm = PrmSource(path, device=env.device, dtype=env.dtype, batch_size=env.cfg.batch_size, what="--reward-model")
        try:
            return [
                prm.score([g.prompt.messages for g in gens], [g.completion for g in gens], [None] * len(gens))
                for gens, _ in sets
            ]
        finally:
            prm.close()
    rm = load_reward_model(path, env.dtype, env.device, what="--reward-model")
    try:
        return [
            score_conversations(env, rm, [with_reply(g.prompt.messages, g.completion) for g in gens], label)
            for gens, label in sets
        ]
    finally:
        free(rm)


def reward(env: Env) -> TaskResult:
    cfg = env.cfg
    prompts, report = read_prompts(env)
    gens = run_generation(env, cfg.model, cfg.adapter, prompts, [p.messages for _, p in prompts], "--model")
    sources: dict[str, list[float]] = {}
    for path in cfg.reward_models:
        sources[path] = _judge(env, path, [(gens, path)])[0]
    for spec in cfg.rules:
        rule, needs_answer = get_rule(spec, trust_code=cfg.trust_reward_code)
        missing = sum(1 for g in gens if g.prompt.answer is None)
        if needs_answer and missing:
            raise DataError(f"rule {spec} scores against `answer`, and {missing} of {len(gens)} rows have none")
        sources[spec] = [
            rule(g.completion, reference_answer(g.prompt.answer) if g.prompt.answer else None) for g in gens
        ]
    weights = cfg.reward_weights or [1.0] * len(sources)
    totals = [sum(w * s[i] for w, s in zip(weights, sources.values(), strict=True)) for i in range(len(gens))]
    mean, std = metrics.mean_std(totals)
    rows = [
        {
            "index": g.index,
            "prompt": g.text,
            "completion": g.completion,
            "ended": g.ended,
            "reward": totals[i],
            "rewards": {name: s[i] for name, s in sources.items()},
        }
        for i, g in enumerate(gens)
    ]
    per_source = {}
    for name, s in sources.items():
        m, sd = metrics.mean_std(s)
        per_source[name] = {"mean": m, "std": sd}
    return TaskResult(
        {
            "mean_reward": mean,
            "std_reward": std,
            "min_reward": min(totals),
            "max_reward": max(totals),
            **output_shape(gens),
            "examples": len(gens),
            "rewards": per_source,
            "weights": dict(zip(sources, weights, strict=True)),
            **_drop_metrics(report),
        },
        rows,
    )


def compare(env: Env) -> TaskResult:
    cfg = env.cfg
    assert cfg.model_b is not None
    prompts, report = read_prompts(env)
    messages = [p.messages for _, p in prompts]
    gens_a = run_generation(env, cfg.model, cfg.adapter, prompts, messages, "--model")
    gens_b = run_generation(env, cfg.model_b, cfg.adapter_b, prompts, messages, "--model-b")
    sa, sb = _judge(env, cfg.reward_models[0], [(gens_a, "model"), (gens_b, "model_b")])
    win, tie, loss = metrics.win_tie_loss(sa, sb, cfg.tie_margin)
    n = len(sa)
    rows = [
        {
            "index": a.index,
            "prompt": a.prompt.messages,
            "completion_a": a.completion,
            "completion_b": b.completion,
            "score_a": x,
            "score_b": y,
            "result": "win" if x - y > cfg.tie_margin else "loss" if y - x > cfg.tie_margin else "tie",
        }
        for a, b, x, y in zip(gens_a, gens_b, sa, sb, strict=True)
    ]
    return TaskResult(
        {
            "win_rate": win / n,
            "tie_rate": tie / n,
            "loss_rate": loss / n,
            "wins": win,
            "ties": tie,
            "losses": loss,
            "mean_reward_a": sum(sa) / n,
            "mean_reward_b": sum(sb) / n,
            **output_shape(gens_a, "_a"),
            **output_shape(gens_b, "_b"),
            "examples": n,
            **_drop_metrics(report),
        },
        rows,
    )


# ------------------------------------------------------------------------------------------- preference


def sequence_logps(env: Env, model: Any, samples: list[Sample], pad_id: int) -> list[float]:
    """sum_t log p(y_t | y_<t, x) over each sample's labelled tokens (the reply)."""
    cfg = env.cfg
    out = [0.0] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    with torch.no_grad():
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            b = collate([samples[i] for i in idx], pad_id)
            with hidden_states_as_logits(model) as head:  # the head per chunk: no (B, T, V) logits
                hidden = model(
                    input_ids=b["input_ids"].to(env.device), attention_mask=b["attention_mask"].to(env.device)
                ).logits  # (B, T, H)
            # hidden[:, t] predicts token t + 1
            tok_logp, _, _ = token_logps_from_hidden(hidden, b["labels"].to(env.device), head)
            for i, v in zip(idx, tok_logp.sum(dim=1).tolist(), strict=True):
                out[i] = float(v)
    return out


def preference(env: Env) -> TaskResult:
    cfg = env.cfg
    if cfg.format not in (None, "pairs"):
        raise UserError(f"task preference reads pairs, not format {cfg.format}", hint="rows {prompt, chosen, rejected}")
    rows = read_data(cfg.data, cfg.max_samples)
    if not any(is_pair_row(r.data) for r in rows[:50]):
        keys = sorted({k for r in rows[:20] if r.data for k in r.data})
        raise DataError(
            f"{cfg.data} has no preference pairs (keys found: {', '.join(keys) or 'none'})",
            hint=_format_hint("pairs"),
        )
    pairs, report = convert(rows, lambda r: to_pair(r, cfg.system), cfg.data, "pairs")
    items: list[Pair] = [p for _, p in pairs]
    if is_reward_model(cfg.model, cfg.adapter):
        mode = "reward_model"
        rm = load_reward_model(cfg.model, env.dtype, env.device, adapter=cfg.adapter, what="--model")
        chosen = score_conversations(env, rm, [with_reply(p.messages, p.chosen) for p in items], "chosen")
        rejected = score_conversations(env, rm, [with_reply(p.messages, p.rejected) for p in items], "rejected")
    else:
        mode = "dpo_implicit_reward"
        chosen, rejected = _implicit_rewards(env, items)
    diffs = [c - r for c, r in zip(chosen, rejected, strict=True)]
    correct = sum(1 for d in diffs if d > 0)
    rows_out = [
        {
            "index": i,
            "prompt": _clip(_prompt_text(p.messages)),
            "chosen": _clip(p.chosen),
            "rejected": _clip(p.rejected),
            "chosen_score": c,
            "rejected_score": r,
            "correct": c > r,
        }
        for (i, p), c, r in zip(pairs, chosen, rejected, strict=True)
    ]
    return TaskResult(
        {
            "accuracy": correct / len(diffs),
            "margin": sum(diffs) / len(diffs),
            "correct": correct,
            "pairs": len(diffs),
            "mean_chosen": sum(chosen) / len(chosen),
            "mean_rejected": sum(rejected) / len(rejected),
            "scored_by": mode,
            **({"beta": cfg.beta} if mode == "dpo_implicit_reward" else {}),
            **_drop_metrics(report),
        },
        rows_out,
    )


TEXT_LIMIT = 500  # characters of prompt / reply text kept per example in the per-example file


def _clip(text: str, limit: int = TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prompt_text(messages: list[dict]) -> str:
    """The prompt's last user turn (what the replies answer), the turns before it counted in front."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        return ""
    last = users[-1]
    text = str(messages[last].get("content", ""))
    before = sum(1 for m in messages[:last] if m.get("role") != "system")
    return f"[{before} earlier turns] {text}" if before else text


def _implicit_rewards(env: Env, items: list[Pair]) -> tuple[list[float], list[float]]:
    """beta * (log pi(y|x) - log pi_ref(y|x)) for the chosen and the rejected reply of every pair."""
    cfg = env.cfg
    if cfg.reference is not None:
        check_reference_tokenizer(cfg.model, cfg.adapter, cfg.reference)  # before loading any model
    policy = load_causal_lm(cfg.model, cfg.adapter, env.dtype, env.device, "--model")
    if cfg.reference is None and not policy.has_adapter:
        raise UserError(
            "task preference on a policy needs a reference model for the implicit DPO reward",
            hint="pass --reference PATH (the model DPO started from), or --adapter so that its base is the reference",
        )
    tok = policy.tokenizer
    template = _template(tok, cfg.chat_template, required=True)
    assert template is not None

    def encode(messages: list[dict], reply: str) -> Sample:
        conv = Conversation(with_reply(messages, reply))
        try:
            ids, labels = encode_conversation(tok, template, conv, cfg.max_length, train_on_prompt=False)
        except RowError as e:
            raise DataError(_eval_names(f"a pair cannot be scored: {e}"), hint="raise --max-length") from None
        return Sample(ids, labels)

    samples = [encode(p.messages, p.chosen) for p in items] + [encode(p.messages, p.rejected) for p in items]
    with progress(env.console, 2, "log-probs") as advance:
        pol = sequence_logps(env, policy.model, samples, tok.pad_token_id)
        advance(1)
        if cfg.reference is not None:
            free(policy)
            ref_model = load_causal_lm(cfg.reference, None, env.dtype, env.device, "--reference")
            ref = sequence_logps(env, ref_model.model, samples, tok.pad_token_id)
        else:
            with policy.model.disable_adapter():
                ref = sequence_logps(env, policy.model, samples, tok.pad_token_id)
        advance(1)
    rewards = [cfg.beta * (p - r) for p, r in zip(pol, ref, strict=True)]
    n = len(items)
    return rewards[:n], rewards[n:]
