"""The TRL side of benchmarks/run.py: one case with TRL's own trainer, step times printed as a RESULT line.

    python benchmarks/trl_driver.py '{"stage": "sft", "method": "lora", ...}'   (run.py writes the arguments)

The settings mirror the llmtune recipe run.py writes for the same case: model, data rows, max_length,
micro-batch, steps, learning rate and schedule, LoRA set-up, precision. Step time is measured from one step's
end to the next (data loading, forward, backward, optimizer step, callbacks; generation for grpo).
"""

from __future__ import annotations

import json
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _lora(a: dict, task: str):
    from peft import LoraConfig

    return LoraConfig(
        r=a["lora_r"], lora_alpha=2 * a["lora_r"], lora_dropout=0.0, target_modules="all-linear", task_type=task
    )


def main() -> None:
    a = json.loads(sys.argv[1])
    stage, method = a["stage"], a["method"]
    cuda = torch.cuda.is_available()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a["precision"]]
    tok = AutoTokenizer.from_pretrained(a["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    load = {"dtype": dtype, "attn_implementation": "sdpa"}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        load["device_map"] = "cuda" if cuda else "cpu"
    if stage == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(a["model"], num_labels=1, **load)
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(a["model"], **load)
    peft_config = None
    if method in ("lora", "qlora"):
        peft_config = _lora(a, "SEQ_CLS" if stage == "rm" else "CAUSAL_LM")

    times: list[float] = []

    class Timer(TrainerCallback):  # step end to step end
        t: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            if self.t is not None:
                times.append(now - self.t)
            self.t = now

    common = dict(
        output_dir=a["out"], per_device_train_batch_size=a["micro_batch"], max_steps=a["steps"],
        learning_rate=a["lr"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=10**6, report_to=[], save_strategy="no", bf16=a["precision"] == "bf16", use_cpu=not cuda,
        dataloader_num_workers=0, seed=0, gradient_checkpointing=False, gradient_accumulation_steps=1,
    )  # fmt: skip
    rows = _rows(a["data"])
    if stage in ("sft", "cpt"):
        from trl import SFTConfig, SFTTrainer

        if stage == "cpt":  # documents of max_length - 1 tokens + EOS: one document a packed row, as llmtune's packing
            ds = Dataset.from_list([{"text": r["text"]} for r in rows])
            extra = dict(packing=True, packing_strategy="wrapped")
        else:
            ds = Dataset.from_list([{"messages": r["messages"]} for r in rows])
            extra = dict(packing=False, assistant_only_loss=False)
        cfg = SFTConfig(max_length=a["max_length"], **extra, **common)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    elif stage == "rm":
        from trl import RewardConfig, RewardTrainer

        ds = Dataset.from_list([_conversational_pair(r) for r in rows])
        cfg = RewardConfig(max_length=a["max_length"], **common)
        trainer = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    elif stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        ds = Dataset.from_list([_conversational_pair(r) for r in rows])
        cfg = DPOConfig(
            max_length=a["max_length"], beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=a["precompute"],
            **common,
        )  # fmt: skip
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    elif stage == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        ds = Dataset.from_list(
            [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
        )

        def exact_match(completions, answer, **kwargs):  # llmtune's exact_match rule
            return [float(c[0]["content"].strip() == x.strip()) for c, x in zip(completions, answer, strict=True)]

        cfg = GRPOConfig(
            num_generations=a["num_generations"], max_completion_length=a["max_new_tokens"], temperature=1.0,
            top_p=1.0, beta=0.0, loss_type="dapo", epsilon=0.2, num_iterations=1, scale_rewards="group",
            mask_truncated_completions=False, steps_per_generation=1, log_completions=False, **common,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=model, reward_funcs=exact_match, args=cfg, train_dataset=ds, processing_class=tok,
            peft_config=peft_config,
        )  # fmt: skip
    else:
        raise SystemExit(f"no TRL trainer for stage {stage}")
    trainer.add_callback(Timer())
    trainer.train()
    print("RESULT " + json.dumps({"times": times}), flush=True)


def _conversational_pair(r: dict) -> dict:
    return {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    }


if __name__ == "__main__":
    main()
