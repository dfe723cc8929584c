"""Does longer pretraining put more of the spoken word into the representation? (learning issue, diagnostic)

Pretrains the experiment's model with each objective for `--steps` updates on the experiment's unlabelled audio
(the same command the experiment runs, with a checkpoint every `--save_every` updates), then fits a linear probe of
the spoken digit on each checkpoint's time-averaged hidden states, per layer. Development split only: fitted on
`--fit_speakers`' clips, scored on `--dev_speaker`'s (fold yweweler's inner split; yweweler is never read), against
a randomly initialised encoder of the same preset. Chance is 10 %.

    python scripts/pretrain_length_probe.py --steps 4000 --save_every 1000     # ~35 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import Data2VecAudioModel, set_seed

from data2vec_aqc_hf import Data2VecAQCConfig, Data2VecAQCForPreTraining
from data2vec_aqc_hf.audio import load_audio
from data2vec_aqc_hf.experiment import (
    ARMS,
    ExperimentArguments,
    linear_probe_accuracy,
    load_corpus,
    pooled_hidden_states,
    pretrain_command,
    run_commands,
)


def probe(model, clips, labels, speakers, fit_speakers, dev_speaker) -> list[float]:
    pooled = pooled_hidden_states(model, clips)
    fit = torch.from_numpy(np.isin(speakers, fit_speakers))
    dev = torch.from_numpy(speakers == dev_speaker)
    return [round(100 * linear_probe_accuracy(pooled[fit, k], labels[fit], pooled[dev, k], labels[dev]), 1)
            for k in range(pooled.shape[1])]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--corpus_dir", default="../shared/speech_corpus")
    p.add_argument("--output_dir", default="outputs/pretrain_length")
    p.add_argument("--objectives", default="aqc,data2vec")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--save_every", type=int, default=1000)
    p.add_argument("--warmup_ratio", type=float, default=0.2)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--batch_seconds", type=float, default=8.0)
    p.add_argument("--fit_speakers", default="fsdd_jackson,fsdd_lucas")
    p.add_argument("--dev_speaker", default="fsdd_nicolas")
    p.add_argument("--every", type=int, default=2, help="probe every n-th clip of those speakers")
    p.add_argument("--audio", default="all", choices=["all", "fsdd"],
                   help="pretraining audio: the experiment's (LibriSpeech, LJ Speech and FSDD) or FSDD only (in-domain)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--probe_only", action="store_true",
                   help="probe the checkpoints already saved (of runs still going or stopped), start nothing")
    a = p.parse_args()
    out = Path(a.output_dir)
    args = ExperimentArguments(corpus_dir=a.corpus_dir, output_dir=str(out), pretrain_steps=a.steps,
                               pretrain_warmup_ratio=a.warmup_ratio, pretrain_learning_rate=a.learning_rate,
                               pretrain_batch_seconds=a.batch_seconds)
    fsdd_rows, pretrain_files, _ = load_corpus(Path(a.corpus_dir))
    start = time.time()
    commands = []
    for objective in [] if a.probe_only else a.objectives.split(","):
        path = out / objective
        if (path / "summary.json").exists():
            continue
        audio = ([] if a.audio == "fsdd" else pretrain_files) + [r["audio"] for r in fsdd_rows]
        cmd = pretrain_command(args, objective, audio, path)
        cmd[cmd.index("--save_steps") + 1] = str(a.save_every)
        cmd[cmd.index("--save_total_limit") + 1] = "0"
        commands.append((objective, cmd))
    run_commands(commands, a.jobs, out / "logs")
    print(f"pretraining done in {(time.time() - start) / 60:.1f} min", flush=True)

    torch.set_num_threads(1)  # OpenMP threads spin badly on a loaded machine
    fit_speakers = a.fit_speakers.split(",")
    rows = [r for r in fsdd_rows if r["speaker_id"] in fit_speakers + [a.dev_speaker]][::a.every]
    texts = sorted({r["text"] for r in rows})
    labels = torch.tensor([texts.index(r["text"]) for r in rows])
    speakers = np.array([r["speaker_id"] for r in rows])
    clips = [load_audio(r["audio"]) for r in rows]  # 16 kHz mono
    results = {}
    set_seed(0)
    config = Data2VecAQCConfig.from_preset("small")
    results["random"] = {0: probe(Data2VecAudioModel(config.to_data2vec_audio_config()), clips, labels, speakers,
                                  fit_speakers, a.dev_speaker)}
    print("random", results["random"][0], flush=True)
    for objective in a.objectives.split(","):
        path = out / objective
        results[objective] = {}
        for ckpt in sorted((path / "checkpoints").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1])):
            name, overrides = ARMS[objective]
            model = Data2VecAQCForPreTraining(Data2VecAQCConfig.from_preset("small", objective=name, **overrides))
            model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
            step = int(ckpt.name.split("-")[1])
            results[objective][step] = probe(model.data2vec_audio, clips, labels, speakers, fit_speakers,
                                             a.dev_speaker)
            print(objective, step, results[objective][step], flush=True)
        if (path / "summary.json").exists():
            results[objective]["summary"] = json.loads((path / "summary.json").read_text())
    (out / "probe.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"written {out / 'probe.json'} after {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
