import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import real_speech_batch, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCTC, AutoModelForPreTraining, Data2VecAudioModel

from data2vec_aqc_hf import Data2VecAQCForCTC, Data2VecAQCForPreTraining, Data2VecAQCModel
from data2vec_aqc_hf.export import save_as_data2vec_audio
from data2vec_aqc_hf.masking import compute_span_mask, sample_negative_indices


def _fixed_inputs(model, x, mask, seed=0):
    """Every random choice of the step, drawn once: mask, negatives, augmented audio, cluster labels."""
    g = torch.Generator().manual_seed(seed)
    frames = int(model.data2vec_audio._get_feat_extract_output_lengths(torch.tensor(x.shape[1])))
    lengths = model.data2vec_audio._get_feat_extract_output_lengths(mask.sum(-1))
    mask_idx = compute_span_mask((x.shape[0], frames), 0.65, 10, lengths, 2, g)
    negs = torch.stack([sample_negative_indices(mask_idx, model.config.num_negatives, g) for _ in range(2)])
    aug = model.augmenter(x, mask.bool(), g) if model.config.use_aqc else None
    labels = torch.randint(0, 3, (2,) + mask_idx.shape, generator=g)
    return dict(mask_time_indices=mask_idx, sampled_negative_indices=negs, augmented_input_values=aug,
                cluster_labels=labels)


def test_forward_outputs_and_loss_composition(speech_batch):
    x, mask = speech_batch
    model = Data2VecAQCForPreTraining(tiny_config())
    out = model(x, mask, generator=torch.Generator().manual_seed(0))
    c = model.config
    expected = (out.regression_loss + c.student_contrastive_weight * out.student_contrastive_loss
                + c.teacher_contrastive_weight * out.teacher_contrastive_loss
                + c.diversity_loss_weight * out.diversity_loss + c.feature_penalty_weight * out.feature_penalty)
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    assert out.codebook_perplexity.shape == (2,)
    assert 1.0 <= out.codebook_perplexity.min() and out.codebook_perplexity.max() <= c.num_codevectors_per_group
    assert out.gumbel_temperature.item() == 2.0 and abs(out.ema_decay.item() - 0.999) < 1e-6  # reported as fp32
    assert out.target_std > 0 and out.prediction_std > 0
    # masked frames never fall in padding
    frame_valid = model.data2vec_audio._get_feature_vector_attention_mask(out.mask_time_indices.shape[1], mask)
    assert not (out.mask_time_indices & ~frame_valid).any()
    assert out.num_masked_frames == out.mask_time_indices.sum()


def test_regression_loss_matches_hand_computation(speech_batch):
    x, mask = speech_batch
    model = Data2VecAQCForPreTraining(tiny_config()).eval()
    fixed = _fixed_inputs(model, x, mask)
    out = model(x, mask, **fixed)
    from data2vec_aqc_hf.augment import normalize_waveform

    backbone = model.data2vec_audio
    frames = out.mask_time_indices.shape[1]
    valid = backbone._get_feature_vector_attention_mask(frames, mask)
    clean = normalize_waveform(x, mask.bool())
    feats = backbone.feature_projection.projection(backbone.feature_projection.layer_norm(
        backbone.feature_extractor(clean).transpose(1, 2)))
    targets = model.teacher_targets(feats, valid)
    pred = model.final_proj(out.last_hidden_state)
    m = out.mask_time_indices
    expected = ((pred[m] - targets[m]) ** 2).sum(-1).sum() / math.sqrt(model.config.hidden_size) / m.sum()
    assert torch.allclose(out.regression_loss, expected, rtol=1e-5)


def test_loss_is_pure_function_when_all_randomness_given(speech_batch):
    x, mask = speech_batch
    model = Data2VecAQCForPreTraining(tiny_config()).train()
    fixed = _fixed_inputs(model, x, mask)
    a = model(x, mask, deterministic_quantizer=True, **fixed)
    b = model(x, mask, deterministic_quantizer=True, **fixed)
    assert torch.equal(a.loss, b.loss)
    # and a seeded generator alone reproduces a step
    c = model(x, mask, generator=torch.Generator().manual_seed(5))
    d = model(x, mask, generator=torch.Generator().manual_seed(5))
    assert torch.equal(c.loss, d.loss)


def test_bf16_autocast_step_matches_fp32_and_keeps_fp32_weights(speech_batch):
    """Mixed precision as accelerate runs it (autocast around the forward; here on CPU, the same autocast API as CUDA):
    same inputs give every loss term within a few percent of fp32, gradients are finite fp32, and the teacher's EMA
    weights stay fp32 after `update_teacher()`."""
    x, mask = speech_batch
    model = Data2VecAQCForPreTraining(tiny_config()).train()
    fixed = _fixed_inputs(model, x, mask)
    reference = model(x, mask, deterministic_quantizer=True, **fixed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask, deterministic_quantizer=True, **fixed)
    terms = ["loss", "regression_loss", "student_contrastive_loss", "teacher_contrastive_loss", "diversity_loss"]
    for name in terms:
        low, full = getattr(out, name), getattr(reference, name)
        assert low.dtype == torch.float32 and torch.isfinite(low), name  # losses are reduced in fp32
        assert abs(low.item() - full.item()) <= 0.02 * abs(full.item()) + 1e-3, (name, low.item(), full.item())
    out.loss.backward()
    grads = [p.grad for p in model.student_parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    model.update_teacher()
    assert all(p.dtype == torch.float32 for p in model.teacher.parameters())


def test_clean_teacher_view_is_untouched_by_augmentation(speech_batch):
    x, mask = speech_batch
    model = Data2VecAQCForPreTraining(tiny_config()).eval()
    fixed = _fixed_inputs(model, x, mask)
    captured = []
    hook = model.teacher.register_forward_pre_hook(lambda m, args, kwargs: captured.append(args[0].clone()),
                                                   with_kwargs=True)
    model(x, mask, **fixed)
    fixed["augmented_input_values"] = x + 0.5 * torch.randn_like(x) * mask
    model(x, mask, **fixed)
    hook.remove()
    assert torch.equal(captured[0], captured[1])
    # and the teacher input is the clean projection, not the augmented one
    from data2vec_aqc_hf.augment import normalize_waveform

    b = model.data2vec_audio
    clean = b.feature_projection.projection(b.feature_projection.layer_norm(
        b.feature_extractor(normalize_waveform(x, mask.bool())).transpose(1, 2)))
    valid = b._get_feature_vector_attention_mask(clean.shape[1], mask)
    assert torch.allclose(captured[0][valid], clean[valid], atol=1e-5)


def test_gradients_reach_student_quantizer_heads_never_teacher(speech_batch):
    x, mask = speech_batch
    model = Data2VecAQCForPreTraining(tiny_config())
    model(x, mask, generator=torch.Generator().manual_seed(0)).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("teacher."):
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    trainable = {id(p) for p in model.student_parameters()}
    assert all(id(p) not in trainable for p in model.teacher.parameters())
    assert len(trainable) == sum(1 for n, _ in model.named_parameters() if not n.startswith("teacher."))


def test_data2vec_objective_skips_aqc_parts(speech_batch):
    x, mask = speech_batch
    model = Data2VecAQCForPreTraining(tiny_config(objective="data2vec"))
    assert not hasattr(model, "quantizer") and not hasattr(model, "augmenter")
    out = model(x, mask, generator=torch.Generator().manual_seed(0))
    assert out.student_contrastive_loss is None and out.diversity_loss is None and out.feature_penalty is None
    assert torch.equal(out.loss, out.regression_loss)


def test_eager_and_sdpa_agree(speech_batch):
    x, mask = speech_batch
    torch.manual_seed(0)
    eager = Data2VecAQCForPreTraining(tiny_config(attn_implementation="eager")).eval()
    sdpa = Data2VecAQCForPreTraining(tiny_config(attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    fixed = _fixed_inputs(eager, x, mask)
    a, b = eager(x, mask, **fixed), sdpa(x, mask, **fixed)
    assert torch.allclose(a.loss, b.loss, rtol=1e-4)
    assert torch.allclose(a.last_hidden_state, b.last_hidden_state, atol=1e-4)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.randn(16000), "rank 1"),
        (torch.randn(0, 16000), "empty batch"),
        (torch.randn(2, 300), "receptive field"),
        (torch.full((1, 16000), float("nan")), "NaN"),
    ],
)
def test_bad_input_gets_clear_value_error(bad, message):
    for model in (Data2VecAQCForPreTraining(tiny_config()), Data2VecAQCForCTC(tiny_config(vocab_size=5))):
        with pytest.raises(ValueError, match=message):
            model(bad)


def test_short_utterance_in_attention_mask_is_reported():
    x = torch.randn(2, 16000)
    mask = torch.ones_like(x, dtype=torch.long)
    mask[1, 200:] = 0
    with pytest.raises(ValueError, match="200 valid samples"):
        Data2VecAQCForPreTraining(tiny_config())(x, mask)


def test_tiny_model_overfits_one_batch_of_real_speech():
    """Loss on one fixed batch of real LibriSpeech audio (fixed masks/augmentation) falls by more than half."""
    torch.manual_seed(0)
    x, mask = real_speech_batch(n=4, seconds=2.0)
    model = Data2VecAQCForPreTraining(tiny_config())
    opt = torch.optim.AdamW(model.student_parameters(), lr=2e-3)
    losses = []
    for step in range(60):
        out = model(x, mask, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_teacher()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-5:]) < 0.5 * losses[0], losses


def test_save_load_round_trip_every_class(tmp_path, speech_batch):
    x, mask = speech_batch
    pre = Data2VecAQCForPreTraining(tiny_config()).eval()
    pre.update_teacher()
    pre.save_pretrained(tmp_path / "pre")
    assert (tmp_path / "pre" / "model.safetensors").exists()
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path / "pre").eval()
    assert isinstance(loaded, Data2VecAQCForPreTraining) and loaded.num_updates.item() == 1
    for (n1, t1), (n2, t2) in zip(pre.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    assert all(not p.requires_grad for p in loaded.teacher.parameters())
    fixed = _fixed_inputs(pre, x, mask)
    assert torch.equal(pre(x, mask, **fixed).loss, loaded(x, mask, **fixed).loss)

    for cls, auto in ((Data2VecAQCModel, AutoModel), (Data2VecAQCForCTC, AutoModelForCTC)):
        model = cls(tiny_config(vocab_size=7)).eval()
        model.save_pretrained(tmp_path / cls.__name__)
        again = auto.from_pretrained(tmp_path / cls.__name__).eval()
        assert type(again) is cls
        ref = model(x, mask)
        got = again(x, mask)
        key = "logits" if cls is Data2VecAQCForCTC else "last_hidden_state"
        assert torch.equal(ref[key], got[key])
    assert AutoConfig.from_pretrained(tmp_path / "pre").model_type == "data2vec-aqc"


def test_ctc_from_pretraining_checkpoint_only_lm_head_new(tmp_path, speech_batch):
    pre = Data2VecAQCForPreTraining(tiny_config())
    pre.save_pretrained(tmp_path)
    ctc, info = AutoModelForCTC.from_pretrained(tmp_path, vocab_size=11, output_loading_info=True)
    assert isinstance(ctc, Data2VecAQCForCTC)
    assert sorted(info["missing_keys"]) == ["lm_head.bias", "lm_head.weight"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, value in pre.data2vec_audio.state_dict().items():
        assert torch.equal(ctc.data2vec_audio.state_dict()[name], value), name
    # and a pretraining model can start from a stock/CTC checkpoint: the teacher starts as the student's copy
    ctc.save_pretrained(tmp_path / "ctc")
    again = Data2VecAQCForPreTraining.from_pretrained(tmp_path / "ctc")
    for name, value in again.teacher.state_dict().items():
        assert torch.equal(value, again.data2vec_audio.encoder.state_dict()[name])


def _run_without_package(code: str, cwd):
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


def test_stock_export_gives_identical_logits_without_package(tmp_path, speech_batch):
    x, mask = speech_batch
    model = Data2VecAQCForCTC(tiny_config(vocab_size=9)).eval()
    save_as_data2vec_audio(model, tmp_path / "stock")
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert config["model_type"] == "data2vec-audio" and "auto_map" not in config
    torch.save({"x": x, "mask": mask}, tmp_path / "inputs.pt")
    with torch.no_grad():
        ours = model(x, mask).logits
    torch.save(ours, tmp_path / "ours.pt")
    out = _run_without_package(f"""
        import torch
        from transformers import AutoModelForCTC
        m = AutoModelForCTC.from_pretrained({str(tmp_path / 'stock')!r}).eval()
        assert type(m).__name__ == "Data2VecAudioForCTC", type(m)
        inp = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        with torch.no_grad():
            logits = m(inp["x"], attention_mask=inp["mask"]).logits
        ours = torch.load({str(tmp_path / 'ours.pt')!r}, weights_only=True)
        print("MAXDIFF", (logits - ours).abs().max().item())
    """, tmp_path)
    assert "MAXDIFF 0.0" in out


def test_trust_remote_code_loads_without_package(tmp_path, speech_batch):
    x, mask = speech_batch
    model = Data2VecAQCForCTC(tiny_config(vocab_size=9)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "AutoModelForCTC" in config["auto_map"]
    assert (tmp_path / "ckpt" / "modeling_data2vec_aqc.py").exists()
    torch.save({"x": x, "mask": mask}, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(model(x, mask).logits, tmp_path / "ours.pt")
    out = _run_without_package(f"""
        import torch
        from transformers import AutoModelForCTC
        m = AutoModelForCTC.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True).eval()
        inp = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        with torch.no_grad():
            logits = m(inp["x"], attention_mask=inp["mask"]).logits
        ours = torch.load({str(tmp_path / 'ours.pt')!r}, weights_only=True)
        print(type(m).__module__, "MAXDIFF", (logits - ours).abs().max().item())
    """, tmp_path)
    assert "MAXDIFF 0.0" in out and "transformers_modules" in out


def test_backbone_is_weight_compatible_with_stock_model(speech_batch):
    x, mask = speech_batch
    ours = Data2VecAQCModel(tiny_config()).eval()
    stock = Data2VecAudioModel(ours.config.to_data2vec_audio_config()).eval()
    stock.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(ours(x, mask).last_hidden_state, stock(x, mask).last_hidden_state)
