"""What the online stages (grpo, ppo) share: prompts as data, sampling completions with the current policy,
scoring them with the recipe's reward block, and an evaluation that scores greedy completions of held-out
prompts. A stage says where its reward block is (``reward_config``) and which module generates
(``policy_model``); the rest is here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from llmtune.data.packing import Sample, collate
from llmtune.data.pipeline import PromptExample, build_data
from llmtune.data.prompts import prompt_encoder
from llmtune.engine.contract import Batch, StageContext, StageData
from llmtune.engine.distributed import DistInfo, sums_over_processes
from llmtune.engine.report import run_console
from llmtune.errors import RecipeError, RolloutInterrupted
from llmtune.generation.sample import GenerationProgress, generation_batch, rollout
from llmtune.stages.base import StageDefaults


def step_shape(prompts_per_step: int, generations: int, micro_batch_size: int, world_size: int, what: str) -> dict:
    """How a step counted in prompts is cut: `prompts_per_step` prompts over all processes, `generations`
    completions (rows) each, split into micro-batches of `micro_batch_size` rows for memory only. Returns this
    process's prompts and rows per step, the micro-batches (accumulation) that hold them, and the rows per step
    over all processes. RecipeError when the prompts do not split evenly over the processes."""
    if prompts_per_step % world_size:
        up = -(-prompts_per_step // world_size) * world_size
        raise RecipeError(
            f"{what}.prompts_per_step {prompts_per_step} does not split evenly over {world_size} processes",
            hint=f"set {what}.prompts_per_step to a multiple of {world_size} (e.g. {up})",
        )
    prompts = prompts_per_step // world_size
    rows = prompts * generations
    return {
        "prompts": prompts,
        "rows": rows,
        "accum": math.ceil(rows / micro_batch_size),
        "rows_per_step": rows * world_size,
    }


def completion_batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-padded input_ids, attention_mask and labels of (ids, labels) rows, each a prompt and its sampled
    completion (the prompt's labels IGNORE_INDEX): the rows of a rollout, one per completion, unpacked."""
    return collate([Sample(ids, labels) for ids, labels in rows], pad_id, pad_to_multiple=1)


def micro_batches(rows: list[Any], micro_batch_size: int) -> list[list[Any]]:
    """A step's rows cut into micro-batches of micro_batch_size (the last may be smaller): what fits in memory
    at once; the loss is normalised over the whole step, so the cut does not change the update."""
    return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


class NoSignalWarning:
    """Says when a step had (nearly) no learning signal: `share` >= `at` (0.9) of its groups without reward
    spread. Once at the first such step, then at most every `every` steps while it goes on, each time with
    what to change. ``check`` returns the message to print, or None."""

    def __init__(self, what: str, fix: str, at: float = 0.9, every: int = 50) -> None:
        self.what, self.fix, self.at, self.every = what, fix, at, every
        self.step = 0  # steps seen
        self.last: int | None = None  # the step of the last warning
        self.count = 0  # steps without signal so far

    def check(self, share: float | None) -> str | None:
        self.step += 1
        if share is None or share < self.at:
            return None
        self.count += 1
        if self.last is not None and self.step - self.last < self.every:
            return None
        self.last = self.step
        again = f" ({self.count} such steps so far)" if self.count > 1 else ""
        return f"warning: this step, {share:.0%} {self.what}{again}\nfix: {self.fix}"


class JudgeWarnings:
    """Says when a judge's judgements were mostly unparsable in a step (>= half: `reward/<judge>/unparsable`
    over `reward/<judge>/judged`), per judge, as NoSignalWarning does."""

    def __init__(self) -> None:
        self.judges: dict[str, NoSignalWarning] = {}

    def check(self, metrics: dict[str, float]) -> list[str]:
        out = []
        for key in sorted(k for k in metrics if k.endswith("/judged") and k.startswith("reward/")):
            name = key[len("reward/") : -len("/judged")]
            judged, bad = metrics[key], metrics.get(f"reward/{name}/unparsable", 0.0)
            warn = self.judges.setdefault(
                name,
                NoSignalWarning(
                    f"of {name}'s judgements had no usable score (they got reward.judge.unparsable's score)",
                    "check that the rubric asks for 'Score: N' in its scale, raise the judge's max_new_tokens, or "
                    "use a stronger (larger, instruction-tuned) judge",
                    at=0.5,
                ),
            )
            message = warn.check(bad / judged if judged else None)
            if message is not None:
                out.append(message)
        return out


class OnlineStage(StageDefaults):
    needs_chat_template = True

    recipe: Any
    tokenizer: Any
    template: str | None
    ctx: StageContext  # handed in by before_training
    rewards: Any
    stops: list[int]

    @property
    def engine(self) -> Any:
        return self.ctx.engine

    @property
    def dist(self) -> DistInfo:
        return self.ctx.dist

    def reward_config(self, recipe: Any) -> Any:
        """The stage's reward block: ``<stage>.reward`` (grpo.reward, ppo.reward)."""
        return getattr(recipe, self.name).reward

    def policy_model(self) -> torch.nn.Module:
        """The module that generates: the engine's model (grpo), or its policy part (ppo)."""
        return self.engine.module

    def prompt_data(self, recipe: Any, tokenizer: Any, template: str | None, trust_reward_code: bool) -> StageData:
        """The reward block checked (before any data or model work), then the prompts, cut to leave room for
        generation.max_new_tokens within data.max_length."""
        from llmtune.rewards import check_rewards

        self.recipe, self.tokenizer, self.template = recipe, tokenizer, template
        check_rewards(self.reward_config(recipe), trust_code=trust_reward_code)
        budget = recipe.data.max_length - recipe.generation.max_new_tokens
        if budget < 8:
            raise RecipeError(
                f"data.max_length {recipe.data.max_length} leaves {budget} tokens of prompt next to "
                f"generation.max_new_tokens {recipe.generation.max_new_tokens}",
                hint="raise data.max_length or lower generation.max_new_tokens",
            )
        bundle = build_data(
            recipe, prompt_encoder(tokenizer, template, budget), "prompts", default_format="prompts", use_cache=False
        )
        return StageData(train=bundle.train, eval=bundle.eval, reports=bundle.reports)

    def _sample(self, prompts: list[PromptExample], repeat: int, seed: int, greedy: bool = False) -> list[Any]:
        ids = [p.input_ids for p in prompts for _ in range(repeat)]
        gen = self.recipe.generation
        if greedy:
            gen = gen.model_copy(update={"temperature": 0.0})
        bs = generation_batch(gen.batch_size, self.recipe.train.micro_batch_size)
        say = run_console(self.dist.is_main).print
        progress = GenerationProgress(say, len(ids), "eval: sampled" if greedy else "rollout: sampled", after_s=30)
        with self.ctx.strategy.full_weights(self.policy_model()):
            outs = rollout(
                self.policy_model(),
                self.tokenizer,
                ids,
                gen,
                seed=seed,
                stops=self.stops,
                device=self.dist.device,
                batch_size=bs,
                keep_stop=True,  # the stop token sampled is learned as sampled (its log-prob enters the ratio)
                on_batch=progress,  # a line at each tenth of a rollout that takes more than 30 s
                should_stop=self.ctx.interrupt,  # SIGTERM while sampling: end within a token, checkpoint
            )
        if self.ctx.interrupt():
            raise RolloutInterrupted("a stop was requested while sampling")
        return outs

    def _score(self, prompts: list[PromptExample], outs: list[Any], repeat: int) -> Any:
        texts = [self.tokenizer.decode(ids[: len(ids) - ended], skip_special_tokens=True) for ids, ended in outs]
        messages = [p.prompt.messages for p in prompts for _ in range(repeat)]
        answers = [p.prompt.answer for p in prompts for _ in range(repeat)]
        return self.rewards(messages, texts, answers, [ended for _, ended in outs])

    # --- evaluation: greedy completions of the held-out prompts, scored -----------------------------------

    def evaluate(self, ctx: StageContext, samples: Sequence[Any]) -> dict[str, float]:
        recipe, dist = ctx.recipe, ctx.dist
        mine = samples[dist.rank :: dist.world_size]
        per_rank = math.ceil(len(samples) / dist.world_size)
        padded = list(mine or samples[:1]) * math.ceil(per_rank / max(len(mine), 1))  # same generate calls everywhere
        chosen = padded[:per_rank]
        outs = self._sample(chosen, 1, recipe.seed, greedy=True)
        scored = self._score(chosen, outs, 1)
        keep = len(mine)
        names = sorted(scored.per_source)
        vals = [
            float(keep),
            sum(scored.total[:keep]),
            sum(len(ids) - e for ids, e in outs[:keep]),  # without the stop token
            sum(float(e) for _, e in outs[:keep]),
            *[sum(scored.per_source[k][:keep]) for k in names],
        ]
        s = sums_over_processes(vals, dist.device)
        n = max(s[0], 1.0)
        result = {"eval/reward": s[1] / n, "eval/completion_length": s[2] / n, "eval/ended": s[3] / n}
        for k, v in zip(names, s[4:], strict=True):
            result[f"eval/reward/{k}"] = v / n
        return result
