"""Transcription of files or directories with a CTC model (ours, a stock export, or a Hub id), through the
transformers ASR pipeline: any sample rate (resampled by the package's loader), any length (chunked with stride),
optional KenLM decoding through pyctcdecode (`pip install data2vec_aqc_hf[lm]`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .audio import TARGET_SAMPLING_RATE, AudioError, load_audio
from .data import AUDIO_EXTENSIONS

MIN_SECONDS = 0.25  # below this a clip is a few CTC frames: transcribed, with a warning


def audio_files(inputs: list[str], report=None) -> list[Path]:
    """The audio files of `inputs` (files, or folders searched recursively). A missing path raises
    `FileNotFoundError` naming it, before any model is loaded; files of a folder that are not audio (by extension)
    are skipped and reported through `report(message)`."""
    missing = [item for item in inputs if not Path(item).exists()]
    if missing:
        raise FileNotFoundError(f"no such file or directory: {', '.join(missing)}")
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            audio = [p for p in found if p.suffix.lower() in AUDIO_EXTENSIONS]
            others = [p for p in found if p.suffix.lower() not in AUDIO_EXTENSIONS]
            if others and report:
                shown = ", ".join(p.name for p in others[:3]) + (" ..." if len(others) > 3 else "")
                report(f"{path}: skipping {len(others)} file(s) that are not audio ({shown})")
            files += audio
        else:
            files.append(path)
    return files


def model_file(model: str, name: str) -> Path | None:
    """The file `name` of `model` (a local folder, else a Hub id, downloaded to the Hub cache), or None where it
    has no such file or it cannot be reached (the model's loading then says why)."""
    if Path(model).is_dir():
        path = Path(model) / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(model, name))
    except (OSError, ValueError, EntryNotFoundError):  # not a Hub id (ValueError), no such file, offline
        return None


def pretraining_checkpoint_error(model: str) -> str | None:
    """A message when `model` (local folder or Hub id) is a data2vec-aqc *pretraining* checkpoint (no CTC head,
    no tokenizer), or a CTC model saved without its vocabulary."""
    config = model_file(model, "config.json")
    if config is None:
        return None
    values = json.loads(config.read_text())
    if any(a.endswith("ForPreTraining") for a in values.get("architectures") or []):
        return (f"{model} is a pretraining checkpoint (no CTC head or vocabulary): fine-tune it first "
                f"(training/finetune.py --model_name_or_path {model} ...)")
    if not any(model_file(model, name) for name in ("vocab.json", "tokenizer_config.json")):
        return f"{model}: no vocab.json / tokenizer: save the processor with the model (processor.save_pretrained)"
    return None


def build_pipeline(model: str, device: int | str = -1, lm: str | None = None, trust_remote_code: bool = False,
                   lm_alpha: float = 0.5, lm_beta: float = 1.0, beam_width: int = 100):
    """The transformers ASR pipeline for `model` (greedy CTC); with `lm`, an `LMTranscriber` with the same call
    signature that decodes with a KenLM beam search (transformers deprecates LM decoding inside the pipeline)."""
    from transformers import AutoModelForCTC, AutoProcessor, pipeline

    import data2vec_aqc_hf  # noqa: F401  (registers data2vec-aqc checkpoints)

    device = torch_device(device)
    if lm:
        from .lm import LMTranscriber

        ctc = AutoModelForCTC.from_pretrained(model, trust_remote_code=trust_remote_code)
        return LMTranscriber(ctc.to(device), AutoProcessor.from_pretrained(model), lm, lm_alpha, lm_beta, beam_width)
    return pipeline("automatic-speech-recognition", model=model, device=device, trust_remote_code=trust_remote_code)


def torch_device(device: int | str):
    """The pipeline's device convention (-1 = CPU, N = cuda:N, or a device string) as a torch device string."""
    if isinstance(device, str) and not device.lstrip("-").isdigit():
        return device
    return "cpu" if int(device) < 0 else f"cuda:{int(device)}"


def transcribe_files(asr, files: list[Path], chunk_length_s: float = 20.0, stride_length_s: float = 4.0):
    """Yield `(file, transcript or None, error or None)`; a bad file is reported and skipped, as is a clip
    shorter than the model's CNN receptive field (checked here: a stock `Data2VecAudioForCTC` would fail inside
    its convolution)."""
    from .modeling_data2vec_aqc import receptive_field

    field = receptive_field(asr.model.config)
    for path in files:
        try:
            audio = load_audio(path)
        except AudioError as err:
            yield path, None, str(err)
            continue
        seconds = len(audio) / TARGET_SAMPLING_RATE
        if seconds < MIN_SECONDS:
            print(f"WARNING {path}: {seconds:.2f} s is very short (< {MIN_SECONDS} s); the transcript is unreliable",
                  file=sys.stderr)
        if len(audio) < field:
            yield path, None, (f"{path}: {len(audio)} samples ({seconds:.3f} s at 16 kHz) is shorter than the model's "
                               f"receptive field of {field} samples ({field / TARGET_SAMPLING_RATE:.3f} s); not "
                               f"transcribed")
            continue
        kwargs = dict(chunk_length_s=chunk_length_s, stride_length_s=stride_length_s) if seconds > chunk_length_s else {}
        try:
            text = asr({"raw": audio, "sampling_rate": TARGET_SAMPLING_RATE}, **kwargs)["text"]
        except ValueError as err:  # e.g. a clip shorter than the CNN's receptive field: this file fails, not the run
            yield path, None, f"{path}: {err}"
            continue
        yield path, text, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data2vec-aqc-transcribe",
                                     description="Transcribe audio files with a data2vec-aqc CTC model.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", help="model directory or Hub id (a fine-tuned CTC model)")
    parser.add_argument("inputs", nargs="+", help="audio files or directories (any format libsndfile reads)")
    parser.add_argument("--output", help="write JSON lines {file, text} here instead of printing")
    parser.add_argument("--chunk_length_s", type=float, default=20.0,
                        help="audio longer than this is transcribed in chunks of this length")
    parser.add_argument("--stride_length_s", type=float, default=4.0,
                        help="overlap of neighbouring chunks (each side), whose logits are dropped")
    parser.add_argument("--device", default=-1, help="-1 for CPU, N for cuda:N, or a torch device string")
    parser.add_argument("--lm", help="KenLM .arpa/.bin for beam search with pyctcdecode (extra `[lm]`); build a "
                        "bigram from transcripts with `python -m data2vec_aqc_hf.lm texts.txt lm.arpa`")
    parser.add_argument("--lm_alpha", type=float, default=0.5, help="LM weight (with --lm)")
    parser.add_argument("--lm_beta", type=float, default=1.0, help="word insertion bonus (with --lm)")
    parser.add_argument("--beam_width", type=int, default=100, help="beam width of the LM search (with --lm)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run a Hub model's own code (our checkpoints load without it when this package is "
                             "installed)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        files = audio_files(args.inputs, report=lambda message: print(f"WARNING {message}", file=sys.stderr))
    except FileNotFoundError as err:
        parser.error(str(err))
    if not files:
        parser.error(f"no audio files in {args.inputs}")
    if args.output and not Path(args.output).resolve().parent.is_dir():  # said now, not after loading the model
        parser.error(f"--output {args.output}: the folder {Path(args.output).resolve().parent} does not exist")
    if args.lm and not Path(args.lm).is_file():
        parser.error(f"--lm {args.lm}: language model file not found")
    problem = pretraining_checkpoint_error(args.model)
    if problem:
        parser.error(problem)
    try:
        asr = build_pipeline(args.model, args.device, args.lm, args.trust_remote_code, args.lm_alpha, args.lm_beta,
                             args.beam_width)
    except (OSError, ImportError) as err:  # a missing model, LM file or optional extra: one clear line
        parser.error(str(err))
    from .finetuning import evaluation_progress

    out = open(args.output, "w") if args.output else None
    failures = 0
    progress = evaluation_progress(len(files) if out else 0, f"transcribing to {args.output}")  # else: one line each
    for path, text, error in transcribe_files(asr, files, args.chunk_length_s, args.stride_length_s):
        progress.update(1)
        if error:
            failures += 1
            print(f"ERROR {error}", file=sys.stderr)
        elif out:
            out.write(json.dumps({"file": str(path), "text": text}) + "\n")
        else:
            print(f"{path}\t{text}")
    progress.close()
    if out:
        out.close()
    if failures:
        print(f"{failures} of {len(files)} file(s) failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
