"""Reward model: a scalar head on the causal LM backbone, trained on preferences (pairwise / ranked / pointwise);
or, with ``rm.loss: process``, a process reward model: a two-class token head trained at each step's end
(llmtune.data.stepwise, llmtune.objectives.prm)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmtune.data.chat import IGNORE_INDEX
from llmtune.data.packing import collate
from llmtune.data.pipeline import fingerprint_tokenizer
from llmtune.data.preference import build_preference_data, collate_preference
from llmtune.engine.contract import StageContext, StageData, StepOutput
from llmtune.model.load import LoadedModel, ModelSpec, load
from llmtune.objectives.logprobs import token_logps_from_hidden
from llmtune.objectives.preference import (
    bradley_terry_loss,
    pointwise_loss,
    ranked_pairs,
    reward_centering,
)
from llmtune.objectives.prm import step_loss, step_metrics
from llmtune.recipe.schema import MERGEABLE_METHODS
from llmtune.recipe.stages import RmRecipe
from llmtune.stages.base import StageDefaults, recipe_settings

FORMAT_OF_LOSS = {"pairwise": "pairs", "ranked": "ranked", "pointwise": "pointwise"}


class RmStage(StageDefaults):
    name = "rm"
    needs_chat_template = True
    unit_name = "pairs"  # the loss is a mean over preference pairs (pointwise: over responses)

    loss = "pairwise"
    center = 0.0
    lm_weight = 0.0
    lm_head: torch.Tensor | None = None  # (V, H) frozen output embedding, for the LM regulariser

    def build_data(
        self, recipe: RmRecipe, tokenizer: Any, template: str | None, *, trust_reward_code: bool = False
    ) -> StageData:
        assert template is not None
        self.loss, self.center = recipe.rm.loss, recipe.rm.center_rewards_coefficient
        self.lm_weight = recipe.rm.lm_loss_weight
        if self.loss == "process":
            return self._build_steps(recipe, tokenizer, template)
        if self.loss == "pointwise":
            self.unit_name = "responses"
        fmt = FORMAT_OF_LOSS[self.loss]
        settings = recipe_settings(recipe, "preference", fingerprint_tokenizer(tokenizer, template))
        train, evals, reports = build_preference_data(recipe, tokenizer, template, settings, fmt)
        return StageData(train=train, eval=evals, reports=reports)

    def _build_steps(self, recipe: RmRecipe, tokenizer: Any, template: str) -> StageData:
        from llmtune.data.packing import as_samples
        from llmtune.data.pipeline import build_data
        from llmtune.data.stepwise import stepwise_encoder

        self.unit_name = "steps"
        sep = recipe.rm.step_separator
        settings = recipe_settings(recipe, "stepwise", repr(sep), fingerprint_tokenizer(tokenizer, template))
        encoder = stepwise_encoder(tokenizer, template, recipe.data.max_length, sep)
        bundle = build_data(recipe, encoder, settings, "stepwise")
        return StageData(train=as_samples(bundle.train), eval=as_samples(bundle.eval), reports=bundle.reports)

    def load_model(self, recipe: RmRecipe, device: torch.device, tokenizer: Any) -> LoadedModel:
        if recipe.rm.loss == "process":
            self.loss = "process"
            return load(ModelSpec.trained(recipe, head="token"), device, tokenizer)
        loaded = load(ModelSpec.trained(recipe, head="score"), device, tokenizer)
        if recipe.rm.lm_loss_weight > 0:
            from llmtune.model.reward import load_output_embedding

            dtype = next(p.dtype for p in loaded.model.parameters() if p.dtype.is_floating_point)
            self.lm_head = load_output_embedding(recipe, device, dtype)
        return loaded

    def collate(self, samples: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
        if self.loss == "process":
            return collate(samples, pad_id)
        return collate_preference(samples, pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.loss == "process":
            return (batch["labels"] != IGNORE_INDEX).sum()
        if self.loss == "pointwise":
            return torch.tensor(batch["group"].numel(), device=batch["group"].device)
        k = torch.bincount(batch["group"])  # responses per row
        return (k * (k - 1) // 2).sum()

    def step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        if self.loss == "process":
            return self._process_step(model, batch)
        want_hidden = self.lm_weight > 0 and self.lm_head is not None
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
            output_hidden_states=want_hidden,
        )
        rewards = out.logits.squeeze(-1).float()  # (N,): one per response, response-major
        group, rank, value = batch["group"], batch["rank"], batch["value"]
        if self.loss == "pointwise":
            losses = pointwise_loss(rewards, value[group].float())
            return StepOutput(
                losses.sum(), torch.tensor(rewards.numel(), device=rewards.device), {"reward": rewards.detach().sum()}
            )
        b, k = value.numel(), int(rank.max().item()) + 1
        scores = rewards.new_zeros(b, k).index_put((group, rank), rewards)  # (B, K), best first
        present = torch.zeros(b, k, dtype=torch.bool, device=rewards.device).index_put(
            (group, rank), torch.ones_like(group, dtype=torch.bool)
        )
        better, worse, valid = ranked_pairs(scores, present)
        row = torch.arange(b, device=rewards.device).view(b, 1, 1).expand_as(valid)[valid]
        chosen, rejected = better[valid], worse[valid]  # (P,) one entry per pair
        margin = value[row].float() if self.loss == "pairwise" else None
        losses = bradley_terry_loss(chosen, rejected, margin)
        if self.center > 0:
            losses = losses + reward_centering(chosen, rejected, self.center)
        c, r = chosen.detach(), rejected.detach()
        metrics = {
            "accuracy": (c > r).float().sum(),
            "margin": (c - r).sum(),
            "reward_chosen": c.sum(),
            "reward_rejected": r.sum(),
        }
        loss_sum = losses.sum()
        if want_hidden:
            # LM regulariser: w * mean token NLL of each row's preferred response, counted once per pair of the row
            best = (rank == 0).nonzero().squeeze(-1)  # (B,) rows of the preferred responses, in row order
            hidden = out.hidden_states[-1][best]  # (B, T, H)
            w = self.lm_head  # (V, H), frozen: applied per chunk of positions, no (B, T, V) logits
            assert w is not None  # want_hidden
            token_logp, mask, _ = token_logps_from_hidden(hidden, batch["labels"][best], lambda h: h @ w.T)
            nll = -(token_logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
            pairs_per_row = torch.bincount(row, minlength=b).to(nll.dtype)  # (B,)
            lm_sum = (nll * pairs_per_row[group[best]]).sum()
            loss_sum = loss_sum + self.lm_weight * lm_sum
            metrics["lm_loss"] = lm_sum.detach()
        return StepOutput(loss_sum, torch.tensor(chosen.numel(), device=rewards.device), metrics)

    def _process_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        """PRM: cross entropy over the step-end tokens (labels 1 good / 0 bad, -100 elsewhere)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"]  # (B, T)
        loss_sum, n_steps = step_loss(logits, labels)  # logits (B, T, 2)
        with torch.no_grad():
            m = step_metrics(logits.detach(), labels)
        metrics = {"step_accuracy": m["correct_steps"]}
        if not torch.is_grad_enabled():  # evaluation: the chain-level metric, made a ratio in evaluate()
            metrics["first_error_correct"] = m["first_error_correct"]
            metrics["chains"] = m["chains"]
        return StepOutput(loss_sum, n_steps, metrics)

    def evaluate(self, ctx: StageContext, samples: Sequence[Any]) -> dict[str, float]:
        result = super().evaluate(ctx, samples)
        if self.loss == "process" and "eval/chains" in result:
            # both were divided by the step count: their ratio is the share of chains whose first error was found
            right, chains = result.pop("eval/first_error_correct"), result.pop("eval/chains")
            result["eval/first_error_accuracy"] = right / chains if chains > 0 else 0.0
        return result

    def export(self, ctx: StageContext, out: Path) -> list[str]:
        recipe, dist, tokenizer = ctx.recipe, ctx.dist, ctx.tokenizer
        assert isinstance(recipe, RmRecipe)
        files = ctx.strategy.export(tokenizer, out)
        process = recipe.rm.loss == "process"
        if dist.rank == 0 and recipe.finetuning.method in MERGEABLE_METHODS and recipe.rm.export_merged:
            from llmtune.model.reward import save_merged_reward_model

            save_merged_reward_model(recipe, out, out / "merged", tokenizer, head="token" if process else "score")
            files.append("merged/")
        if dist.rank == 0 and process:
            from llmtune.model.reward import write_prm_info

            write_prm_info(out, recipe.rm.step_separator)
            if (out / "merged").is_dir():
                write_prm_info(out / "merged", recipe.rm.step_separator)
            files.append("prm.json")
        return files


STAGE = RmStage
