"""The whole story on the vendored audio, on a CPU in a few minutes:
pretrain the tiny data2vec-aqc model -> fine-tune CTC on spoken digits of three speakers -> WER on an unseen
speaker -> transcribe a few clips with stock transformers."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs"


def run(cmd):
    print("\n$ " + " ".join(str(c) for c in cmd), flush=True)
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-5000:])
        raise SystemExit(f"failed: {cmd}")
    return result.stdout


if __name__ == "__main__":
    py = sys.executable
    out = run([py, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "training/pretrain.py", "configs/demo.yaml"])
    summary = json.loads([l for l in out.splitlines() if l.startswith("SUMMARY ")][-1][8:])
    print(f"pretrained {summary['steps']} steps on {summary['hours_seen']:.3f} h of audio; final losses: "
          + ", ".join(f"{k}={v:.3f}" for k, v in summary["final"].items() if "loss" in k))
    out = run([py, "training/finetune.py", "configs/demo_finetune.yaml"])
    metrics = json.loads([l for l in out.splitlines() if l.startswith("METRICS ")][-1][8:])
    print(f"fine-tuned on 3 FSDD speakers; unseen speaker fsdd_yweweler: WER {100 * metrics['wer']:.1f}% "
          f"CER {100 * metrics['cer']:.1f}% over {metrics['num_utterances']} utterances")
    clips = [f"data/demo/audio/fsdd/yweweler/{d}_yweweler_{i}.flac" for d, i in ((3, 0), (7, 1), (9, 10))]
    print(run([py, "training/transcribe.py", OUT / "demo-finetune/final", *clips]).strip())
    print(f"\nmodel card: {OUT / 'demo-finetune/final/README.md'}; plots: {OUT / 'demo-pretrain/loss.png'}, "
          f"{OUT / 'demo-finetune/final/training_curves.png'}")
