"""Proximal policy optimisation with a critic (InstructGPT-style RLHF).

Each rollout: sample one completion per prompt with the current policy, score it (llmtune.rewards: reward
models and / or rules), and turn the score into per-token rewards: the score at the completion's last token,
minus kl_coef x KL(policy || reference) at every token (k1 by default; the coefficient fixed, or adapted
toward ppo.target_kl). The critic's values and GAE give advantages and returns; then ppo.ppo_epochs passes
over the rollout's mini-batches optimise the clipped policy objective plus vf_coef x the clipped value loss
(minus an optional entropy bonus), one optimizer step per mini-batch.

The models (llmtune.model.actor_critic): the policy and the critic train in one DeepSpeed engine (the critic
with its own learning rate); the reference is the starting model (lora / qlora: the policy's base with the
adapters disabled; otherwise a frozen copy); with ppo.memory shared, one base holds the policy, the critic
and a lora reward model as adapters. The loop, checkpoints (with the KL controller's state), logging and
export are the engine's.

A step is counted in prompts: ppo.prompts_per_step prompts (one completion each) over all processes;
train.micro_batch_size only cuts them into forward passes (the accumulation follows). A rollout holds
ppo.rollout_batch_size completions per process (default: one step's worth). A run whose rollouts all score
alike (no reward spread) is warned about, with what to change.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from llmtune.data.pipeline import PromptExample
from llmtune.engine.batches import Rollouts
from llmtune.engine.contract import StageContext, StageData, StepOutput, Window
from llmtune.engine.distributed import moments_over_processes, sums_over_processes
from llmtune.errors import RecipeError
from llmtune.generation.sample import end_tokens
from llmtune.model.actor_critic import POLICY, build_actor_critic
from llmtune.model.load import LoadedModel, weight_dtype
from llmtune.objectives.logprobs import hidden_states_as_logits, token_logps_from_hidden
from llmtune.objectives.preference import IGNORE_INDEX
from llmtune.objectives.rl import (
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance_of_moments,
    gae,
    kl_estimate,
)
from llmtune.recipe.stages import PpoRecipe
from llmtune.stages.online import (
    JudgeWarnings,
    NoSignalWarning,
    OnlineStage,
    completion_batch,
    micro_batches,
    step_shape,
)

_ROW_KEYS = ("old_logps", "old_values", "advantages", "returns")  # (T-1,) per row, beside ids and labels


class PpoStage(OnlineStage):
    name = "ppo"

    recipe: PpoRecipe

    # --- data and models -----------------------------------------------------------------------------------

    def build_data(
        self, recipe: PpoRecipe, tokenizer: Any, template: str | None, *, trust_reward_code: bool = False
    ) -> StageData:
        from llmtune.rewards.shared import check_shared_rewards

        if recipe.ppo.memory == "shared":  # before any model loads: every reward model an adapter of this base
            check_shared_rewards(recipe)
        return self.prompt_data(recipe, tokenizer, template, trust_reward_code)

    def batch_source(self, data: StageData, recipe: PpoRecipe, dist: Any, collate: Any) -> Rollouts:
        p = recipe.ppo
        shape = step_shape(p.prompts_per_step, 1, recipe.train.micro_batch_size, dist.world_size, "ppo")
        mini = shape["prompts"]  # one step's completions on this process
        size = p.rollout_batch_size or mini
        if size % mini:
            raise RecipeError(
                f"ppo.rollout_batch_size {size} is not a multiple of the {mini} completions one optimizer step takes "
                f"per process (ppo.prompts_per_step {p.prompts_per_step} over {dist.world_size} process(es))",
                hint=f"set ppo.rollout_batch_size to a multiple of {mini} (e.g. {mini * 2}), or change "
                "ppo.prompts_per_step",
            )
        self.rollouts = Rollouts(
            data.train,
            recipe,
            dist,
            size,
            p.ppo_epochs * (size // mini),
            accum=shape["accum"],
            rows_per_step=shape["rows_per_step"],
            step_text=f"{p.prompts_per_step} prompts x 1 generation per step, rollouts of {size * dist.world_size} "
            f"x {p.ppo_epochs} epochs",
        )
        self.judge_warnings = JudgeWarnings()
        self.no_signal = NoSignalWarning(
            "of the rollout's completions scored alike (reward std 0): the policy gets no reward signal, only the "
            "KL penalty",
            "a lower or higher generation.temperature, easier prompts, or a graded reward (a reward model, or a "
            "rule mix such as length_penalty:N); a 0/1 rule that nothing satisfies teaches nothing",
        )
        return self.rollouts

    def load_model(self, recipe: PpoRecipe, device: torch.device, tokenizer: Any) -> LoadedModel:
        """The policy and critic in one module (model.actor_critic); with ppo.memory shared the reward models
        on the same base become reward sources here."""
        from llmtune.rewards.shared import shared_reward_source

        loaded, shared = build_actor_critic(recipe, device, tokenizer)
        self.shared_rewards = {path: shared_reward_source(path, m, recipe) for path, m in shared.items()}
        return loaded

    def before_training(self, ctx: StageContext, data: StageData) -> None:
        from llmtune.rewards import build_rewards

        self.ctx = ctx
        p = self.recipe.ppo
        self.stops = end_tokens(self.policy_model(), self.tokenizer, self.template)
        self.rewards = build_rewards(
            p.reward,
            trust_code=ctx.trust_reward_code,
            device=ctx.dist.device,
            dtype=weight_dtype(self.recipe),
            loaded=self.shared_rewards,
            zero3=ctx.strategy.partition,
        )
        self.reference = None
        if self.recipe.finetuning.method not in ("lora", "qlora"):  # lora: the base with the adapters disabled
            self.reference = self.load_frozen(ctx, self.recipe.model.path, "the reference")
        self.kl_ctl = AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon)
        self.rollouts.make = self.make_rollouts
        self.rollouts.on_step = self.on_step

    def policy_model(self) -> torch.nn.Module:
        return self.engine.module.policy

    def state_dict(self) -> dict[str, Any]:
        return {"kl_controller": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "kl_controller" in state:
            self.kl_ctl.load_state_dict(state["kl_controller"])

    # --- rollouts: sample, score, per-token rewards, GAE --------------------------------------------------

    def make_rollouts(self, prompts: list[PromptExample], seed: int) -> list[Window]:
        p, t = self.recipe.ppo, self.recipe.train
        outs = self._sample(prompts, 1, seed)
        scored = self._score(prompts, outs, 1)
        score = torch.tensor(scored.total, dtype=torch.float32)
        if p.reward_clip is not None:
            score = score.clamp(-p.reward_clip, p.reward_clip)
        rows = []
        for pr, (ids, _) in zip(prompts, outs, strict=True):
            completion = ids  # with the stop token it ended with, if it ended: learned as sampled
            rows.append({"ids": pr.input_ids + completion, "labels": [IGNORE_INDEX] * len(pr.input_ids) + completion})
        mb = t.micro_batch_size
        coef = self.kl_ctl.value
        kl_sums, per_tok_rewards = [], []
        for start in range(0, len(rows), mb):
            chunk = rows[start : start + mb]
            b = _pad(chunk, self.tokenizer.pad_token_id, self.dist.device)
            old, ref, values = self._rollout_forward(b)
            mask = b["mask"]
            kl = kl_estimate(old, ref, p.kl_estimator) * mask
            rewards = -coef * kl
            last = _last_index(mask)
            rewards[torch.arange(len(chunk)), last] += score[start : start + mb].to(rewards.device)
            for i, row in enumerate(chunk):
                n = int(b["lengths"][i]) - 1
                row.update(old_logps=old[i, :n].cpu(), old_values=values[i, :n].cpu(), mask=mask[i, :n].cpu())
                per_tok_rewards.append(rewards[i, :n].cpu())
                kl_sums.append(kl[i].sum().item())
        if p.whiten_rewards:
            flat = torch.cat([r[row["mask"].bool()] for r, row in zip(per_tok_rewards, rows, strict=True)])
            mean, std = _whitening(flat, self.dist.device)
            per_tok_rewards = [(r - mean) / std * row["mask"] for r, row in zip(per_tok_rewards, rows, strict=True)]
        for r, row in zip(per_tok_rewards, rows, strict=True):
            adv, ret = gae(r[None], row["old_values"][None], row["mask"][None], p.gamma, p.lam)
            row["advantages"], row["returns"] = adv[0], ret[0]
        if p.whiten_advantages:
            flat = torch.cat([row["advantages"][row["mask"].bool()] for row in rows])
            mean, std = _whitening(flat, self.dist.device)
            for row in rows:
                row["advantages"] = (row["advantages"] - mean) / std * row["mask"]
        mean_kl, sequences = self._rollout_metrics(scored, rows, kl_sums, coef, outs)
        self.after_rollout(mean_kl, sequences)
        return self._windows(rows, seed)

    @torch.no_grad()
    def _rollout_forward(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Log-probs under the policy and the reference, and the critic's values, (B, T-1) each, in eval mode."""
        model, engine = self.engine.module, self.engine
        was_training = model.training
        model.eval()
        try:
            old = policy_logps(engine, b)[0]
            if self.reference is not None:
                with hidden_states_as_logits(self.reference) as head:
                    out = self.reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
                ref = token_logps_from_hidden(out.logits, b["labels"], head)[0]
            else:
                with model.policy.disable_adapter():
                    ref = policy_logps(engine, b)[0]
            values = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], part="values")[:, :-1]
        finally:
            model.train(was_training)
        return old, ref, values.float() * b["mask"]

    def _windows(self, rows: list[dict], seed: int) -> list[Window]:
        """ppo_epochs passes over the rollout in a seeded order, cut into steps of this process's share of
        prompts_per_step rows, each step cut into micro-batches of micro_batch_size."""
        mb, mini = self.recipe.train.micro_batch_size, self.rollouts.rows_per_step // self.dist.world_size
        windows = []
        for epoch in range(self.recipe.ppo.ppo_epochs):
            g = torch.Generator().manual_seed(seed * 31 + epoch)
            order = torch.randperm(len(rows), generator=g).tolist() if epoch else list(range(len(rows)))
            for s in range(0, len(rows), mini):
                idx = order[s : s + mini]
                pad = self.tokenizer.pad_token_id
                windows.append([_collate([rows[i] for i in chunk], pad) for chunk in micro_batches(idx, mb)])
        return windows

    def after_rollout(self, kl: float, n: int) -> None:
        """Once per rollout, after its metrics: the adaptive KL coefficient takes its step toward ppo.target_kl
        from the rollout's mean KL per sequence over n sequences (a fixed coefficient stays)."""
        self.kl_ctl.update(kl, n)

    def _rollout_metrics(
        self, scored: Any, rows: list[dict], kl_sums: list[float], coef: float, outs: list
    ) -> tuple[float, int]:
        """Reward (overall and per source), KL per sequence, its coefficient, completion length, share ended,
        and how well the critic's values explain the returns: over every process's rollouts. Returns the mean
        KL per sequence and the number of sequences (for the KL controller)."""
        names = sorted(scored.per_source)
        counts = sorted(scored.stats)  # a judge's unparsable / cached judgements, summed over the processes
        masks = [row["mask"].bool() for row in rows]
        ret = torch.cat([row["returns"][m] for row, m in zip(rows, masks, strict=True)]).double()
        val = torch.cat([row["old_values"][m] for row, m in zip(rows, masks, strict=True)]).double()
        parts = [
            float(len(rows)),
            sum(scored.total),
            sum(kl_sums),
            sum(len(ids) - e for ids, e in outs),
            sum(float(e) for _, e in outs),
            float(ret.numel()),
            ret.sum().item(),
            (ret**2).sum().item(),
            (ret - val).sum().item(),
            ((ret - val) ** 2).sum().item(),
            *[sum(scored.per_source[k]) for k in names],
            sum(x * x for x in scored.total),
            *[scored.stats[k] for k in counts],
        ]
        s = sums_over_processes(parts, self.dist.device)
        n, nt = max(s[0], 1.0), max(s[5], 1.0)
        m = self.rollouts.last_metrics
        m.clear()
        m["reward"] = s[1] / n
        m["kl"] = s[2] / n
        m["kl_coef"] = coef
        m["non_score_reward"] = -coef * s[2] / n
        m["completion_length"] = s[3] / n
        m["ended"] = s[4] / n
        m["explained_variance"] = explained_variance_of_moments(s[6] / nt, s[7] / nt, s[8] / nt, s[9] / nt)
        m["reward_std"] = math.sqrt(max(s[10 + len(names)] / n - (s[1] / n) ** 2, 0.0))
        # one completion per prompt: the rollout is the group; all scored alike = no reward signal
        m["frac_reward_zero_std"] = 1.0 if m["reward_std"] < 1e-9 else 0.0
        for k, v in zip(names, s[10 : 10 + len(names)], strict=True):
            m[f"reward/{k}"] = v / n
        for k, v in zip(counts, s[11 + len(names) :], strict=True):
            m[f"reward/{k}"] = v
        return s[2] / n, int(s[0])

    def on_step(self, metrics: dict[str, float]) -> None:
        """ppo.early_stop_kl: the rest of this rollout's steps update nothing once the policy has moved this far
        from the one that sampled it (every rank sees the same reduced metrics, so all stop together)."""
        bound = self.recipe.ppo.early_stop_kl
        if bound is not None and metrics.get("approx_kl", 0.0) > bound:
            self.rollouts.skip_rest = True
        from llmtune.engine.report import run_console

        messages = [self.no_signal.check(metrics.get("frac_reward_zero_std")), *self.judge_warnings.check(metrics)]
        for message in messages:
            if message is not None:
                run_console(self.dist.is_main).print(f"[yellow]{message}[/]")

    # --- the step --------------------------------------------------------------------------------------------

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum().double()

    def step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        p = self.recipe.ppo
        ids, attn = batch["input_ids"], batch["attention_mask"]
        logp, mask, entropy = policy_logps(model, batch, with_entropy=True)  # (B, T-1) each, chunked
        assert entropy is not None
        values = model(input_ids=ids, attention_mask=attn, part="values")[:, :-1]
        old = batch["old_logps"]
        pg, clipped = clipped_policy_loss(logp, old, batch["advantages"], p.cliprange, dual_clip=p.dual_clip)
        vf, vf_clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], mask, p.cliprange_value)
        per_token = pg + p.vf_coef * vf
        if p.entropy_coef > 0:  # the entropy bonus, differentiated through the chunked head as the log-probs are
            per_token = per_token - p.entropy_coef * entropy
        units = mask.sum().double()
        loss_sum = (per_token * mask).sum()
        with torch.no_grad():
            log_ratio = (logp - old) * mask
            metrics = {
                "policy_loss": (pg * mask).sum().double(),
                "value_loss": (vf * mask).sum().double(),
                "clip_fraction": (clipped * mask).sum().double(),
                "value_clip_fraction": vf_clipped.double() * units,
                "entropy": (entropy.detach() * mask).sum().double(),
                "approx_kl": (0.5 * log_ratio**2).sum().double(),
            }
        return StepOutput(loss_sum=loss_sum, units=units, metrics=metrics)

    # --- export: the policy as sft's is; the critic beside it on request -----------------------------------

    def export(self, ctx: StageContext, out: Path) -> list[str]:
        strategy, tokenizer = ctx.strategy, ctx.tokenizer
        files = strategy.export(tokenizer, out, part="policy", adapters=[POLICY])
        if self.recipe.ppo.save_critic:
            from llmtune.model.actor_critic import CRITIC

            if ctx.engine.module.shared:
                # peft writes an adapter not named default into a folder of its name: out/critic/
                strategy.export(None, out, part="policy", adapters=[CRITIC])
                strategy.export(None, out / "critic", part="value_head")
            else:
                strategy.export(tokenizer, out / "critic", part="critic")
        return files


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 -> (B,) index of the last 1 in each row (0 for an empty row)."""
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.zeros_like(pos)).max(dim=1).values


def _whitening(flat: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """Mean and std (population, + 1e-8 inside the root) of values spread over every process."""
    _, mean, var = moments_over_processes(flat, device)
    return mean, math.sqrt(var + 1e-8)


def _pad(rows: list[dict], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels of rows (dicts with ids and labels), their lengths, and the
    (B, T-1) mask of learned positions."""
    b = completion_batch([(r["ids"], r["labels"]) for r in rows], pad_id)
    b = {k: v.to(device) for k, v in b.items()}
    b["mask"] = (b["labels"][:, 1:] != IGNORE_INDEX).float()
    b["lengths"] = b["attention_mask"].sum(dim=1).cpu()
    return b


def _collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A training micro-batch: _pad's tensors plus the rollout's per-token tensors, zero-padded to T-1."""
    b = _pad(rows, pad_id, torch.device("cpu"))
    width = b["input_ids"].shape[1] - 1
    for key in _ROW_KEYS:
        x = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, r in enumerate(rows):
            x[i, : len(r[key])] = r[key]
        b[key] = x
    del b["mask"], b["lengths"]
    return b


def policy_logps(
    model: Any, b: dict[str, torch.Tensor], with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token log-probs (B, T-1) of the labels under the actor-critic's policy, their mask and (with_entropy) the
    entropy per position: from the policy's hidden states, its LM head applied per chunk of positions (no
    (B, T, V) logits). adapter_switching: a peft-wrapped head is not split off where one peft model holds the
    policy and critic adapters (the adapter active in backward could differ)."""
    with hidden_states_as_logits(model, adapter_switching=True) as head:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], part="policy")
    return token_logps_from_hidden(out, b["labels"], head, with_entropy=with_entropy)


STAGE = PpoStage
