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


def _judge_for(env: Env) -> Any:
    """The eval's judge model (--judge, --judge-rubric) as a Judge, with its close()."""
    from llmtune.rewards.judge import Judge, model_completer

    cfg = env.cfg
    assert cfg.judge is not None
    complete, close = model_completer(
        cfg.judge, max_new_tokens=32, batch_size=cfg.batch_size, chat_template=None, device=env.device,
        dtype=env.dtype, what="--judge", console=env.console,
    )  # fmt: skip
    pairwise = cfg.task == "compare"
    judge = Judge(
        complete,
        rubric=None if pairwise else cfg.judge_rubric,
        pairwise_rubric=cfg.judge_rubric if pairwise else None,
    )
    return judge, close


def _judge_scores(env: Env, gens: list[Any]) -> tuple[str, list[float], dict[str, Any]]:
    """(source name, each generation's judge score in [0, 1], the counts for the report): an unparsable
    judgement scores the mean of the parsed ones (reward.judge's default policy)."""
    from llmtune.recipe.online import JudgeConfig
    from llmtune.rewards.judge import JudgeSource, judge_source_name

    cfg = env.cfg
    assert cfg.judge is not None
    judge, close = _judge_for(env)
    try:
        source = JudgeSource.from_judge(JudgeConfig(model=cfg.judge), judge)
        with env.console.status(f"judging {len(gens)} replies with {cfg.judge}"):
            scores = source.score([g.prompt.messages for g in gens], [g.completion for g in gens], [None] * len(gens))
    finally:
        close()
    n_bad = int(source.totals["unparsable"])
    counts = {"judge_unparsable": n_bad, "judge_unparsable_reasons": dict(source.reasons)}
    return judge_source_name(cfg.judge), scores, counts


def _compare_with_judge(
    env: Env,
    gens_a: list[Any],
    gens_b: list[Any],
    report: Any,
    why_a: list[str | None],
    why_b: list[str | None],
    shape: dict[str, Any],
) -> TaskResult:
    """compare with a judge model: each pair judged in both orders (llmtune.rewards.judge.combine_swapped). A
    win needs both orders to agree; disagreeing orders (position bias) and unparsable verdicts count as ties,
    and are reported on their own. A degenerate reply loses whatever the verdict (decide)."""
    judge, close = _judge_for(env)
    try:
        with env.console.status(f"judging {len(gens_a)} pairs in both orders with {env.cfg.judge}"):
            results = judge.compare(
                [a.prompt.messages for a in gens_a], [a.completion for a in gens_a], [b.completion for b in gens_b]
            )
    finally:
        close()
    n = len(results)
    count = {k: sum(1 for r in results if r.outcome == k) for k in ("x", "y", "tie", "inconsistent", "unparsable")}
    score = {"x": 1.0, "y": -1.0}
    final = [
        decide(score.get(r.outcome, 0.0), 0.0, wa, wb, 0.0) for r, wa, wb in zip(results, why_a, why_b, strict=True)
    ]
    rows = [
        {
            "index": a.index,
            "prompt": a.prompt.messages,
            "completion_a": a.completion,
            "completion_b": b.completion,
            "verdict_a_first": r.verdicts[0],
            "verdict_b_first": r.verdicts[1],
            "judge_texts": list(r.texts),
            "outcome": r.outcome,
            "degenerate_a": wa,
            "degenerate_b": wb,
            "result": f,
        }
        for a, b, r, wa, wb, f in zip(gens_a, gens_b, results, why_a, why_b, final, strict=True)
    ]
    return TaskResult(
        {
            **_tally(final),
            "judge": env.cfg.judge,
            "agreed_ties": count["tie"],
            "inconsistent": count["inconsistent"],
            "unparsable": count["unparsable"],
            **shape,
            "examples": n,
            **drop_metrics(report),
        },
        rows,
    )


def _rule_scores(env: Env, gens: list[Generated]) -> dict[str, list[float]]:
    """Each --rule's score of every generation, against its row's answer where the rule needs one."""
    cfg = env.cfg
    sources: dict[str, list[float]] = {}
    for spec in cfg.rules:
        rule, needs_answer = get_rule(spec, trust_code=cfg.trust_reward_code)
        missing = sum(1 for g in gens if g.prompt.answer is None)
        if needs_answer and missing:
            raise DataError(f"rule {spec} scores against `answer`, and {missing} of {len(gens)} rows have none")
        sources[spec] = [
            rule(g.completion, reference_answer(g.prompt.answer) if g.prompt.answer else None) for g in gens
        ]
    return sources


def _weighted(env: Env, sources: dict[str, list[float]], n: int) -> tuple[list[float], list[float]]:
    weights = env.cfg.reward_weights or [1.0] * len(sources)
    totals = [sum(w * s[i] for w, s in zip(weights, sources.values(), strict=True)) for i in range(n)]
    return totals, weights


def reward(env: Env) -> TaskResult:
    cfg = env.cfg
    prompts, report = read_prompts(env)
    gens = run_generation(env, cfg.model, cfg.adapter, prompts, [p.messages for _, p in prompts], "--model")
    sources: dict[str, list[float]] = {}
    for path in cfg.reward_models:
        sources[path] = _judge(env, path, [(gens, path)])[0]
    judge_counts: dict[str, Any] = {}
    if cfg.judge is not None:
        name, scores, judge_counts = _judge_scores(env, gens)
        sources[name] = scores
    sources.update(_rule_scores(env, gens))
    totals, weights = _weighted(env, sources, len(gens))
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
            **judge_counts,
            **drop_metrics(report),
        },
        rows,
    )


def decide(score_a: float, score_b: float, why_a: str | None, why_b: str | None, margin: float) -> str:
    """One comparison's result for model a: a degenerate reply (metrics.degenerate: empty, looping or
    truncated) loses to one that is not, whatever the judge scored; two degenerate replies tie; otherwise
    the scores decide, within margin a tie.

    >>> decide(0.9, 0.1, "empty", None, 0.0), decide(0.1, 0.9, None, "truncated", 0.0), decide(1, 0, "empty", "repeated", 0)
    ('loss', 'win', 'tie')
    >>> decide(0.5, 0.2, None, None, 0.0), decide(0.5, 0.45, None, None, 0.1)
    ('win', 'tie')
    """
    if (why_a is None) != (why_b is None):
        return "loss" if why_a is not None else "win"
    if why_a is not None:
        return "tie"
    return "win" if score_a - score_b > margin else "loss" if score_b - score_a > margin else "tie"


def _degenerate_counts(whys: list[str | None], suffix: str) -> dict[str, int]:
    out = {f"degenerate{suffix}": sum(w is not None for w in whys)}
    for reason in ("empty", "repeated", "truncated"):
        out[f"degenerate_{reason}{suffix}"] = sum(w == reason for w in whys)
    return out


def _tally(results: list[str]) -> dict[str, Any]:
    n = max(len(results), 1)
    win, tie, loss = (results.count(k) for k in ("win", "tie", "loss"))
    return {"win_rate": win / n, "tie_rate": tie / n, "loss_rate": loss / n, "wins": win, "ties": tie, "losses": loss}


def compare(env: Env) -> TaskResult:
    """Two models' replies to the same prompts, judged: by a judge model asked which is better (both
    orders), or by reward models and / or rules (each reply scored, the weighted sums compared). A
    degenerate reply (empty, looping, or cut at the token limit) loses to one that is not, whatever the
    judge says: a model must not win by saying nothing or by never stopping."""
    cfg = env.cfg
    assert cfg.model_b is not None
    prompts, report = read_prompts(env)
    messages = [p.messages for _, p in prompts]
    gens_a = run_generation(env, cfg.model, cfg.adapter, prompts, messages, "--model")
    gens_b = run_generation(env, cfg.model_b, cfg.adapter_b, prompts, messages, "--model-b")
    why_a = [metrics.degenerate(g.completion, g.ended) for g in gens_a]
    why_b = [metrics.degenerate(g.completion, g.ended) for g in gens_b]
    shape = {
        **output_shape(gens_a, "_a"),
        **output_shape(gens_b, "_b"),
        **_degenerate_counts(why_a, "_a"),
        **_degenerate_counts(why_b, "_b"),
    }
    if cfg.judge is not None:
        return _compare_with_judge(env, gens_a, gens_b, report, why_a, why_b, shape)
    sources_a: dict[str, list[float]] = {}
    sources_b: dict[str, list[float]] = {}
    for path in cfg.reward_models:
        sources_a[path], sources_b[path] = _judge(env, path, [(gens_a, "model"), (gens_b, "model_b")])
    sources_a.update(_rule_scores(env, gens_a))
    sources_b.update(_rule_scores(env, gens_b))
    sa, _ = _weighted(env, sources_a, len(gens_a))
    sb, _ = _weighted(env, sources_b, len(gens_b))
    results = [decide(x, y, wa, wb, cfg.tie_margin) for x, y, wa, wb in zip(sa, sb, why_a, why_b, strict=True)]
    n = len(sa)
    rows = [
        {
            "index": a.index,
            "prompt": a.prompt.messages,
            "completion_a": a.completion,
            "completion_b": b.completion,
            "score_a": x,
            "score_b": y,
            "degenerate_a": wa,
            "degenerate_b": wb,
            "result": r,
        }
        for a, b, x, y, wa, wb, r in zip(gens_a, gens_b, sa, sb, why_a, why_b, results, strict=True)
    ]
    return TaskResult(
        {
            **_tally(results),
            "mean_reward_a": sum(sa) / n,
            "mean_reward_b": sum(sb) / n,
            "judged_by": [*cfg.reward_models, *cfg.rules],
            **shape,
            "examples": n,
            **drop_metrics(report),
        },
        rows,
    )
