"""Direct preference optimisation of a causal LM (dpo.loss: sigmoid, robust, ipo, hinge, simpo; kto on unpaired rows).

Chosen and rejected go through the policy in one forward pass (2B rows). The reference log-probs come from
(dpo.reference) a separate model, or (null) the same base with the LoRA adapter disabled, or with full /
freeze a frozen copy of model.path. With dpo.precompute_reference (the default) they are computed once
before training, in a no-grad pass shared out over the ranks, and travel with the samples; training then
runs one model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from llmtune.data.pipeline import fingerprint_tokenizer
from llmtune.data.preference import PreferenceSample, build_preference_data, collate_preference
from llmtune.engine.contract import StageContext, StageData, StepOutput, Window
from llmtune.engine.distributed import all_reduce_sum
from llmtune.engine.report import run_console
from llmtune.model.tokenizer import check_reference_tokenizer
from llmtune.objectives.preference import (
    dpo_loss,
    kto_loss,
    kto_reference_point,
    sequence_logps,
    simpo_loss,
)
from llmtune.recipe.stages import DpoRecipe
from llmtune.stages.base import StageDefaults, lm_token_logps, recipe_settings


def batch_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob (N,) of the labelled reply of every row, and its token count (N,)."""
    lp, mask, _ = lm_token_logps(model, batch)  # (N, T-1), chunked: no (N, T, V) logits
    return sequence_logps(lp, mask)


class DpoStage(StageDefaults):
    name = "dpo"
    needs_chat_template = True
    unit_name = "pairs"  # kto: completions

    recipe: DpoRecipe
    reference: torch.nn.Module | None = None  # kept only when reference log-probs are not precomputed

    def build_data(
        self, recipe: DpoRecipe, tokenizer: Any, template: str | None, *, trust_reward_code: bool = False
    ) -> StageData:
        assert template is not None
        self.recipe, self.tokenizer = recipe, tokenizer
        if recipe.dpo.reference is not None and recipe.dpo.loss != "simpo":
            check_reference_tokenizer(recipe, recipe.dpo.reference, tokenizer)  # before any data or model work
        kto = recipe.dpo.loss == "kto"
        if kto:
            self.unit_name = "completions"
        settings = recipe_settings(recipe, "preference", fingerprint_tokenizer(tokenizer, template))
        train, evals, reports = build_preference_data(
            recipe, tokenizer, template, settings, "unpaired" if kto else "pairs"
        )
        return StageData(train=train, eval=evals, reports=reports)

    def collate(self, samples: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_preference(samples, pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(batch["value"].numel(), device=batch["value"].device)

    # --- the reference ---------------------------------------------------------------------------------------

    def _adapter_is_reference(self) -> bool:
        return self.recipe.dpo.reference is None and self.recipe.finetuning.method in ("lora", "qlora")

    def before_training(self, ctx: StageContext, data: StageData) -> None:
        cfg, dist = self.recipe.dpo, ctx.dist
        if cfg.loss == "simpo":  # reference-free
            return
        ref: Any = None
        if not self._adapter_is_reference():
            path = cfg.reference or self.recipe.model.path
            ref = self.load_frozen(ctx, path, "dpo.reference")
        if not cfg.precompute_reference:
            self.reference = ref
            return
        # only the training rows this run's steps will reach (a short max_steps run needs a few batches)
        train = data.train if data.reached is None else [data.train[i] for i in sorted(data.reached)]
        console = run_console(dist.is_main)
        t0 = time.perf_counter()
        console.print(f"reference log-probs: {len(train):,} training and {len(data.eval):,} eval rows ...")
        for samples in (train, data.eval):
            self._precompute(ctx.engine, ref, samples, dist, ctx.collate)
        console.print(f"reference log-probs: done in {time.perf_counter() - t0:.1f} s")
        del ref

    def _reference_logps(self, model: Any, ref: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if ref is not None:
                return batch_logps(ref, batch)[0]
            with model.module.disable_adapter():  # the policy's base: the reference, no second copy
                return batch_logps(model, batch)[0]

    def _precompute(self, engine: Any, ref: Any, samples: Sequence[PreferenceSample], dist: Any, collate: Any) -> None:
        """Reference log-probs of every response of every sample: each rank takes a shard (the same number of
        forward passes on every rank, as ZeRO-3 needs), then the results are summed over ranks."""
        if not samples:
            return
        bs = self.recipe.train.eval_batch_size or self.recipe.train.micro_batch_size
        k = max(len(s.parts) for s in samples)
        mine = list(range(dist.rank, len(samples), dist.world_size))
        n_batches = math.ceil(math.ceil(len(samples) / dist.world_size) / bs)
        table = torch.zeros(len(samples), k, dtype=torch.float64, device=dist.device)
        was_training = engine.module.training
        engine.module.eval()
        for i in range(n_batches):
            idx = mine[i * bs : (i + 1) * bs]
            chunk = idx or mine[-1:] or [0]  # a rank with fewer rows repeats one (its result is not kept)
            batch = {name: t.to(dist.device) for name, t in collate([samples[j] for j in chunk]).items()}
            logps = self._reference_logps(engine, ref, batch).double()
            if idx:
                rows = torch.tensor(idx, device=dist.device)[batch["group"]]
                table[rows, batch["rank"]] = logps
        if was_training:
            engine.module.train()
        table = all_reduce_sum(table).cpu()
        for j, s in enumerate(samples):
            s.ref_logps = table[j, : len(s.parts)].tolist()

    def prepare_window(self, ctx: StageContext, batches: Window) -> None:
        """KTO's reference point z0 = mean(log pi - log ref) over the whole step (every micro-batch of every
        process), clamped at 0: the update then does not depend on how the step is split into micro-batches.
        One extra forward pass without gradients per micro-batch."""
        if self.recipe.dpo.loss != "kto":
            return
        engine, dist = ctx.engine, ctx.dist
        total = torch.zeros(2, dtype=torch.float64, device=dist.device)
        with torch.no_grad():
            for b in batches:
                logps, _ = batch_logps(engine, b)
                ref = b["ref_logps"] if "ref_logps" in b else self._reference_logps(engine, self.reference, b)
                total += torch.stack(
                    [
                        (logps.double() - ref.double()).sum(),
                        torch.tensor(logps.numel(), device=dist.device, dtype=torch.float64),
                    ]
                )
        total = all_reduce_sum(total)
        z0 = (total[0] / total[1].clamp(min=1)).clamp(min=0).float()
        for b in batches:
            b["kto_kl"] = z0

    # --- the step ----------------------------------------------------------------------------------------------

    def step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        cfg = self.recipe.dpo
        logps, lengths = batch_logps(model, batch)  # (N,): one forward pass over chosen and rejected
        ref = None
        if cfg.loss != "simpo":
            ref = batch["ref_logps"] if "ref_logps" in batch else self._reference_logps(model, self.reference, batch)
            ref = ref.float()
        b = batch["value"].numel()
        if cfg.loss == "kto":
            assert ref is not None
            desirable = batch["value"] > 0.5
            # the whole step's reference point (prepare_window); in evaluation, the batch's own
            kl = batch["kto_kl"] if "kto_kl" in batch else kto_reference_point(logps, ref)
            losses, rewards = kto_loss(
                logps, ref, desirable, kl, cfg.beta, cfg.kto_desirable_weight, cfg.kto_undesirable_weight
            )
            metrics = {"reward": rewards.sum(), "logps": logps.detach().sum(), "kl": kl * b}
            return StepOutput(losses.sum(), torch.tensor(b, device=logps.device), metrics)
        pc, pr, lc, lr = logps[:b], logps[b:], lengths[:b], lengths[b:]
        if cfg.loss == "simpo":
            out = simpo_loss(pc, pr, lc, lr, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
        else:
            assert ref is not None
            rc, rr = ref[:b], ref[b:]
            if cfg.loss == "ipo":  # IPO on per-token mean log-probs (as TRL does)
                pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
            out = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss, cfg.label_smoothing)
        losses = out.losses
        if cfg.sft_weight > 0:  # RPO: per-token NLL of the chosen reply
            losses = losses + cfg.sft_weight * (-logps[:b] / lengths[:b].clamp(min=1))
        c, r = out.chosen_rewards, out.rejected_rewards
        metrics = {
            "accuracy": (c > r).float().sum(),
            "margin": (c - r).sum(),
            "reward_chosen": c.sum(),
            "reward_rejected": r.sum(),
            "logps_chosen": logps[:b].detach().sum(),
            "logps_rejected": logps[b:].detach().sum(),
        }
        return StepOutput(losses.sum(), torch.tensor(b, device=logps.device), metrics)


STAGE = DpoStage
