"""Pretraining data pipeline throughput on real files: decode, resample, crop, normalise, batch.

    python bench/data_pipeline.py                    # shared corpus: 16 kHz LibriSpeech and 8 kHz FSDD
    python bench/data_pipeline.py --workers 2        # through a DataLoader, as training/pretrain.py does

Runs `PretrainingStream` (the exact code `training/pretrain.py` reads audio with) over the corpus's files and reports
audio-seconds produced per second of wall clock, per core (one process and one torch thread per worker), for:
* `librispeech-16k`: the unlabelled LibriSpeech clips (FLAC, 16 kHz: decode + crop + normalise + batch);
* `fsdd-8k`: FSDD's spoken digits (FLAC, 8 kHz: the same plus resampling to 16 kHz);
* `mixed`: both lists, the experiment's pretraining set.
Each set is read for `--epochs` epochs (the OS file cache warms up after the first; both are reported). The target
of the performance issue is >= 1000 audio-s/s per core. Writes JSON next to the printed table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data2vec_aqc_hf.audio import TARGET_SAMPLING_RATE  # noqa: E402
from data2vec_aqc_hf.data import DataStats, PretrainingStream, iterate_batches, local_items  # noqa: E402


def corpus_items(corpus: Path) -> dict[str, list[dict]]:
    librispeech = [{"audio": str(p)} for p in sorted((corpus / "unlabeled").rglob("*.flac"))]
    fsdd = [{"audio": str(p)} for p in sorted((corpus / "audio" / "fsdd").rglob("*.flac"))]
    if not librispeech and not fsdd:  # a fresh clone without ../shared: the vendored demo audio
        demo = local_items(ROOT / "data/demo/unlabeled.csv")
        return {"demo": demo}
    return {"librispeech-16k": librispeech, "fsdd-8k": fsdd, "mixed": librispeech + fsdd}


def measure(items: list[dict], epochs: int, workers: int, max_seconds: float, batch_seconds: float) -> list[dict]:
    stream = PretrainingStream(items, min_samples=int(0.1 * TARGET_SAMPLING_RATE),
                               max_samples=int(max_seconds * TARGET_SAMPLING_RATE),
                               max_batch_samples=int(batch_seconds * TARGET_SAMPLING_RATE))
    rows = []
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        source = (torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                              worker_init_fn=lambda _: torch.set_num_threads(1))
                  if workers else stream)
        stats = DataStats()
        samples = padded = batches = 0
        start = time.perf_counter()
        for batch in iterate_batches(source, stats):
            samples += int(batch["attention_mask"].numpy().sum())
            padded += batch["input_values"].numel()
            batches += 1
        seconds = time.perf_counter() - start
        audio_s = samples / TARGET_SAMPLING_RATE
        rows.append({"epoch": epoch, "batches": batches, "utterances": stats.loaded, "skipped": len(stats.skipped),
                     "audio_s": round(audio_s, 1), "padding": round(1 - samples / max(padded, 1), 3),
                     "wall_s": round(seconds, 3), "audio_s_per_s": round(audio_s / seconds, 1),
                     "audio_s_per_s_per_core": round(audio_s / seconds / max(1, workers), 1)})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus_dir", default=str(ROOT.parent / "shared" / "speech_corpus"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in this process, one core)")
    p.add_argument("--max_seconds", type=float, default=4.0, help="crop length (the experiment's)")
    p.add_argument("--batch_seconds", type=float, default=8.0, help="padded audio per batch (the experiment's)")
    p.add_argument("--output", default="outputs/bench/data_pipeline.json")
    a = p.parse_args()
    torch.set_num_threads(1)
    results = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}",
               "workers": a.workers, "sets": {}}
    print(f"{'set':<16} {'epoch':>5} {'files':>6} {'audio s':>8} {'wall s':>7} {'audio-s/s':>10} {'per core':>9}")
    for name, items in corpus_items(Path(a.corpus_dir)).items():
        rows = measure(items, a.epochs, a.workers, a.max_seconds, a.batch_seconds)
        results["sets"][name] = rows
        for r in rows:
            print(f"{name:<16} {r['epoch']:>5} {r['utterances']:>6} {r['audio_s']:>8} {r['wall_s']:>7} "
                  f"{r['audio_s_per_s']:>10} {r['audio_s_per_s_per_core']:>9}")
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(results, indent=1))
    print(f"target (performance issue): >= 1000 audio-s/s per core; JSON: {a.output}")


if __name__ == "__main__":
    main()
