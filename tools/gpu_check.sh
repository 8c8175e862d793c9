#!/bin/bash
# The GPU check of the scale work, unchanged on any machine with one CUDA GPU (at most ~13 minutes):
# the mid-size pair (configs/examples/mid-gpt2.yaml: ~360M teacher, ~58M student, GPT-2 vocabulary,
# seq_len 1024, bf16, ZeRO-3) with checkpointing on and off:
#   - the memory estimate for this GPU, against the peak the run measures;
#   - a 30-step training run: tokens/s and model-FLOPs utilisation per model (6·N·tokens plus
#     attention, over the GPU's bf16 peak, GPU_PEAK_TFLOPS, default by device name);
#   - bench_step's a/b and a/c, and the whole run's cost against two-stage (head start, tail).
# Writes everything under ${OUT:-gpu_check}/ and prints a summary.
#   bash tools/gpu_check.sh            (after: pip install -e ".[test]" with a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
CONFIG=configs/examples/mid-gpt2.yaml
python - <<'PY' > "$OUT/machine.txt"
import torch, deepspeed, transformers
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
PY
cat "$OUT/machine.txt"
for CK in true false; do
  KEYS="teacher.gradient_checkpointing=$CK students.0.gradient_checkpointing=$CK"
  python tools/estimate.py --config $CONFIG --world-size 1 $KEYS > "$OUT/estimate_ck_$CK.txt"
  timeout 240 python launch/train.py --config $CONFIG output_dir="$OUT/run_ck_$CK" overwrite=true \
    train.max_steps=30 train.log_interval=5 train.eval_interval=30 train.eval_batches=2 \
    distill.head_start_steps=0 distill.burn_in_steps=0 checkpoint.interval=0 $KEYS > "$OUT/run_ck_$CK.log" 2>&1 || true
  timeout 150 python tools/bench_step.py --config $CONFIG --rounds 5 --warmup 2 --out "$OUT/bench_ck_$CK.json" \
    output_dir="$OUT/bench_ck_$CK" $KEYS > "$OUT/bench_ck_$CK.log" 2>&1 || true
done
# The fused-linear path (issue 14): the loss alone in bf16 at LLM shapes (plain vs fused, tokens/s and
# peak allocated), and the mid-size pair's training run with it forced on and off (tokens/s, peak).
timeout 240 python tools/bench_loss.py --shapes --linear-shapes 4096x4096x128256 4096x2048x128256 4096x2048x50257 \
  --divergences forward_kl jsd --device cuda --dtype bf16 --repeats 3 --out "$OUT/bench_loss_fused.json" \
  > "$OUT/bench_loss_fused.log" 2>&1 || true
for FUSED in true false; do
  timeout 150 python launch/train.py --config $CONFIG output_dir="$OUT/run_fused_$FUSED" overwrite=true \
    train.max_steps=20 train.log_interval=5 train.eval_interval=20 train.eval_batches=2 train.micro_batch_size=8 \
    distill.head_start_steps=0 distill.burn_in_steps=0 checkpoint.interval=0 distill.fused_linear=$FUSED \
    > "$OUT/run_fused_$FUSED.log" 2>&1 || true
done
python - "$OUT" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
import torch
name = torch.cuda.get_device_name(0)
peaks = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "A10G": 125, "L4": 121}
peak_tflops = float(__import__("os").environ.get("GPU_PEAK_TFLOPS") or next((v for k, v in peaks.items() if k in name), 0))
from codistill.metrics import read_scalars
for ck in ("true", "false"):
    est = re.search(r"expected peak per rank: ([\d.]+) GB", (out / f"estimate_ck_{ck}.txt").read_text())
    try:
        s = read_scalars(out / f"run_ck_{ck}")
    except Exception as exc:  # the run failed: its log says why
        print(f"checkpointing={ck}: the run failed, see {out}/run_ck_{ck}.log ({exc})"); continue
    tps = sorted(s["perf/tokens_per_sec"].values())[len(s["perf/tokens_per_sec"]) // 2]
    peak = max(s["perf/peak_memory_gb"].values())
    line = f"checkpointing={ck}: {tps:,.0f} tokens/s, peak {peak:.2f} GB (estimate {est.group(1) if est else '?'} GB)"
    if peak_tflops:
        # parameters of each model from the run's log; 6·N per token (fwd+bwd), 8·N with recompute
        log = (out / f"run_ck_{ck}.log").read_text()
        params = {m: int(n.replace(",", "")) for m, n in re.findall(r"^(\w+): ([\d,]+) parameters", log, re.M)}
        factor = 8 if ck == "true" else 6
        for model, n in params.items():
            line += f"; {model} MFU {factor * n * tps / (peak_tflops * 1e12):.1%}"
    bench = out / f"bench_ck_{ck}.json"
    if bench.exists():
        b = json.loads(bench.read_text())
        line += f"; bench_step a/b {b.get('ratio_a_over_b', float('nan')):.3f}, a/c {b.get('ratio_a_over_c', float('nan')):.3f}"
        if "ratio_fused_over_a" in b:
            line += f", fused a'/b {b['ratio_fused_a_over_b']:.3f}, a'/a {b['ratio_fused_over_a']:.3f}"
        if "ratio_run_over_two_stage" in b:  # the config's head start and tail; (c1), (c2) per step give any other
            line += (f", the run against two-stage {b['ratio_run_over_two_stage']:.3f} (teacher step "
                     f"{b['teacher_alone_ms']:.0f} ms, frozen-teacher step {b['frozen_teacher_ms']:.0f} ms)")
    print(line)
rows = out / "bench_loss_fused.json"
for row in json.loads(rows.read_text()) if rows.exists() else []:
    print(f"bench_loss bf16 {row['tokens']}x{row['hidden']}x{row['vocab']} {row['divergence']}: fused "
          f"{row['chunked_tokens_per_sec']:,.0f} tokens/s, {row['chunked_own_peak_mb']:,.0f} MB; "
          + (f"time {row['time_ratio']:.2f}x, memory {row['memory_ratio']:.3f}x of plain, grad rel {row['grad_rel_err']:.1e}"
             if "time_ratio" in row else "plain out of memory"))
for fused in ("true", "false"):
    try:
        s = read_scalars(out / f"run_fused_{fused}")
        tps = sorted(s["perf/tokens_per_sec"].values())[len(s["perf/tokens_per_sec"]) // 2]
        print(f"mid pair, micro-batch 8, fused_linear={fused}: {tps:,.0f} tokens/s, peak "
              f"{max(s['perf/peak_memory_gb'].values()):.2f} GB")
    except Exception as exc:
        print(f"mid pair, fused_linear={fused}: the run failed, see {out}/run_fused_{fused}.log ({exc})")
PY
