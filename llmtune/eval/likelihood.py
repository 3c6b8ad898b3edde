"""The tasks that score given text by its likelihood: perplexity (a causal LM's loss on text or sft data) and
preference (a reward model's scores of pairs, or a policy's implicit DPO reward against a reference). Token
log-probabilities come from the final hidden states with the LM head applied a chunk at a time
(llmtune.objectives.logprobs), as training computes them."""

from __future__ import annotations

import math
from typing import Any

import torch

from llmtune.data.chat import encode_conversation
from llmtune.data.formats import Conversation, RowError
from llmtune.data.lm import convert, format_hint, in_option_terms, lm_rows, lm_samples, read_data, resolve_template
from llmtune.data.packing import Sample, collate
from llmtune.errors import DataError, UserError
from llmtune.eval.base import Env, TaskResult, drop_metrics, progress, score_conversations
from llmtune.eval.pairs import Pair, is_pair_row, to_pair
from llmtune.model.resolve import check_reference_tokenizer, free, is_reward_model, load_causal_lm, load_reward_model
from llmtune.objectives.logprobs import hidden_states_as_logits, lm_loss_sum_from_hidden, token_logps_from_hidden
from llmtune.rewards.model import with_reply


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
            **drop_metrics(report),
        }
    )


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
            hint=format_hint("pairs"),
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
            **drop_metrics(report),
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
    template = resolve_template(tok, cfg.chat_template, required=True)
    assert template is not None

    def encode(messages: list[dict], reply: str) -> Sample:
        conv = Conversation(with_reply(messages, reply))
        try:
            ids, labels = encode_conversation(tok, template, conv, cfg.max_length, train_on_prompt=False)
        except RowError as e:
            raise DataError(in_option_terms(f"a pair cannot be scored: {e}"), hint="raise --max-length") from None
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
