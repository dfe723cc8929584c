#!/usr/bin/env bash
# Prepare what scripts/gpu_checks.sh needs on a lent GPU, in .devdata/ (git-ignored; carry=[".devdata"], 64 MiB max):
# wheels for the GPU image's Python 3.12 of the packages it lacks or has too old (it has torch, accelerate, pandas,
# pyarrow, huggingface-hub; nothing can be downloaded there), and the shared corpus's unlabelled audio.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${1:-../shared/speech_corpus}
rm -rf .devdata/wheels .devdata/speech_corpus
mkdir -p .devdata/wheels .devdata/speech_corpus
# with their dependencies, so that pip there can resolve offline (it keeps what the image already has where that fits)
python3 -m pip download -q --dest .devdata/wheels --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any transformers==5.25.0 "soundfile>=0.12" "soxr>=0.3.7"
rm -f .devdata/wheels/numpy-*.whl   # the image has numpy 2.5; 16 MB of the 64 MiB carry saved
cp -r "$SHARED/unlabeled" "$SHARED/unlabeled.csv" .devdata/speech_corpus/
du -sh .devdata/wheels .devdata/speech_corpus
du -sh .devdata
