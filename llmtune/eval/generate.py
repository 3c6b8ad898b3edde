"""The tasks that generate: generate (answer metrics against `answer`), reward (reward models and rules score
the generations) and compare (a judge reward model scores two models' generations)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmtune.data.lm import convert, read_data, resolve_template
from llmtune.data.pipeline import SourceReport
from llmtune.data.prompts import Prompt, render_prompt, to_prompt
from llmtune.errors import DataError, UserError
from llmtune.eval.base import Env, TaskResult, drop_metrics, progress, score_conversations
from llmtune.eval.fewshot import select_examples
from llmtune.generation.sample import end_tokens, generate
from llmtune.model.resolve import free, load_causal_lm, load_reward_model
from llmtune.rewards import metrics
from llmtune.rewards.model import with_reply
from llmtune.rewards.rules import get_rule, reference_answer


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
    template = resolve_template(tok, cfg.chat_template, required=False)
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
            **drop_metrics(report),
        }
    )
    return TaskResult(out, rows, notes)


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
            **drop_metrics(report),
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
            **drop_metrics(report),
        },
        rows,
    )
