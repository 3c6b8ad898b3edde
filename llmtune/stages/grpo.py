"""Group relative policy optimisation (GRPO, and RLOO with grpo.advantage: rloo).

Each step: take prompts, sample grpo.num_generations completions per prompt with the current policy, score
them (llmtune.rewards), turn the scores into advantages within each prompt's group, then update the policy
with the clipped importance-ratio objective. With grpo.beta > 0 a k3 KL penalty to the reference (the
starting model: with lora / qlora the base with the adapter disabled, otherwise a frozen copy) is added to
the loss per token. The loop, checkpoints, logging and export are the engine's; this module declares the
batch source (rollouts), the step and the evaluation.

A step is counted in prompts: grpo.prompts_per_step prompts over all processes, num_generations completions
each; train.micro_batch_size only cuts those rows into forward passes (the accumulation follows). With
grpo.dynamic_sampling, groups without reward spread are replaced by groups of freshly drawn prompts (up to
grpo.dynamic_sampling_draws extra draws per step); a run where nearly every group has no spread is warned
about, with what to change.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llmtune.data.pipeline import PromptExample
from llmtune.engine.batches import Rollouts
from llmtune.engine.contract import StageContext, StageData, StepOutput, Window
from llmtune.engine.distributed import all_reduce_sum, moments_over_processes, sums_over_processes
from llmtune.generation.sample import end_tokens
from llmtune.model.load import weight_dtype
from llmtune.objectives.preference import IGNORE_INDEX
from llmtune.objectives.rl import (
    aggregate_loss,
    clipped_policy_loss,
    group_advantages,
    kl_estimate,
    masked_mean,
    pick_groups_with_spread,
    rloo_advantages,
    zero_std_groups,
)
from llmtune.recipe.stages import GrpoRecipe
from llmtune.stages.base import lm_token_logps
from llmtune.stages.online import (
    JudgeWarnings,
    NoSignalWarning,
    OnlineStage,
    completion_batch,
    micro_batches,
    step_shape,
)


class GrpoStage(OnlineStage):
    name = "grpo"

    recipe: GrpoRecipe

    # --- data: prompts, and the rollouts made from them ------------------------------------------------------

    def build_data(
        self, recipe: GrpoRecipe, tokenizer: Any, template: str | None, *, trust_reward_code: bool = False
    ) -> StageData:
        self.unit_name = "tokens" if recipe.grpo.loss_type == "dapo" else "completions"
        return self.prompt_data(recipe, tokenizer, template, trust_reward_code)

    def batch_source(self, data: StageData, recipe: GrpoRecipe, dist: Any, collate: Any) -> Rollouts:
        g = recipe.grpo
        shape = step_shape(
            g.prompts_per_step, g.num_generations, recipe.train.micro_batch_size, dist.world_size, "grpo"
        )
        self.rollouts = Rollouts(
            data.train,
            recipe,
            dist,
            shape["prompts"],
            g.num_iterations,  # num_iterations steps on each rollout's one window
            accum=shape["accum"],
            rows_per_step=shape["rows_per_step"],
            step_text=f"{g.prompts_per_step} prompts x {g.num_generations} generations per step"
            + (" (dynamic sampling)" if g.dynamic_sampling else ""),
        )
        self.judge_warnings = JudgeWarnings()
        self.no_signal = NoSignalWarning(
            f"of the groups have zero reward spread (all {g.num_generations} completions of a prompt scored "
            "alike): they give no gradient (loss 0, grad_norm 0)",
            "more generations (grpo.num_generations), a lower or higher generation.temperature, easier prompts, "
            "or a graded reward (a reward model, or a rule mix such as length_penalty:N)"
            + ("" if g.dynamic_sampling else "; grpo.dynamic_sampling: true replaces such groups"),
        )
        self.rollouts.on_step = self.on_step
        return self.rollouts

    def on_step(self, metrics: dict[str, float]) -> None:
        from llmtune.engine.report import run_console

        messages = [self.no_signal.check(metrics.get("frac_reward_zero_std")), *self.judge_warnings.check(metrics)]
        for message in messages:
            if message is not None:
                run_console(self.dist.is_main).print(f"[yellow]{message}[/]")

    def before_training(self, ctx: StageContext, data: StageData) -> None:
        from llmtune.rewards import build_rewards

        self.ctx = ctx
        self.stops = end_tokens(ctx.engine.module, self.tokenizer, self.template)
        self.rewards = build_rewards(
            self.recipe.grpo.reward,
            trust_code=ctx.trust_reward_code,
            device=ctx.dist.device,
            dtype=weight_dtype(self.recipe),
            zero3=ctx.strategy.partition,
        )
        self.reference = None
        lora = self.recipe.finetuning.method in ("lora", "qlora")
        if self.recipe.grpo.beta > 0 and not lora:  # lora: the base with the adapter disabled, no second copy
            self.reference = self.load_frozen(ctx, self.recipe.model.path, "the reference")
        self.rollouts.make = self.make_rollouts

    def make_rollouts(self, prompts: list[PromptExample], seed: int) -> list[Window]:
        """Generate and score this rank's completions (with dynamic sampling: more prompts in place of the
        groups without reward spread), compute advantages, and cut them into the window's micro-batches (with
        the old and reference log-probs the step needs)."""
        cfg, t = self.recipe.grpo, self.recipe.train
        g = cfg.num_generations
        drawn, outs = list(prompts), self._sample(prompts, g, seed)
        scored = self._score(prompts, outs, g)
        totals, sources = list(scored.total), {k: list(v) for k, v in scored.per_source.items()}
        stats = dict(scored.stats)
        draws = 0
        if cfg.dynamic_sampling:
            for draw in range(1, cfg.dynamic_sampling_draws + 1):
                zero = zero_std_groups(torch.tensor(totals, dtype=torch.float64), g).tolist()
                short = max(0, len(prompts) - zero.count(False))
                # every process draws as long as one is short: generation (ZeRO-3) and reward models are collective
                if all_reduce_sum(torch.tensor([float(short)], device=self.dist.device)).item() == 0:
                    break
                extra = self.rollouts.extra_prompts(seed, draw)
                more = self._sample(extra, g, seed * 1009 + draw)
                res = self._score(extra, more, g)
                drawn, outs, totals = drawn + extra, outs + more, totals + list(res.total)
                for k, v in res.per_source.items():
                    sources[k] += list(v)
                for k, v in res.stats.items():
                    stats[k] += v
                draws = draw
        sampled = torch.tensor(totals, dtype=torch.float64)
        zero = zero_std_groups(sampled, g).tolist()
        keep = pick_groups_with_spread(zero, len(prompts)) if cfg.dynamic_sampling else list(range(len(prompts)))
        self._rollout_metrics(sources, sampled, outs, g, [zero[i] for i in keep], draws, stats)
        rows_of = [i * g + j for i in keep for j in range(g)]
        rewards = sampled[rows_of]
        if cfg.advantage == "rloo":
            adv = rloo_advantages(rewards, g)
        elif cfg.scale_rewards == "batch":  # the std of the whole step's rewards, over every process
            adv = group_advantages(rewards, g, scale="none") / (_global_std(rewards, self.dist.device) + 1e-4)
        else:
            adv = group_advantages(rewards, g, scale=cfg.scale_rewards)

        rows = []
        for r, a in zip(rows_of, adv.tolist(), strict=True):
            # the stop token the sample ended with is learned as sampled: its log-prob enters the importance
            # ratio and the KL, and a stop token the loss never saw could otherwise drift up unpenalised
            p, (completion, ended) = drawn[r // g], outs[r]
            learn = not (cfg.mask_truncated_completions and not ended)
            labels = [IGNORE_INDEX] * len(p.input_ids) + (completion if learn else [IGNORE_INDEX] * len(completion))
            rows.append((p.input_ids + completion, labels, a))
        window = [self._collate(chunk) for chunk in micro_batches(rows, t.micro_batch_size)]
        if cfg.num_iterations > 1 or cfg.beta > 0:
            self._add_logps(window)
        return [window] * cfg.num_iterations

    def _collate(self, rows: list[tuple[list[int], list[int], float]]) -> dict[str, torch.Tensor]:
        batch = completion_batch([(x, y) for x, y, _ in rows], self.tokenizer.pad_token_id)
        batch["advantages"] = torch.tensor([r[2] for r in rows], dtype=torch.float32)
        return batch

    @torch.no_grad()
    def _add_logps(self, window: Window) -> None:
        """Log-probs of the completions before any update (old, for num_iterations > 1) and under the
        reference (beta > 0), computed once per rollout in eval mode."""
        model = self.engine.module
        was_training = model.training
        model.eval()
        dev = self.dist.device
        for batch in window:
            b = {k: v.to(dev) for k, v in batch.items()}
            if self.recipe.grpo.num_iterations > 1:
                batch["old_logps"] = lm_token_logps(self.engine, b)[0].cpu()
            if self.recipe.grpo.beta > 0:
                if self.reference is not None:
                    ref = lm_token_logps(self.reference, b)[0]
                else:
                    with model.disable_adapter():
                        ref = lm_token_logps(self.engine, b)[0]
                batch["ref_logps"] = ref.cpu()
        model.train(was_training)

    def _rollout_metrics(
        self,
        sources: dict[str, list[float]],
        rewards: torch.Tensor,
        outs: list[Any],
        g: int,
        trained_zero: list[bool],
        draws: int,
        stats: dict[str, float] | None = None,
    ) -> None:
        """Reward mean / std (overall and per source), share of groups with no reward spread, completion
        length and share that ended: over every process's sampled completions (extra draws included); with
        dynamic sampling also the extra draws and the share of trained groups without spread; the sources' counts
        (a judge's unparsable and cached judgements) summed over the processes, as reward/<source>/<count>."""
        lengths = torch.tensor([len(ids) - e for ids, e in outs], dtype=torch.float64)
        ended = torch.tensor([float(e) for _, e in outs], dtype=torch.float64)
        names = sorted(sources)
        counts = sorted(stats or {})
        parts = [
            torch.tensor(float(len(rewards))),
            rewards.sum(),
            (rewards**2).sum(),
            zero_std_groups(rewards, g).double().sum(),
            torch.tensor(float(len(rewards) // g)),
            lengths.sum(),
            ended.sum(),
            torch.tensor(float(sum(trained_zero))),
            torch.tensor(float(len(trained_zero))),
            *[torch.tensor(sources[k], dtype=torch.float64).sum() for k in names],
            *[torch.tensor(float((stats or {})[k])) for k in counts],
        ]
        s = sums_over_processes(parts, self.dist.device)
        n = max(s[0], 1.0)
        mean = s[1] / n
        m = self.rollouts.last_metrics
        m.clear()
        m["reward"] = mean
        m["reward_std"] = math.sqrt(max(s[2] / n - mean**2, 0.0))
        m["frac_reward_zero_std"] = s[3] / max(s[4], 1.0)
        m["completion_length"] = s[5] / n
        m["ended"] = s[6] / n
        if self.recipe.grpo.dynamic_sampling:
            m["extra_draws"] = float(draws)
            m["frac_trained_zero_std"] = s[7] / max(s[8], 1.0)
        for k, v in zip(names, s[9 : 9 + len(names)], strict=True):
            m[f"reward/{k}"] = v / n
        for k, v in zip(counts, s[9 + len(names) :], strict=True):
            m[f"reward/{k}"] = v

    # --- the step ---------------------------------------------------------------------------------------------

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.recipe.grpo.loss_type == "dapo":
            return (batch["labels"][:, 1:] != IGNORE_INDEX).sum().double()
        return torch.tensor(float(batch["labels"].shape[0]), dtype=torch.float64, device=batch["labels"].device)

    def step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        cfg = self.recipe.grpo
        logp, mask, entropy = lm_token_logps(model, batch, with_entropy=True)  # (B, T-1) each, chunked
        old = batch["old_logps"] if "old_logps" in batch else logp.detach()
        per_token, clipped = clipped_policy_loss(logp, old, batch["advantages"], cfg.epsilon, cfg.epsilon_high)
        kl = None
        if cfg.beta > 0:
            kl = kl_estimate(logp, batch["ref_logps"], "k3")  # (B, T-1)
            per_token = per_token + cfg.beta * kl
        loss_sum, units = aggregate_loss(per_token, mask, cfg.loss_type, self.recipe.generation.max_new_tokens)
        with torch.no_grad():  # token means of this micro-batch, weighted by its units in the step's mean
            assert entropy is not None
            metrics = {
                "clip_fraction": masked_mean(clipped, mask) * units,
                "entropy": masked_mean(entropy.detach(), mask) * units,
            }
            if kl is not None:
                metrics["kl"] = masked_mean(kl.detach(), mask) * units
        return StepOutput(loss_sum=loss_sum, units=units, metrics=metrics)


def _global_std(rewards: torch.Tensor, device: torch.device) -> float:
    """The sample std (n - 1) of the rewards of every process together."""
    n, _, var = moments_over_processes(rewards, device)
    return math.sqrt(var * n / max(n - 1, 1))


STAGE = GrpoStage
