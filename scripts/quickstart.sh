#!/usr/bin/env bash
# The whole pipeline on the tiny offline model, on CPU, in a few minutes on 2 cores, and what each stage did:
#
#   cpt -> sft -> rm -> dpo, grpo, ppo, rejection_sampling (each from the sft model) -> merge-lora -> eval
#
#   bash scripts/quickstart.sh [OUT_DIR]        # default OUT_DIR: runs/quickstart-pipeline
#
# The chain is scripts/pipeline.sh with the recipes in recipes/quickstart/pipeline/ and the facts data in
# recipes/quickstart/facts/ (scripts/make_pipeline_data.py). It ends with one table (scripts/quickstart_table.py):
# per stage its wall time and the metric it exists to move, on held-out rows, before and after, with a check.
# Run it again and finished stages are skipped. Exit code: the failing stage's, or 1 when a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/quickstart-pipeline}
P=recipes/quickstart/pipeline
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
EVAL="--task reward --data recipes/quickstart/facts/held.jsonl --rule exact_match --max-new-tokens 8" \
  bash scripts/pipeline.sh "$OUT" recipes/quickstart/model \
  cpt=$P/cpt.yaml sft=$P/sft.yaml rm=$P/rm.yaml \
  dpo=$P/dpo.yaml grpo=$P/grpo.yaml ppo=$P/ppo.yaml rejection_sampling=$P/rejection_sampling.yaml || exit $?
exec python scripts/quickstart_table.py "$OUT"
