"""`training/evaluate_asr.py`: score a CTC model on a manifest (WER, CER, per speaker), optionally in white noise at a
chosen SNR and with KenLM beam search."""

from __future__ import annotations

import argparse
import json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="training/evaluate_asr.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Score a CTC model on a manifest: WER, CER, per speaker, optionally with white noise at a "
                    "chosen SNR and KenLM beam-search decoding.")
    parser.add_argument("model", help="a fine-tuned CTC model folder or Hub id")
    parser.add_argument("manifest", help="CSV file_name,text[,speaker_id] or an audiofolder dir with metadata.csv")
    parser.add_argument("--speakers", help="comma-separated speakers to keep (default: all)")
    parser.add_argument("--snr_db", type=float, help="add white noise at this SNR first (default: clean)")
    parser.add_argument("--lm", help="KenLM .arpa/.bin: beam-search decoding through pyctcdecode (extra [lm])")
    parser.add_argument("--lm_alpha", type=float, default=0.5, help="LM weight (with --lm)")
    parser.add_argument("--lm_beta", type=float, default=1.0, help="word insertion bonus (with --lm)")
    parser.add_argument("--output", help="write the JSON result here too")
    return parser


def main(argv=None) -> dict:
    from transformers import AutoModelForCTC, AutoProcessor

    from . import finetuning

    args = build_parser().parse_args(argv)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForCTC.from_pretrained(args.model)
    rows = finetuning.read_manifest(args.manifest)
    if args.speakers:
        keep = set(args.speakers.split(","))
        rows = [r for r in rows if r["speaker_id"] in keep]
    transcribe = None
    if args.lm:
        from .lm import LMTranscriber

        transcribe = LMTranscriber(model, processor, args.lm, args.lm_alpha, args.lm_beta).transcribe_arrays
    result = finetuning.evaluate_rows(model, processor, finetuning.CTCDataset(rows, processor), args.snr_db,
                                      transcribe=transcribe)
    result["decoding"] = f"KenLM beam search ({args.lm})" if args.lm else "greedy CTC"
    text = json.dumps(result, indent=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    print(text)
    return result
