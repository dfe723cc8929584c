#!/usr/bin/env bash
# The GPU checks of issues 2 and 3 in one command, for a lent GPU (one `device` call; docs/GPU.md):
#   1. the model tests on CUDA (bf16 autocast, sdpa, no host round trip; tests/test_device.py, tests/test_modeling.py);
#   2. one base-size pretraining update timed against transformers' wav2vec 2.0 (bench/step_time.py, bf16);
#   3. the base model pretrained on real speech for STEPS bf16 updates: audio-seconds per second and a loss plot.
# Results go to $OUT (the device tool's folder that comes back), else outputs/gpu_checks.
#
#   bash scripts/gpu_checks.sh [corpus_dir]          # corpus_dir: a copy of ../shared/speech_corpus
#
# Dry run on a CPU (same code paths, toy sizes): PRESET=tiny STEPS=3 BENCH_STEPS=1 bash scripts/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${1:-../shared/speech_corpus}
OUT=${OUT:-outputs/gpu_checks}
PRESET=${PRESET:-base}
STEPS=${STEPS:-300}
BENCH_STEPS=${BENCH_STEPS:-20}
PRECISION=${PRECISION:-bf16}
mkdir -p "$OUT"
[ -f "$CORPUS/unlabeled.csv" ] || { echo "no $CORPUS/unlabeled.csv: pass a copy of the shared speech corpus"; exit 2; }

python - <<'EOF' | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no GPU: dry run)")
EOF

echo "== 1. model tests on every available device"
python -m pytest -q -rs tests/test_device.py tests/test_modeling.py 2>&1 | tee "$OUT/pytest.txt"

echo "== 2. one $PRESET pretraining update against transformers' wav2vec 2.0 ($PRECISION)"
DTYPE=$([ "$PRECISION" = bf16 ] && echo bf16 || echo fp32)
python bench/step_time.py --preset "$PRESET" --dtype "$DTYPE" --batch_size 8 --seconds 15 --steps "$BENCH_STEPS" \
    --output "$OUT/bench" 2>&1 | tee "$OUT/bench.txt"

echo "== 3. $PRESET pretraining on real speech, $STEPS updates ($PRECISION)"
python training/pretrain.py --model_preset "$PRESET" --objective aqc --train_data "$CORPUS/unlabeled.csv" \
    --mixed_precision "$PRECISION" --max_steps "$STEPS" --learning_rate 5e-4 --warmup_ratio 0.1 \
    --hold_ratio 0.83 --decay_ratio 0.07 --max_batch_duration_in_seconds 160 --min_duration_in_seconds 2 \
    --max_duration_in_seconds 15 --logging_steps 10 --save_steps 1000000 --dataloader_num_workers 4 --seed 0 \
    --output_dir "$OUT/pretrain_$PRESET" 2>&1 | tail -n 20 | tee "$OUT/pretrain.txt"
python - "$OUT/pretrain_$PRESET" <<'EOF'
import json, sys
from pathlib import Path
summary = json.loads((Path(sys.argv[1]) / "summary.json").read_text())
print({k: summary.get(k) for k in ("steps", "hours_seen", "audio_seconds_per_second", "final")})
EOF
ls "$OUT/pretrain_$PRESET"/loss.png
