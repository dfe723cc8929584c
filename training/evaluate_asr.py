"""Score a CTC model on a manifest: WER, CER, per speaker, optionally with white noise at a chosen SNR.

(Not named `evaluate.py`: a script of that name in `training/` would shadow the `evaluate` library for every
script run from this folder, since Python puts the script's folder first on `sys.path`.)

    python training/evaluate_asr.py MODEL data/demo/metadata.csv [--speakers fsdd_yweweler] [--snr_db 10] [--lm lm.arpa]
"""

import argparse
import json

from transformers import AutoModelForCTC, AutoProcessor

import data2vec_aqc_hf  # noqa: F401
from data2vec_aqc_hf.finetuning import CTCDataset, evaluate_rows, read_manifest

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("manifest", help="CSV file_name,text[,speaker_id] or an audiofolder dir with metadata.csv")
    parser.add_argument("--speakers", help="comma-separated speakers to keep")
    parser.add_argument("--snr_db", type=float, help="add white noise at this SNR first")
    parser.add_argument("--lm", help="KenLM .arpa/.bin: beam-search decoding through pyctcdecode (extra [lm])")
    parser.add_argument("--lm_alpha", type=float, default=0.5)
    parser.add_argument("--lm_beta", type=float, default=1.0)
    parser.add_argument("--output", help="write the JSON result here")
    args = parser.parse_args()
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForCTC.from_pretrained(args.model)
    rows = read_manifest(args.manifest)
    if args.speakers:
        keep = set(args.speakers.split(","))
        rows = [r for r in rows if r["speaker_id"] in keep]
    transcribe = None
    if args.lm:
        from data2vec_aqc_hf.lm import LMTranscriber

        transcribe = LMTranscriber(model, processor, args.lm, args.lm_alpha, args.lm_beta).transcribe_arrays
    result = evaluate_rows(model, processor, CTCDataset(rows, processor), args.snr_db, transcribe=transcribe)
    result["decoding"] = f"KenLM beam search ({args.lm})" if args.lm else "greedy CTC"
    text = json.dumps(result, indent=2)
    if args.output:
        open(args.output, "w").write(text)
    print(text)
