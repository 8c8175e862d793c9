#!/bin/bash
# The GPU check of the smoothed teacher, distill.teacher_ema (about 4 minutes on one CUDA GPU), on the
# mid-size pair (configs/examples/mid-gpt2.yaml: ~360M teacher, ~58M student, GPT-2 vocabulary, seq_len
# 1024, bf16, ZeRO-3, checkpointing), without and with the average (d = 0.9):
#   - the memory estimate for this GPU against the peak a 30-step run measures, and its tokens/s;
#   - the average in bf16 training: the teacher's and its average's validation loss at the end (the
#     average must have moved from its start and differ from the teacher: an average lost to bf16
#     rounding would stay at the initial weights' loss).
# Writes everything under ${OUT:-gpu_check_ema}/ and prints a summary.
#   bash tools/gpu_check_ema.sh            (after: pip install -e ".[test]" with a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_ema}
mkdir -p "$OUT"
CONFIG=configs/examples/mid-gpt2.yaml
for D in 0 0.9; do
  python tools/estimate.py --config $CONFIG --world-size 1 distill.teacher_ema=$D > "$OUT/estimate_$D.txt"
  timeout 150 python launch/train.py --config $CONFIG output_dir="$OUT/run_$D" overwrite=true \
    train.max_steps=30 train.log_interval=5 train.eval_interval=30 train.eval_batches=2 \
    distill.head_start_steps=0 distill.burn_in_steps=0 checkpoint.interval=0 distill.teacher_ema=$D \
    > "$OUT/run_$D.log" 2>&1 || true
done
python - "$OUT" <<'PY'
import re, sys
from pathlib import Path
from codistill.metrics import read_scalars
out = Path(sys.argv[1])
print((out / "estimate_0.txt").read_text().splitlines()[0])
for d in ("0", "0.9"):
    est = re.search(r"expected peak per rank: ([\d.]+) GB", (out / f"estimate_{d}.txt").read_text())
    try:
        s = read_scalars(out / f"run_{d}")
    except Exception as exc:  # the run failed: its log says why
        print(f"teacher_ema={d}: the run failed, see {out}/run_{d}.log ({exc})"); continue
    tps = sorted(s["perf/tokens_per_sec"].values())[len(s["perf/tokens_per_sec"]) // 2]
    line = (f"teacher_ema={d}: {tps:,.0f} tokens/s, peak {max(s['perf/peak_memory_gb'].values()):.2f} GB "
            f"(estimate {est.group(1) if est else '?'} GB)")
    if "teacher_ema/eval/loss" in s:
        ema, teacher = s["teacher_ema/eval/loss"], s["teacher/eval/loss"]
        line += (f"; validation loss at step 0 / 30: teacher {teacher[0]:.4f} / {teacher[max(teacher)]:.4f}, "
                 f"its average {ema[0]:.4f} / {ema[max(ema)]:.4f}")
    print(line)
PY
