#!/bin/bash
# The GPU check of selection between a student and its twin, distill.selection_interval (about 5 minutes on one
# CUDA GPU):
#   - the mid-size pair (configs/examples/mid-gpt2.yaml: ~360M teacher, ~58M student, GPT-2 vocabulary, bf16,
#     ZeRO-3, checkpointing) with the student's twin, 30 steps, without and with a decision every 10 steps: the
#     peak memory (selection copies in place: the same peak), the estimate, tokens/s and the decisions' tags; then
#     with a population (students.0.population=[1.0]: three students, the estimate and peak with one more);
#   - the copy itself on CUDA tensors (tests/helpers/adopt_step.py on the micro models, ZeRO-3, bf16 and fp16 with
#     its dynamic loss scale): after the twin takes the student's state, one CE step of both gives bitwise-equal
#     weights and optimizer state.
# Writes everything under ${OUT:-gpu_check_selection}/ and prints a summary.
#   bash tools/gpu_check_selection.sh            (after: pip install -e ".[test]" with a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_selection}
mkdir -p "$OUT"
CONFIG=configs/examples/mid-gpt2.yaml
POP=(students.0.population=[1.0] distill.selection_interval=10)
python tools/estimate.py --config $CONFIG --world-size 1 students.0.twin=true > "$OUT/estimate.txt"
python tools/estimate.py --config $CONFIG --world-size 1 students.0.twin=true "${POP[@]}" > "$OUT/estimate_pop.txt"
for N in 0 10 pop; do
  if [ $N = pop ]; then EXTRA=("${POP[@]}"); else EXTRA=(distill.selection_interval=$N); fi
  timeout 150 python launch/train.py --config $CONFIG output_dir="$OUT/run_$N" overwrite=true students.0.twin=true \
    train.max_steps=30 train.log_interval=5 train.eval_interval=30 train.eval_batches=2 \
    distill.head_start_steps=0 distill.burn_in_steps=0 checkpoint.interval=0 "${EXTRA[@]}" \
    > "$OUT/run_$N.log" 2>&1 || true
done
for HALF in bf16 fp16; do  # fp16: its dynamic loss scale is taken too
  timeout 120 python tests/helpers/adopt_step.py output_dir="$OUT/adopt_$HALF" students.0.twin=true \
    distill.selection_interval=2 distill.burn_in_steps=0 distill.schedule=constant distill.benefit_gate=false \
    "students.0.deepspeed.$HALF={enabled: true}" students.0.deepspeed.zero_optimization.stage=3 \
    students.0.deepspeed.zero_optimization.stage3_param_persistence_threshold=0 > "$OUT/adopt_$HALF.log" 2>&1 || true
done
python - "$OUT" <<'PY'
import json, re, sys
from pathlib import Path
from codistill.metrics import read_scalars
out = Path(sys.argv[1])
for name, what in (("estimate", "the twin"), ("estimate_pop", "the twin and a copy")):
    est = re.search(r"expected peak per rank: ([\d.]+) GB", (out / f"{name}.txt").read_text())
    print(f"estimate with {what}: {est.group(1) if est else '?'} GB per rank")
for n in ("0", "10", "pop"):
    try:
        s = read_scalars(out / f"run_{n}")
    except Exception as exc:  # the run failed: its log says why
        print(f"selection_interval={n}: the run failed, see {out}/run_{n}.log ({exc})"); continue
    tps = sorted(s["perf/tokens_per_sec"].values())[len(s["perf/tokens_per_sec"]) // 2]
    line = f"selection_interval={n}: {tps:,.0f} tokens/s, peak {max(s['perf/peak_memory_gb'].values()):.2f} GB"
    if "selection/student/distilled_won" in s:
        won = s["selection/student/distilled_won"]
        line += f"; decisions at steps {sorted(won)}, a distilling member won {int(sum(won.values()))}"
    print(line)
for half in ("bf16", "fp16"):
    rank = out / f"adopt_{half}" / "rank0.json"
    print(f"the copy on CUDA, {half}, ZeRO-3:",
          json.loads(rank.read_text()) if rank.exists() else f"failed, see {out}/adopt_{half}.log")
PY
