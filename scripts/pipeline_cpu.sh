#!/usr/bin/env bash
# The whole adaptation pipeline on the tiny offline model, on CPU, in a few minutes:
#
#   cpt -> sft (LoRA) -> merge-lora -> rm -> dpo (LoRA) -> eval
#
#   bash scripts/pipeline_cpu.sh [OUT]        # default OUT: runs/pipeline
#
# Each stage's output directory is the next one's input, exactly as with real models; only the model, the
# data and the step counts are small. Needs the installed package (see README) and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/pipeline}
Q=recipes/quickstart
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# 1. continued pretraining (full weights) on plain text, packed
llmtune train recipes/quickstart.yaml --set stage=cpt --set output_dir="$OUT/cpt" \
  --set finetuning.method=full --set finetuning.modules_to_save='[]' \
  --set "data.train=[{path: $Q/cpt.txt, format: text}]" --set data.packing=true --set data.max_length=128 \
  --set train.epochs=1 --set train.lr=2e-3 --set train.eval_every=null

# 2. supervised fine-tuning with LoRA, starting from the cpt model
llmtune train recipes/quickstart.yaml --set output_dir="$OUT/sft" --set model.path="$OUT/cpt" --set train.epochs=1

# 3. a standalone sft model (the LoRA merged into the cpt weights)
llmtune merge-lora --base "$OUT/cpt" --adapter "$OUT/sft" --out "$OUT/sft-merged" --overwrite

# 4. a reward model on preference pairs, starting from the sft model
llmtune train recipes/quickstart.yaml --set stage=rm --set output_dir="$OUT/rm" --set model.path="$OUT/sft-merged" \
  --set finetuning.method=full --set finetuning.modules_to_save='[]' \
  --set "data.train=[{path: $Q/pairs.jsonl, format: pairs}]" --set train.epochs=1 --set train.lr=1e-3

# 5. DPO with LoRA on the same pairs (reference: the sft model, i.e. the adapter switched off)
llmtune train recipes/quickstart.yaml --set stage=dpo --set output_dir="$OUT/dpo" --set model.path="$OUT/sft-merged" \
  --set finetuning.modules_to_save='[]' \
  --set "data.train=[{path: $Q/pairs.jsonl, format: pairs}]" --set train.epochs=1 --set train.lr=1e-3

# 6. evaluation: perplexity of the sft model, the reward model's pairwise accuracy, the policies compared
llmtune eval --task perplexity --model "$OUT/sft-merged" --data "$Q/sft.jsonl" --max-samples 100 \
  --output "$OUT/eval-perplexity.json"
llmtune eval --task preference --model "$OUT/rm" --data "$Q/pairs.jsonl" --max-samples 100 \
  --output "$OUT/eval-rm.json"
llmtune eval --task compare --model "$OUT/dpo" --model-b "$OUT/sft-merged" --reward-model "$OUT/rm" \
  --data "$Q/sft.jsonl" --max-samples 40 --max-new-tokens 24 --output "$OUT/eval-compare.json"
echo "pipeline finished: $OUT"
