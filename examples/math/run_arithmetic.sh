#!/usr/bin/env bash
# The whole reasoning-RL loop on a CPU (about 10 minutes on 2 cores): synthetic arithmetic, a tiny char model
# pretrained briefly, SFT on worked solutions, then GRPO with the grader's r1_zero reward; each stage evaluated
# on the same 200 held-out problems, greedy and sampled (temperature 0.8, 4 samples: pass@1, pass@4).
#   bash examples/math/run_arithmetic.sh [OUT]          (default OUT=out/arith; data in OUT/data)
set -euo pipefail
OUT=${1:-out/arith}
PROMPT=examples/math/arith.prompt
python examples/math/make_arithmetic.py --out_dir "$OUT/data"
python scripts/train.py --text_file "$OUT/data/pretrain.txt" --n_layer 4 --n_head 4 --n_embd 128 --block_size 128 \
    --batch_size 32 --max_iters 1500 --learning_rate 2e-3 --eval_interval 500 --sample_len 0 --out_dir "$OUT/pre"
python scripts/sft.py --data "$OUT/data/sft.jsonl" --init_from "$OUT/pre" --max_iters 300 --batch_size 32 \
    --learning_rate 1e-3 --warmup_iters 20 --eval_interval 100 --out_dir "$OUT/sft"
python scripts/grpo.py --init_from "$OUT/sft" --task math --math_data "$OUT/data/grpo.jsonl" --math_prompt "$PROMPT" \
    --max_new_tokens 96 --batch_size 16 --group_size 8 --iters 60 --learning_rate 5e-5 --warmup_iters 5 \
    --beta_kl 0.04 --temperature 0.8 --eval_interval 0 --out_dir "$OUT/grpo"
for stage in pre sft grpo; do
  python scripts/eval_math.py --model "$OUT/$stage" --dataset "$OUT/data/test.jsonl" --prompt "$PROMPT" \
      --max_new_tokens 96 --out_dir "$OUT/eval/$stage-greedy" --no_progress
  python scripts/eval_math.py --model "$OUT/$stage" --dataset "$OUT/data/test.jsonl" --prompt "$PROMPT" \
      --max_new_tokens 96 --temperature 0.8 --samples_per_problem 4 --out_dir "$OUT/eval/$stage-sampled" --no_progress
done
