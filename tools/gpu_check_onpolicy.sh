#!/bin/bash
# The GPU check of on-policy distillation (about 5 minutes on one CUDA GPU), on the mid-size pair
# (configs/examples/mid-gpt2.yaml: ~360M teacher, ~58M student, GPT-2 vocabulary, seq_len 1024, bf16,
# ZeRO-3, checkpointing), the student on its own samples on every other step (64-token prefixes, 128
# new tokens):
#   - the memory estimate for this GPU against the peak a 20-step run measures; its tokens/s, the
#     student's sampling tokens/s and the share of an on-policy step spent sampling;
#   - bench_step: the on-policy step against the off-policy one (o/a) and the lambda = 0.5 mix.
# Writes everything under ${OUT:-gpu_check_onpolicy}/ and prints a summary.
#   bash tools/gpu_check_onpolicy.sh          (after: pip install -e ".[test]" with a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_onpolicy}
mkdir -p "$OUT"
CONFIG=${CONFIG:-configs/examples/mid-gpt2.yaml}
KEYS=(distill.head_start_steps=0 "distill.on_policy={fraction: 0.5, prefix_tokens: 64, max_new_tokens: 128}")
python tools/estimate.py --config $CONFIG --world-size 1 "${KEYS[@]}" > "$OUT/estimate.txt" 2>&1 || true
timeout 180 python launch/train.py --config $CONFIG output_dir="$OUT/run" overwrite=true train.max_steps=20 \
  train.log_interval=1 train.eval_interval=20 train.eval_batches=2 checkpoint.interval=0 "${KEYS[@]}" \
  > "$OUT/run.log" 2>&1 || true
timeout 120 python tools/bench_step.py --config $CONFIG --rounds 5 --warmup 2 --out "$OUT/bench.json" \
  output_dir="$OUT/bench" "${KEYS[@]}" > "$OUT/bench.log" 2>&1 || true
python - "$OUT" <<'PY'
import json, re, statistics, sys
from pathlib import Path
from codistill.metrics import read_scalars
out = Path(sys.argv[1])
est = re.search(r"expected peak per rank: ([\d.]+) GB", (out / "estimate.txt").read_text())
try:
    s = read_scalars(out / "run")
    print(f"run: {statistics.median(s['perf/tokens_per_sec'].values()):,.0f} tokens/s, peak "
          f"{max(s['perf/peak_memory_gb'].values()):.2f} GB (estimate {est.group(1) if est else '?'} GB); sampling "
          f"{statistics.median(s['student/on_policy/tokens_per_s'].values()):,.0f} tokens/s, "
          f"{statistics.median(s['student/on_policy/generate_share'].values()):.0%} of an on-policy step")
except Exception as exc:
    print(f"run: failed, see {out}/run.log ({exc})")
bench = out / "bench.json"
if bench.exists():
    b = json.loads(bench.read_text())
    print(f"bench_step: o/a {b.get('ratio_on_policy_over_a', float('nan')):.3f}, at lambda 0.5 "
          f"{b.get('ratio_lambda_half_over_a', float('nan')):.3f}, sampling {b.get('on_policy_sampling_share', 0):.0%} of (o)")
PY
