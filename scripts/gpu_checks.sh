#!/usr/bin/env bash
# The GPU checks of issues 2 and 3 in one command, for a lent GPU (one `device` call; docs/GPU.md):
#   1. the model tests on CUDA (bf16 autocast, sdpa, no host round trip; tests/test_device.py, tests/test_modeling.py);
#   2. one base-size pretraining update timed against transformers' wav2vec 2.0 (bench/step_time.py, bf16);
#   3. the base model pretrained on real speech for STEPS bf16 updates: audio-seconds per second and a loss plot.
# Every step runs even when an earlier one fails; the exit status says whether all passed. Results go to $OUT (the
# device tool's folder that comes back), else outputs/gpu_checks.
#
#   bash scripts/prepare_gpu_carry.sh            # here: wheels the GPU image lacks + the corpus's audio -> .devdata/
#   bash scripts/gpu_checks.sh .devdata/speech_corpus      # there, with carry=[".devdata"]
#
# Dry run on a CPU (same code paths, toy sizes): DRY_RUN=1 PRESET=tiny STEPS=3 BENCH_STEPS=1 bash scripts/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
CORPUS=${1:-../shared/speech_corpus}
OUT=${OUT:-outputs/gpu_checks}
PRESET=${PRESET:-base}
STEPS=${STEPS:-300}
BENCH_STEPS=${BENCH_STEPS:-20}
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT"
[ -f "$CORPUS/unlabeled.csv" ] || { echo "no $CORPUS/unlabeled.csv: pass a copy of the shared speech corpus"; exit 2; }

if [ -d .devdata/wheels ]; then
    # the GPU image has torch, accelerate, pandas and pytest, but not soundfile or soxr, and transformers 5.17: the
    # wheels carried by scripts/prepare_gpu_carry.sh go to /tmp/site (no network there; the device README's recipe)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .devdata/wheels/*.whl 2>&1 | tail -n 3
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/checks.txt"    # at most 8 files come back: one log for the device line, the tests and the benchmark

"$PY" - <<'EOF' | tee "$LOG"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no GPU)")
EOF
if [ -z "${DRY_RUN:-}" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to $PY: stopping (DRY_RUN=1 runs the checks on the CPU)"; exit 3
fi
failed=()

echo "== 1. model tests on every available device"
"$PY" -m pytest -q -rs -p no:cacheprovider tests/test_device.py tests/test_modeling.py 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || failed+=(tests)

echo "== 2. one $PRESET pretraining update against transformers' wav2vec 2.0 (bf16)"
"$PY" bench/step_time.py --preset "$PRESET" --dtype bf16 --batch_size 8 --seconds 15 --steps "$BENCH_STEPS" \
    --output "$OUT/bench" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || failed+=(bench)

echo "== 3. $PRESET pretraining on real speech, $STEPS updates (bf16)"
RUN=/tmp/gpu_checks_pretrain_$PRESET      # the model files stay there: only the summary and the plot come back
"$PY" training/pretrain.py --model_preset "$PRESET" --objective aqc --train_data "$CORPUS/unlabeled.csv" \
    --mixed_precision bf16 --max_steps "$STEPS" --learning_rate 5e-4 --warmup_ratio 0.1 \
    --hold_ratio 0.83 --decay_ratio 0.07 --max_batch_duration_in_seconds 160 --min_duration_in_seconds 2 \
    --max_duration_in_seconds 15 --logging_steps 10 --save_steps 1000000 --dataloader_num_workers 4 --seed 0 \
    --output_dir "$RUN" > "$OUT/pretrain_log.txt" 2>&1
[ $? = 0 ] || failed+=(pretrain)
tail -n 5 "$OUT/pretrain_log.txt"
cp "$RUN/summary.json" "$OUT/pretrain_summary.json" 2>/dev/null && cp "$RUN/loss.png" "$OUT/pretrain_loss.png" && \
"$PY" - "$OUT/pretrain_summary.json" <<'EOF'
import json, sys
summary = json.loads(open(sys.argv[1]).read())
print({k: summary.get(k) for k in ("steps", "hours_seen", "audio_seconds_per_second", "final")})
EOF

if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
echo "all GPU checks passed"
