"""Language-model decoding for CTC models: KenLM n-grams through pyctcdecode.

Install: `pip install "data2vec_aqc_hf[lm]" && pip install --no-deps pyctcdecode==0.5.0` (pyctcdecode pins numpy<2,
which would break pyarrow/datasets; it works with numpy 2).

transformers deprecates the pipeline's pyctcdecode `decoder` argument (removed in v6) and asks callers to use
pyctcdecode directly, so this module does: `chunked_ctc_logits` computes the logits of audio of any length with the
exact chunk-and-stride scheme of transformers' ASR pipeline, and `LMTranscriber` decodes them with a beam search
scored by the n-gram. `write_bigram_arpa` builds a word bigram ARPA file from transcripts, for corpora too small to
bother with KenLM's `lmplz` (for large text, use `lmplz -o 4 < text > lm.arpa`, then `build_binary`).
"""

from __future__ import annotations

import argparse
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from .audio import TARGET_SAMPLING_RATE

__all__ = ["write_bigram_arpa", "ctc_labels", "build_lm_decoder", "chunked_ctc_logits", "LMTranscriber"]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def write_bigram_arpa(texts: list[str], path: str | Path, discount: float = 0.5) -> Path:
    """Write a word bigram model of `texts` (one sentence each, words split on whitespace) in ARPA format.

    Unigrams are add-one smoothed over the words, `</s>` and `<unk>`. Bigrams use interpolated absolute discounting:
    `p(w|h) = max(c(h,w) - D, 0) / c(h) + lambda(h) p1(w)` with `lambda(h) = D * distinct(h) / c(h)`, and the
    backoff weight of `h` is exactly `lambda(h)`, so every conditional distribution sums to one.
    """
    if not 0.0 < discount < 1.0:
        raise ValueError(f"discount must be in (0, 1), got {discount}")
    sentences = [t.split() for t in texts if t.strip()]
    if not sentences:
        raise ValueError("write_bigram_arpa: no non-empty text to build a language model from")
    unigram_counts = Counter(w for s in sentences for w in s + [EOS])
    bigram_counts: dict[str, Counter] = defaultdict(Counter)
    for s in sentences:
        for h, w in zip([BOS] + s, s + [EOS]):
            bigram_counts[h][w] += 1
    vocab = sorted(set(unigram_counts) | {UNK})
    total = sum(unigram_counts.values()) + len(vocab)
    p1 = {w: (unigram_counts[w] + 1) / total for w in vocab}

    unigram_lines, bigram_lines = [], []
    backoff = {}
    for h, followers in bigram_counts.items():
        count = sum(followers.values())
        backoff[h] = discount * len(followers) / count
        for w, c in sorted(followers.items()):
            p = (c - discount) / count + backoff[h] * p1[w]
            bigram_lines.append(f"{math.log10(p):.7f}\t{h} {w}")
    for w in [BOS] + vocab:
        logp = -99.0 if w == BOS else math.log10(p1[w])
        bow = f"\t{math.log10(backoff[w]):.7f}" if w in backoff else ""
        unigram_lines.append(f"{logp:.7f}\t{w}{bow}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"\n\\data\\\nngram 1={len(unigram_lines)}\nngram 2={len(bigram_lines)}\n\n")
        f.write("\\1-grams:\n" + "\n".join(unigram_lines) + "\n\n")
        f.write("\\2-grams:\n" + "\n".join(bigram_lines) + "\n\n\\end\\\n")
    return path


def ctc_labels(tokenizer) -> list[str]:
    """pyctcdecode's label list for a `Wav2Vec2CTCTokenizer`: index = token id, the pad token is the CTC blank ("")
    and the word delimiter is a space."""
    vocab = tokenizer.get_vocab()
    labels = [""] * len(vocab)
    for token, index in vocab.items():
        if token == tokenizer.pad_token:
            labels[index] = ""
        elif token == tokenizer.word_delimiter_token:
            labels[index] = " "
        else:
            labels[index] = token
    return labels


def build_lm_decoder(tokenizer, lm_path: str | Path, alpha: float = 0.5, beta: float = 1.0):
    """A pyctcdecode beam-search decoder scored by the KenLM model at `lm_path` (.arpa or KenLM binary)."""
    try:
        from pyctcdecode import build_ctcdecoder
    except ImportError as err:
        raise ImportError("LM decoding needs pyctcdecode and kenlm: pip install 'data2vec_aqc_hf[lm]' && "
                          "pip install --no-deps pyctcdecode==0.5.0") from err
    lm_path = Path(lm_path)
    if not lm_path.is_file():
        raise FileNotFoundError(f"{lm_path}: language model file not found")
    return build_ctcdecoder(ctc_labels(tokenizer), kenlm_model_path=str(lm_path), alpha=alpha, beta=beta)


@torch.no_grad()
def chunked_ctc_logits(model, feature_extractor, audio: np.ndarray, chunk_length_s: float | None = None,
                       stride_length_s: float | None = None) -> np.ndarray:
    """CTC logits `(frames, vocab)` of 16 kHz mono `audio`.

    With `chunk_length_s`, the audio is cut exactly as transformers' ASR pipeline cuts it (chunks aligned to the
    model's `inputs_to_logits_ratio`, `stride_length_s` of context on each inner side, default chunk/6) and the
    logits of the context frames are dropped before concatenation, so greedy decoding of these logits equals the
    pipeline's chunked transcript.
    """
    model.eval()
    audio = np.asarray(audio, dtype=np.float32)

    def logits_of(piece):
        inputs = feature_extractor(piece, sampling_rate=TARGET_SAMPLING_RATE, return_tensors="pt",
                                   return_attention_mask=True)
        out = model(inputs["input_values"].to(model.device, model.dtype),
                    attention_mask=inputs["attention_mask"].to(model.device))
        return out.logits[0].float().cpu().numpy()

    if not chunk_length_s:
        return logits_of(audio)
    if stride_length_s is None:
        stride_length_s = chunk_length_s / 6
    align = model.config.inputs_to_logits_ratio
    chunk_len = int(round(chunk_length_s * TARGET_SAMPLING_RATE / align) * align)
    stride = int(round(stride_length_s * TARGET_SAMPLING_RATE / align) * align)
    if chunk_len < 2 * stride:
        raise ValueError(f"chunk_length_s ({chunk_length_s}) must be at least twice stride_length_s "
                         f"({stride_length_s})")
    pieces = []
    for start in range(0, len(audio), chunk_len - 2 * stride):
        chunk = audio[start : start + chunk_len]
        is_last = start + chunk_len >= len(audio)
        left, right = (0 if start == 0 else stride), (0 if is_last else stride)
        if len(chunk) > left:
            logits = logits_of(chunk)
            frames = int(round(len(chunk) / align))  # the pipeline's `rescale_stride`
            left_f, right_f = int(round(left / len(chunk) * frames)), int(round(right / len(chunk) * frames))
            pieces.append(logits[left_f : frames - right_f])
        if is_last:
            break
    return np.concatenate(pieces, axis=0)


class LMTranscriber:
    """Callable like an ASR pipeline (`asr({"raw": array, "sampling_rate": 16000}, chunk_length_s=...)["text"]`),
    decoding with a KenLM beam search instead of greedy argmax."""

    def __init__(self, model, processor, lm_path: str | Path, alpha: float = 0.5, beta: float = 1.0,
                 beam_width: int = 100):
        self.model, self.processor, self.beam_width = model, processor, beam_width
        self.decoder = build_lm_decoder(processor.tokenizer, lm_path, alpha, beta)

    def __call__(self, inputs: dict, chunk_length_s: float | None = None, stride_length_s: float | None = None):
        if inputs["sampling_rate"] != TARGET_SAMPLING_RATE:
            raise ValueError(f"LMTranscriber expects {TARGET_SAMPLING_RATE} Hz audio, got {inputs['sampling_rate']}")
        logits = chunked_ctc_logits(self.model, self.processor.feature_extractor, inputs["raw"], chunk_length_s,
                                    stride_length_s)
        log_probs = torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()
        return {"text": self.decoder.decode(log_probs, beam_width=self.beam_width).strip()}

    def transcribe_arrays(self, arrays: list[np.ndarray]) -> list[str]:
        """Texts of 16 kHz arrays, one by one (the `transcribe` argument of `finetuning.evaluate_rows`)."""
        from .finetuning import evaluation_progress

        texts = []
        with evaluation_progress(len(arrays), "transcribing (KenLM beam search)") as progress:
            for a in arrays:
                texts.append(self({"raw": a, "sampling_rate": TARGET_SAMPLING_RATE})["text"])
                progress.update(1)
        return texts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data2vec_aqc_hf.lm",
                                     description="Build a word bigram ARPA language model from transcripts.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("texts", help="a text file, one sentence per line")
    parser.add_argument("output", help="the .arpa file to write")
    parser.add_argument("--discount", type=float, default=0.5,
                        help="absolute discount of the bigram counts, in (0, 1) (interpolated absolute "
                             "discounting: the mass taken goes to the unigrams)")
    parser.add_argument("--no_normalize", action="store_true",
                        help="keep the text as is (default: the fine-tuning normalisation, upper case)")
    return parser


def main(argv=None) -> None:
    from .finetuning import normalize_text

    args = build_parser().parse_args(argv)
    lines = Path(args.texts).read_text(encoding="utf-8").splitlines()
    texts = lines if args.no_normalize else [normalize_text(t) for t in lines]
    print(write_bigram_arpa(texts, args.output, args.discount))


if __name__ == "__main__":
    main()
