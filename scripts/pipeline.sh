#!/usr/bin/env bash
# The adaptation pipeline as one re-runnable shell command:
#
#   cpt -> sft -> rm -> one or more of dpo / grpo / ppo / rejection_sampling -> merge-lora -> eval
#
#   bash scripts/pipeline.sh OUT MODEL STAGE=RECIPE [STAGE=RECIPE ...]
#
#   OUT     the directory every stage writes under: OUT/cpt, OUT/sft, OUT/rm, OUT/dpo, ...
#   MODEL   the model the first stage starts from (a hub id or a local directory)
#   STAGE   cpt, sft, rm, dpo, grpo, ppo or rejection_sampling; each names the recipe it trains with.
#           cpt, sft and rm run in that order (each one you name), then the alignment stages in the order
#           given, each one starting from the sft model (the alternatives, not a chain).
#
# Each stage runs `llmtune train RECIPE --set model.path=<the previous output> --set output_dir=OUT/<stage>`;
# an adapter output (lora / qlora) is merged into a standalone model in OUT/<stage>-merged, which is what the
# next stage starts from and what the evaluation loads. ppo's reward model is the pipeline's rm
# (`--set ppo.reward.model=OUT/rm`) when an rm stage is named.
#
# Environment:
#   LAUNCH  how a training process starts. Empty (default): one process. One GPU or CPU needs nothing;
#           several GPUs of one machine: LAUNCH="torchrun --nproc_per_node 8"; several machines (run the same
#           line on each): LAUNCH="torchrun --nnodes 2 --node_rank \$NODE_RANK --master_addr \$HEAD
#           --master_port 29500 --nproc_per_node 8"; or LAUNCH="deepspeed --num_gpus 8 --module".
#   SET     extra --set overrides for every training stage, e.g. SET="precision=bf16 train.save_every=200"
#   EVAL    llmtune eval arguments run on the sft model and on every aligned model, e.g.
#           EVAL="--task reward --data held.jsonl --rule exact_match" (the rm, when trained, is added as
#           --reward-model). Reports land in OUT/eval-<stage>.json.
#
# Re-running the same command continues where it stopped: a stage whose run.json says finished (and a merge
# that completed) is skipped. The first stage that fails stops the pipeline with its exit code and its name.
# OUT/pipeline.tsv records each stage's wall time (stage, seconds, ran | skipped).
set -uo pipefail

usage() {
  sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}
[ $# -ge 3 ] || usage
OUT=$1
MODEL=$2
shift 2
declare -A RECIPE=()
ALIGN=()
for arg in "$@"; do
  stage=${arg%%=*}
  recipe=${arg#*=}
  case $stage in
    cpt | sft | rm) ;;
    dpo | grpo | ppo | rejection_sampling) ALIGN+=("$stage") ;;
    *)
      echo "pipeline: unknown stage '$stage' in '$arg' (use cpt, sft, rm, dpo, grpo, ppo, rejection_sampling)" >&2
      exit 2
      ;;
  esac
  if [ "$recipe" = "$arg" ] || [ ! -f "$recipe" ]; then
    echo "pipeline: $stage needs a recipe file: $stage=PATH ('$recipe' is not a file)" >&2
    exit 2
  fi
  RECIPE[$stage]=$recipe
done
mkdir -p "$OUT" || exit 2
TSV="$OUT/pipeline.tsv"

LLMTUNE=(llmtune)
if [ -n "${LAUNCH:-}" ]; then
  # shellcheck disable=SC2206
  LLMTUNE=(${LAUNCH} -m llmtune)
  case $LAUNCH in *--module*) LLMTUNE=(${LAUNCH} llmtune) ;; esac
fi
EXTRA=()
for s in ${SET:-}; do EXTRA+=(--set "$s"); done

finished() { # a finished llmtune run in $1
  python - "$1" <<'PY'
import sys
from llmtune.manifest import status_of
sys.exit(0 if status_of(sys.argv[1]) == "finished" else 1)
PY
}

fail() { # stage name, exit code, what to look at
  echo "pipeline: stage $1 failed with exit code $2 ($3). Fix it and run the same command again: finished stages are skipped." >&2
  exit "$2"
}

record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$TSV"; }
since() { awk -v a="$1" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; } # seconds since $1

# train STAGE FROM: OUT/STAGE from the model FROM; prints nothing else on stdout than llmtune does
train() {
  local stage=$1 from=$2 dir="$OUT/$1" t0 rc
  if finished "$dir"; then
    echo "pipeline: $stage: finished earlier in $dir, skipped"
    record "$stage" 0 skipped
    return 0
  fi
  local sets=(--set "model.path=$from" --set "output_dir=$dir")
  if [ "$stage" = ppo ] && [ -n "${RECIPE[rm]:-}" ]; then sets+=(--set "ppo.reward.model=$OUT/rm"); fi
  echo "pipeline: $stage: ${LLMTUNE[*]} train ${RECIPE[$stage]} ${sets[*]} ${EXTRA[*]}"
  t0=$(date +%s%N)
  "${LLMTUNE[@]}" train "${RECIPE[$stage]}" "${sets[@]}" "${EXTRA[@]}"
  rc=$?
  [ $rc -eq 0 ] || fail "$stage" $rc "its output: $dir"
  record "$stage" "$(since "$t0")" ran
}

# standalone STAGE: the model a later step loads: OUT/STAGE, or OUT/STAGE-merged for an adapter
standalone() {
  local stage=$1 dir="$OUT/$1" merged="$OUT/$1-merged" t0 rc
  if [ ! -f "$dir/adapter_config.json" ]; then
    STANDALONE=$dir
    return 0
  fi
  STANDALONE=$merged
  if [ -f "$merged/.pipeline-merged" ]; then
    record "merge-$stage" 0 skipped
    return 0
  fi
  t0=$(date +%s%N)
  llmtune merge-lora --adapter "$dir" --out "$merged" --overwrite
  rc=$?
  [ $rc -eq 0 ] || fail "merge-lora of $stage" $rc "the adapter: $dir"
  touch "$merged/.pipeline-merged"
  record "merge-$stage" "$(since "$t0")" ran
}

evaluate() { # STAGE MODEL
  [ -n "${EVAL:-}" ] || return 0
  local report="$OUT/eval-$1.json" rc args
  # shellcheck disable=SC2206
  args=(${EVAL})
  if [ -n "${RECIPE[rm]:-}" ]; then args+=(--reward-model "$RM_MODEL"); fi
  if [ -f "$report" ]; then
    echo "pipeline: eval of $1: $report exists, skipped"
    return 0
  fi
  llmtune eval --model "$2" "${args[@]}" --output "$report.tmp.json" --generations "$OUT/eval-$1.generations.jsonl"
  rc=$?
  [ $rc -eq 0 ] || fail "eval of $1" $rc "the model: $2"
  mv "$report.tmp.json" "$report"
}

current=$MODEL
for stage in cpt sft; do
  [ -n "${RECIPE[$stage]:-}" ] || continue
  train "$stage" "$current"
  standalone "$stage"
  current=$STANDALONE
done
SFT_MODEL=$current
RM_MODEL=""
if [ -n "${RECIPE[rm]:-}" ]; then
  train rm "$SFT_MODEL"
  standalone rm
  RM_MODEL=$STANDALONE
fi
evaluate sft "$SFT_MODEL"
for stage in "${ALIGN[@]}"; do
  train "$stage" "$SFT_MODEL"
  standalone "$stage"
  evaluate "$stage" "$STANDALONE"
done
echo "pipeline finished: $OUT"
