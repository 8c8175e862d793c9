#!/bin/bash
# The GPU check of models that teach each other (about 6 minutes on one CUDA GPU), on the mid-size
# pair (configs/examples/mid-gpt2.yaml: ~360M teacher, ~58M student, GPT-2 vocabulary, seq_len 1024,
# bf16, ZeRO-3, checkpointing):
#   - a teacher listening to its student, and the two models as peers (mode mutual): the memory
#     estimate for this GPU against the peak a 20-step run measures, and its tokens/s;
#   - bench_step: the listening teacher's step against the deaf one's (a/e), the peers' step against
#     the two trained alone (a/b); the targets are <= 1.03.
# Writes everything under ${OUT:-gpu_check_mutual}/ and prints a summary.
#   bash tools/gpu_check_mutual.sh            (after: pip install -e ".[test]" with a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_mutual}
mkdir -p "$OUT"
CONFIG=configs/examples/mid-gpt2.yaml
# the two models of the pair as peers: the teacher's section becomes the first student
PEERS=$(python - <<'PY'
import json, yaml
cfg = yaml.safe_load(open("configs/examples/mid-gpt2.yaml"))
teacher = {**cfg["teacher"], "name": "large"}
print(json.dumps(["mode=mutual", "teacher=null", "students=" + json.dumps([teacher, {**cfg["students"][0], "name": "small"}])]))
PY
)
run() {  # NAME, then overrides
  local name=$1; shift
  python tools/estimate.py --config $CONFIG --world-size 1 "$@" > "$OUT/estimate_$name.txt" 2>&1 || true
  timeout 150 python launch/train.py --config $CONFIG output_dir="$OUT/run_$name" overwrite=true \
    train.max_steps=20 train.log_interval=5 train.eval_interval=20 train.eval_batches=2 checkpoint.interval=0 \
    distill.benefit_interval=5 "$@" > "$OUT/run_$name.log" 2>&1 || true
  timeout 120 python tools/bench_step.py --config $CONFIG --rounds 5 --warmup 2 --out "$OUT/bench_$name.json" \
    output_dir="$OUT/bench_$name" "$@" > "$OUT/bench_$name.log" 2>&1 || true
}
run listening distill.head_start_steps=0 distill.burn_in_steps=0 "teacher.distill={schedule: constant}"
mapfile -t PEER_KEYS < <(python -c "import json, sys; print('\n'.join(json.loads(sys.argv[1])))" "$PEERS")
run peers "${PEER_KEYS[@]}" distill.burn_in_steps=0
python - "$OUT" <<'PY'
import json, re, sys
from pathlib import Path
from codistill.metrics import read_scalars
out = Path(sys.argv[1])
for name, ratio in (("listening", "ratio_listening_over_deaf"), ("peers", "ratio_a_over_b")):
    est = re.search(r"expected peak per rank: ([\d.]+) GB", (out / f"estimate_{name}.txt").read_text())
    try:
        s = read_scalars(out / f"run_{name}")
        tps = sorted(s["perf/tokens_per_sec"].values())[len(s["perf/tokens_per_sec"]) // 2]
        line = f"{name}: {tps:,.0f} tokens/s, peak {max(s['perf/peak_memory_gb'].values()):.2f} GB " \
               f"(estimate {est.group(1) if est else '?'} GB)"
    except Exception as exc:
        line = f"{name}: the run failed, see {out}/run_{name}.log ({exc})"
    bench = out / f"bench_{name}.json"
    if bench.exists():
        line += f"; bench_step {ratio} {json.loads(bench.read_text()).get(ratio, float('nan')):.3f} (target <= 1.03)"
    print(line)
PY
