"""fairseq checkpoint conversion against the authors' own outputs (`../shared/fixtures/fairseq_aqc`, see its
README): encoder outputs, teacher targets, every pretraining loss term, CTC logits and transcripts; safe loading;
bad input."""

import copy
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_without_package

from data2vec_aqc_hf import Data2VecAQCForPreTraining
from data2vec_aqc_hf.convert import (LIBRISPEECH_LETTERS, card_text, convert_checkpoint, fairseq_vocab, main,
                                     release_mismatch)
from data2vec_aqc_hf.fairseq_io import FairseqCheckpointError, load_fairseq_checkpoint

FIXTURES = ROOT.parent / "shared" / "fixtures" / "fairseq_aqc"
pytestmark = pytest.mark.skipif(not FIXTURES.exists(), reason=f"needs the fairseq fixtures at {FIXTURES}")
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                  layerdrop=0.0)


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURES / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    summary = convert_checkpoint(FIXTURES / "aqc_tiny_pretrain.pt", out)
    assert summary["kind"] == "pretraining" and summary["objective"] == "aqc" and summary["num_updates"] == 10
    return out


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    assert main([str(FIXTURES / "aqc_tiny_finetuned_ctc.pt"), str(out)]) == 0
    return out


def _encoder_outputs(model, x):
    backbone = model.data2vec_audio
    with torch.no_grad():
        out = backbone(x)
        hidden, _ = backbone.feature_projection(backbone.feature_extractor(x).transpose(1, 2))
        teacher = model.teacher(hidden).last_hidden_state
        targets = model.teacher_targets(hidden, None)
    return out, teacher, targets


def test_pretraining_checkpoint_reproduces_encoder_teacher_and_targets(pretrained_dir, expected):
    model = Data2VecAQCForPreTraining.from_pretrained(pretrained_dir).eval()
    assert model.num_updates.item() == 10
    ref = expected["pretrain"]
    out, teacher, targets = _encoder_outputs(model, expected["audio"]["source"])
    for ours, key in [(out.extract_features, "extract_features"), (out.last_hidden_state, "student_last_hidden_state"),
                      (teacher, "teacher_last_hidden_state"), (targets, "teacher_targets")]:
        assert (ours - ref[key]).abs().max().item() < 1e-5, key
    # the teacher really is `_ema` (it differs from the student), not a copy of the student
    assert (ref["teacher_last_hidden_state"] - out.last_hidden_state).abs().max() > 1e-2


def _replayed_inputs(expected):
    """The fixture's mask, negatives (local indices into the masked frames -> flat indices, as
    `Wav2Vec2ForPreTraining`'s `sampled_negative_indices`) and k-means labels (clean masked frames, batch-major,
    then the augmented ones) in this package's format."""
    inputs = expected["pretrain"]["loss"]["inputs"]
    mask = inputs["mask_indices"]
    batch, frames = mask.shape

    def flat(local):
        out = torch.zeros(batch, frames, local.shape[-1], dtype=torch.long)
        for b in range(batch):
            positions = mask[b].nonzero()[:, 0]
            out[b, positions] = b * frames + positions[local[b].long()]
        return out

    negatives = torch.stack([flat(inputs["neg_idxs"]), flat(inputs["neg_aug_idxs"])])
    labels = torch.full((2, batch, frames), -1, dtype=torch.long)
    n = int(mask.sum())
    labels[0][mask], labels[1][mask] = inputs["cluster_labels"][:n], inputs["cluster_labels"][n:]
    return dict(mask_time_indices=mask, sampled_negative_indices=negatives, cluster_labels=labels)


def _loss_terms(model, expected, **replay):
    audio = expected["audio"]
    out = model(audio["source"], augmented_input_values=audio["aug_source"], deterministic_quantizer=True,
                normalize_inputs=False, **replay)  # the fixture's views are already normalised (full utterance)
    n = expected["pretrain"]["loss"]["terms"]["sample_size"]
    return {"loss": out.loss.item() * n, "mse_scaled": out.regression_loss.item() * n,
            "contrastive_s_sum": out.student_contrastive_loss.item() * n,
            "contrastive_t_sum": out.teacher_contrastive_loss.item() * n, "diversity": out.diversity_loss.item(),
            "features_pen": out.feature_penalty.item(), "prob_perplexity": out.codebook_perplexity.sum().item()}


def test_every_pretraining_loss_term_matches_the_authors(pretrained_dir, expected):
    """Training-mode forward with the stored mask, negatives and cluster labels and the hard quantizer: each term
    within 1e-4 relative of the authors' code (measured: <= 2.3e-6; their L_t rounds the targets to fp16)."""
    model = Data2VecAQCForPreTraining.from_pretrained(pretrained_dir, **NO_DROPOUT).train()
    replay = _replayed_inputs(expected)
    terms = expected["pretrain"]["loss"]["terms"]
    assert replay["mask_time_indices"].sum().item() == terms["sample_size"]
    ours = _loss_terms(model, expected, **replay)
    for key, value in ours.items():
        assert abs(value - terms[key]) <= 1e-4 * abs(terms[key]), (key, value, terms[key])
    # the loss is wired as theirs: per masked frame, regression + 0.5 (L_s + L_t) + 0.1 L_div + 10 L_pen
    assert abs(ours["loss"] / terms["sample_size"] - terms["loss_per_frame"]) < 1e-4 * terms["loss_per_frame"]


def test_swapping_the_cross_contrastive_views_breaks_parity(pretrained_dir, expected):
    """L_s must pair the student with the clean view's codes and L_t the teacher with the augmented view's: with
    the two negative sets and label sets swapped, the terms no longer match."""
    model = Data2VecAQCForPreTraining.from_pretrained(pretrained_dir, **NO_DROPOUT).train()
    replay = _replayed_inputs(expected)
    swapped = dict(replay, sampled_negative_indices=replay["sampled_negative_indices"].flip(0),
                   cluster_labels=replay["cluster_labels"].flip(0))
    terms = expected["pretrain"]["loss"]["terms"]
    ours = _loss_terms(model, expected, **swapped)
    assert abs(ours["contrastive_s_sum"] - terms["contrastive_s_sum"]) > 1e-3 * terms["contrastive_s_sum"]


def test_finetuned_checkpoint_is_a_stock_model_with_the_authors_logits(finetuned_dir, expected):
    config = json.loads((finetuned_dir / "config.json").read_text())
    assert config["model_type"] == "data2vec-audio" and "auto_map" not in config
    ref = expected["finetuned"]
    assert json.loads((finetuned_dir / "vocab.json").read_text()) == ref["hf_vocab"]
    for key, value in ref["hf_config_token_ids"].items():
        assert config[key] == value, key
    torch.save({"x": expected["audio"]["source"], "logits": ref["ctc_logits"]}, finetuned_dir / "io.pt")
    # plain transformers, in a process where this package cannot be imported. Tolerance: the converted model in
    # fp64 lies 5.9e-5 from the stored fp32 logits (|logits| up to 11: the reference's own fp32 rounding on another
    # CPU), so 1e-5 absolute is below the reference's precision; checked: 1e-5 relative to the logits' scale.
    out = run_without_package(f"""
        import torch
        from transformers import AutoModelForCTC, AutoProcessor, pipeline
        d = {str(finetuned_dir)!r}
        model = AutoModelForCTC.from_pretrained(d).eval()
        assert type(model).__name__ == "Data2VecAudioForCTC", type(model)
        processor = AutoProcessor.from_pretrained(d)
        io = torch.load(d + "/io.pt", weights_only=True)
        with torch.no_grad():
            logits = model(io["x"]).logits
        print("RELDIFF", ((logits - io["logits"]).abs().max() / io["logits"].abs().max()).item())
        print("GREEDY", processor.batch_decode(logits.argmax(-1)))
        asr = pipeline("automatic-speech-recognition", model=d)
        print("PIPELINE", [asr({{"raw": a.numpy(), "sampling_rate": 16000}})["text"] for a in io["x"]])
    """, finetuned_dir)
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines() if line.split(" ", 1)[0].isupper())
    assert float(lines["RELDIFF"]) < 1e-5, out
    assert eval(lines["GREEDY"]) == ref["greedy_strings"]
    assert eval(lines["PIPELINE"]) == ref["greedy_strings"]


def test_dictionary_sources_agree(tmp_path, expected):
    symbols = expected["finetuned"]["fairseq_symbols"]
    assert LIBRISPEECH_LETTERS == symbols[4:]  # the built-in default is the standard LibriSpeech dictionary
    vocab, full = fairseq_vocab()
    assert vocab == expected["finetuned"]["hf_vocab"] and full == symbols
    convert_checkpoint(FIXTURES / "aqc_tiny_finetuned_ctc.pt", tmp_path / "d", dict_path=FIXTURES / "dict.ltr.txt")
    assert json.loads((tmp_path / "d" / "vocab.json").read_text()) == expected["finetuned"]["hf_vocab"]


def test_card_names_the_source_and_push_uses_the_hub_boundary(tmp_path, monkeypatch, capsys):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return "https://huggingface.co/fake/commit"

    monkeypatch.setattr("data2vec_aqc_hf.hub.HfApi", FakeApi)
    src = tmp_path / "data2vec-aqc_base_960h_100h.pt"  # a release's name on a tiny file: no paper numbers
    src.write_bytes((FIXTURES / "aqc_tiny_finetuned_ctc.pt").read_bytes())
    assert main([str(src), str(tmp_path / "out"), "--push_to_hub", "me/aqc"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "data2vec-aqc_base_960h_100h.pt" in card and "me/aqc" in card
    assert "4.8 / 9.5" not in card and "asr.iitm.ac.in" not in card and "fine-tuned on 100 h" not in card
    assert "named like the authors' release" in capsys.readouterr().out
    assert "$" not in card.split("---", 2)[2].replace("$ ", "")
    assert calls[0] == ("create", "me/aqc") and "model.safetensors" in calls[1][2] and "README.md" in calls[1][2]


def test_plain_data2vec_v1_checkpoint_converts_as_data2vec(tmp_path, expected):
    """A fairseq data2vec v1 audio checkpoint = the same layout without the AQC modules and fields."""
    state = load_fairseq_checkpoint(FIXTURES / "aqc_tiny_pretrain.pt")
    state["model"] = {k: v for k, v in state["model"].items()
                      if not k.startswith(("quantizer.", "project_q.", "contr_proj."))}
    for key in ("cluster_factor", "scale_factor", "final_proj_dim", "num_negatives"):
        state["cfg"]["model"].pop(key)
    torch.save(state, tmp_path / "data2vec.pt")
    summary = convert_checkpoint(tmp_path / "data2vec.pt", tmp_path / "out")
    assert summary["objective"] == "data2vec"
    model = Data2VecAQCForPreTraining.from_pretrained(tmp_path / "out").eval()
    assert not hasattr(model, "quantizer")
    out, _, targets = _encoder_outputs(model, expected["audio"]["source"])
    assert (out.last_hidden_state - expected["pretrain"]["student_last_hidden_state"]).abs().max() < 1e-5
    assert (targets - expected["pretrain"]["teacher_targets"]).abs().max() < 1e-5


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_planted_payload_never_runs(tmp_path):
    state = load_fairseq_checkpoint(FIXTURES / "aqc_tiny_pretrain.pt")
    marker = tmp_path / "pwned"
    state["extra_state"]["evil"] = _Payload(marker)
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(FairseqCheckpointError, match=r"evil\.pt: refusing to unpickle .*system.*--trust_pickle"):
        convert_checkpoint(tmp_path / "evil.pt", tmp_path / "out")
    assert main([str(tmp_path / "evil.pt"), str(tmp_path / "out")]) == 2
    assert not marker.exists()


def test_bad_inputs_name_the_file_and_the_problem(tmp_path):
    good = (FIXTURES / "aqc_tiny_pretrain.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(FairseqCheckpointError, match=r"cut\.pt: not a PyTorch zip checkpoint"):
        convert_checkpoint(tmp_path / "cut.pt", tmp_path / "o1")
    with pytest.raises(FairseqCheckpointError, match=r"missing\.pt: no such file"):
        convert_checkpoint(tmp_path / "missing.pt", tmp_path / "o2")

    state = load_fairseq_checkpoint(FIXTURES / "aqc_tiny_pretrain.pt")
    other = copy.deepcopy(state)
    other["cfg"]["model"]["_name"] = "wav2vec2"
    torch.save(other, tmp_path / "w2v.pt")
    with pytest.raises(FairseqCheckpointError, match=r"w2v\.pt: a fairseq 'wav2vec2' model"):
        convert_checkpoint(tmp_path / "w2v.pt", tmp_path / "o3")
    prelayer = copy.deepcopy(state)
    prelayer["cfg"]["model"]["layer_norm_first"] = True
    torch.save(prelayer, tmp_path / "preln.pt")
    with pytest.raises(FairseqCheckpointError, match=r"preln\.pt: unsupported fairseq setting\(s\): layer_norm_first=True"):
        convert_checkpoint(tmp_path / "preln.pt", tmp_path / "o4")

    (tmp_path / "dict.txt").write_text("".join(f"{c} 1\n" for c in "ABC"))
    with pytest.raises(FairseqCheckpointError, match=r"7 entries .* 32 rows"):
        convert_checkpoint(FIXTURES / "aqc_tiny_finetuned_ctc.pt", tmp_path / "o5", dict_path=tmp_path / "dict.txt")


def test_trusted_loading_needs_no_fairseq_either(tmp_path):
    state = load_fairseq_checkpoint(FIXTURES / "aqc_tiny_finetuned_ctc.pt", trust_pickle=True)
    assert state["task_state"]["target_dictionary"].symbols[4:] == LIBRISPEECH_LETTERS


def test_converted_pretraining_model_continues_pretraining(pretrained_dir):
    """One optimizer step + EMA update from the converted model (what `training/pretrain.py
    --model_name_or_path` does): finite loss, teacher moves with decay(11) of the authors' schedule."""
    model = Data2VecAQCForPreTraining.from_pretrained(pretrained_dir, **NO_DROPOUT).train()
    x = torch.randn(2, 16000)
    out = model(x, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    torch.optim.SGD(model.student_parameters(), lr=1e-3).step()
    tau = model.update_teacher()
    assert torch.isfinite(out.loss) and model.num_updates.item() == 11
    assert abs(tau - (0.999 + (0.9999 - 0.999) * 11 / 30000)) < 1e-12


def test_deepcopy_and_pickle_keep_the_teacher_targets_working():
    model = Data2VecAQCForPreTraining(__import__("conftest").tiny_config()).eval()
    x = torch.randn(2, 8000)

    def loss(m):
        return m(x, generator=torch.Generator().manual_seed(0)).loss

    reference = loss(model)
    copied = copy.deepcopy(model)
    assert copied._target_recorder is not model._target_recorder
    assert torch.equal(loss(copied), reference)
    assert torch.equal(loss(pickle.loads(pickle.dumps(model))), reference)
    with torch.no_grad():  # the copy's recorder follows the copy's own teacher
        next(copied.teacher.parameters()).add_(1.0)
    assert not torch.equal(loss(copied), reference) and torch.equal(loss(model), reference)



def test_checkpoint_with_an_omegaconf_cfg_loads(tmp_path):
    """A file re-saved after fairseq's `load_checkpoint_to_cpu` holds `cfg` as an omegaconf `DictConfig`."""
    omegaconf = pytest.importorskip("omegaconf", reason="pip install -e '.[fairseq]' (CI does)")
    state = load_fairseq_checkpoint(FIXTURES / "aqc_tiny_pretrain.pt")
    state["cfg"] = omegaconf.OmegaConf.create(state["cfg"], flags={"allow_objects": True})
    torch.save(state, tmp_path / "resaved.pt")
    summary = convert_checkpoint(tmp_path / "resaved.pt", tmp_path / "out")
    assert summary["objective"] == "aqc"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["conv_pos_kernel_size"] == 5 and config["num_conv_pos_embeddings"] == 2


def test_converted_card_example_runs_as_written_in_plain_transformers(tmp_path):
    """The converted fine-tuned model's card: its usage block, as written (it names the output folder when nothing
    is pushed), runs where this package cannot be imported, on an 8 kHz FSDD file (the block down-mixes and
    resamples), and prints the greedy transcript of the 16 kHz audio."""
    import re

    import soundfile as sf
    from transformers import AutoModelForCTC, AutoProcessor

    out = tmp_path / "out"
    assert main([str(FIXTURES / "aqc_tiny_finetuned_ctc.pt"), str(out)]) == 0
    card = (out / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", card, re.S)
    assert str(out) in block and "path/to/converted" not in block
    from data2vec_aqc_hf.audio import load_audio

    eight_khz = ROOT / "data/demo/audio/fsdd/lucas/5_lucas_1.flac"
    assert sf.info(eight_khz).samplerate == 8000
    shutil.copy(eight_khz, tmp_path / "speech.flac")
    printed = run_without_package(block, tmp_path).strip()
    model, processor = AutoModelForCTC.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
    audio = load_audio(eight_khz)  # the package's loader: mono, 16 kHz
    with torch.no_grad():
        ids = model(**processor(audio, sampling_rate=16000, return_tensors="pt")).logits.argmax(-1)
    assert printed == processor.batch_decode(ids)[0].strip()


def test_converted_pretraining_card_example_runs_in_plain_transformers(tmp_path):
    """The converted pretraining model's card block runs where this package cannot be imported (the folder
    carries the model code; no `pip install` of a package that is not on PyPI), giving the student's embeddings."""
    import re


    out = tmp_path / "out"
    assert main([str(FIXTURES / "aqc_tiny_pretrain.pt"), str(out)]) == 0
    (block,) = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)
    assert "pip install" not in block and str(out) in block
    hidden = json.loads((out / "config.json").read_text())["hidden_size"]
    printed = run_without_package(block, tmp_path).strip().splitlines()[-1]
    assert printed.startswith("(1, ") and printed.endswith(f", {hidden})"), printed


def test_release_numbers_only_for_a_file_with_the_release_contents():
    """The card credits a file with a release's description, link and WER only when its name is a release's and
    its contents fit that release (BASE size; CTC for `_100h`, pretraining otherwise)."""
    release = {"source": "data2vec-aqc_base_960h_100h.pt", "kind": "finetuned", "num_updates": 80000,
               "objective": "ctc", "num_hidden_layers": 12, "hidden_size": 768, "notes": []}
    assert release_mismatch(release) is None
    card = card_text(release, "me/aqc")
    assert "4.8 / 9.5" in card and "fine-tuned on 100 h" in card and "asr.iitm.ac.in" in card
    pretrained = {**release, "source": "data2vec-aqc_base_960h.pt", "kind": "pretraining", "objective": "aqc"}
    assert release_mismatch(pretrained) is None and "pretrained on LibriSpeech 960 h" in card_text(pretrained, None)
    wrong_kind = {**release, "kind": "pretraining"}
    assert "kind pretraining (the release: finetuned)" in release_mismatch(wrong_kind)
    small = {**release, "num_hidden_layers": 4, "hidden_size": 256}
    assert "num_hidden_layers 4 (the release: 12)" in release_mismatch(small)
    assert "4.8 / 9.5" not in card_text(small, "me/aqc")
    assert release_mismatch({**release, "source": "my_model.pt"}) is None  # not a release's name: nothing claimed
