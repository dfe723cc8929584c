import csv
import subprocess
import textwrap
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
SHARED = ROOT.parent / "shared" / "speech_corpus"

sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is unreachable here; fail fast instead of retrying
torch.set_num_threads(2)


def tiny_config(**overrides):
    from data2vec_aqc_hf import Data2VecAQCConfig

    return Data2VecAQCConfig.from_preset("tiny", **overrides)


def demo_unlabeled_paths():
    rows = list(csv.DictReader(open(DEMO / "unlabeled.csv")))
    return [DEMO / r["file_name"] for r in rows]


def real_speech_batch(n=4, seconds=2.0, offset_seconds=1.0):
    """`n` real LibriSpeech utterances (vendored), cropped to `seconds`, the last one shorter (padding)."""
    from data2vec_aqc_hf.audio import load_audio

    length = int(seconds * 16000)
    waves, lengths = [], []
    for i, path in enumerate(demo_unlabeled_paths()[:n]):
        audio = load_audio(path)
        start = int(offset_seconds * 16000)
        crop = audio[start : start + length]
        if i == n - 1:
            crop = crop[: int(length * 0.7)]
        waves.append(crop)
        lengths.append(len(crop))
    x = torch.zeros(n, length)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i, w in enumerate(waves):
        x[i, : len(w)] = torch.from_numpy(np.ascontiguousarray(w))
        mask[i, : len(w)] = 1
    return x, mask


@pytest.fixture
def speech_batch():
    return real_speech_batch()


def needs_shared():
    return pytest.mark.skipif(not SHARED.exists(), reason=f"needs the shared speech corpus at {SHARED}")


@pytest.fixture(scope="session")
def random_ctc_dir(tmp_path_factory):
    """A tiny, untrained CTC model with a processor; the head is scaled so argmax varies from frame to frame."""
    from data2vec_aqc_hf import Data2VecAQCForCTC
    from data2vec_aqc_hf.finetuning import build_vocab, make_processor

    directory = tmp_path_factory.mktemp("ctc")
    processor = make_processor(build_vocab(["ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE ZERO"]), directory)
    torch.manual_seed(0)
    model = Data2VecAQCForCTC(tiny_config(vocab_size=len(processor.tokenizer), layerdrop=0.0)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def run_without_package(code: str, cwd):
    """Run `code` in a fresh interpreter where `import data2vec_aqc_hf` fails."""
    prelude = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "data2vec_aqc_hf" or name.startswith("data2vec_aqc_hf."):
                    raise ImportError("blocked for this test")
        sys.meta_path.insert(0, Block())
        sys.path = [p for p in sys.path if p not in ("", ".")]
    """)
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, capture_output=True,
                            text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                            "HF_MODULES_CACHE": str(cwd / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def gathered_contrastive_logits(anchors, targets, negative_indices, kappa, cluster_labels=None, cluster_scale=1.0):
    """The reference form of `contrastive.contrastive_logits` (as the authors' and transformers' code computes it):
    gather the K negative vectors of every frame, cosine with the anchor. The library reads the same values from one
    frames x frames cosine matrix per utterance; tests compare the two."""
    import torch.nn.functional as F

    batch, frames, dim = targets.shape
    negatives = targets.reshape(batch * frames, dim)[negative_indices]  # (B, T, K, D)
    candidates = torch.cat([targets[:, :, None], negatives], dim=2)
    logits = F.cosine_similarity(anchors[:, :, None].float(), candidates.float(), dim=-1, eps=1e-8) / kappa
    neg_logits = logits[..., 1:]
    if cluster_labels is not None:
        same_cluster = cluster_labels.reshape(-1)[negative_indices] == cluster_labels[:, :, None]
        neg_logits = torch.where(same_cluster, neg_logits * cluster_scale, neg_logits)
    neg_logits = neg_logits.masked_fill((negatives == targets[:, :, None]).all(-1), float("-inf"))
    return torch.cat([logits[..., :1], neg_logits], dim=-1)
