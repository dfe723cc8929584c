import json
import re
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_without_package, real_speech_batch, tiny_config
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


def _normalized_view(x, mask):
    """Per-utterance zero mean, unit variance over the valid samples, padding zero (by hand, in float64)."""
    out = torch.zeros_like(x, dtype=torch.float64)
    for i, n in enumerate(mask.sum(1).tolist()):
        row = x[i, :n].double()
        out[i, :n] = (row - row.mean()) / torch.sqrt(row.var(unbiased=False) + 1e-7)
    return out.float()


@torch.no_grad()
def _reference_terms(model, x, mask, fixed):
    """Every term of the objective recomputed without the package's forward: the student and the teacher run as
    stock `Data2VecAudioModel`s (the teacher's FFN outputs recomputed from transformers' `output_hidden_states` with
    each layer's own submodules), the codes come from transformers' `Wav2Vec2GumbelVectorQuantizer`, and the
    contrastive cross-entropies are written out frame by frame. Eval mode: no dropout, arg-max codes."""
    from transformers import Wav2Vec2Config
    from transformers.masking_utils import create_bidirectional_mask
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2GumbelVectorQuantizer

    c = model.config
    stock_config = c.to_data2vec_audio_config()
    student = Data2VecAudioModel(stock_config).eval()
    student.load_state_dict(model.data2vec_audio.state_dict())
    teacher = Data2VecAudioModel(stock_config).eval()
    teacher.load_state_dict(model.data2vec_audio.state_dict())
    teacher.encoder.load_state_dict(model.teacher.state_dict())
    clean, aug = _normalized_view(x, mask), _normalized_view(fixed["augmented_input_values"], mask)
    m = fixed["mask_time_indices"]
    frame_valid = student._get_feature_vector_attention_mask(m.shape[1], mask)
    assert not (m & ~frame_valid).any()
    n = m.sum()

    # student: the augmented view, masked frames replaced by the mask embedding (transformers' own masking)
    student_out = student(aug, mask, mask_time_indices=m).last_hidden_state
    prediction = model.final_proj(student_out)

    # teacher: the clean view, unmasked; FFN output (before the residual add) of each layer from its input
    t_out = teacher(clean, mask, output_hidden_states=True)
    layer_inputs = t_out.hidden_states
    attn_mask = create_bidirectional_mask(config=teacher.config, inputs_embeds=layer_inputs[0],
                                          attention_mask=frame_valid)
    ffn_outputs = []
    for i, layer in enumerate(teacher.encoder.layers):
        h = layer_inputs[i]
        a = layer.layer_norm(h + layer.attention(h, attention_mask=attn_mask)[0])
        ffn = layer.feed_forward(a)
        # the recomputation reproduces transformers' own output of the layer
        assert torch.allclose(layer.final_layer_norm(a + ffn)[frame_valid], layer_inputs[i + 1][frame_valid],
                              atol=1e-5), i
        ffn_outputs.append(ffn)
    assert torch.allclose(layer_inputs[-1], t_out.last_hidden_state)
    normed = []
    for y in ffn_outputs[-c.num_target_layers:]:  # instance norm over each utterance's valid frames
        z = torch.zeros_like(y)
        for b in range(y.shape[0]):
            v = y[b, frame_valid[b]]
            z[b, frame_valid[b]] = (v - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + 1e-5)
        normed.append(z)
    targets = torch.stack(normed).mean(0)

    regression = ((prediction - targets)[m] ** 2).sum() / math.sqrt(c.hidden_size) / n

    def std(y):
        return torch.sqrt(y[m].var(0) + 1e-6).mean()

    terms = dict(regression_loss=regression, target_std=std(targets), prediction_std=std(prediction))
    if not c.use_aqc:
        return terms

    # codes of both views from transformers' quantizer (eval: arg-max), perplexity from its training mode
    qcfg = Wav2Vec2Config(conv_dim=c.conv_dim, num_codevector_groups=c.num_codevector_groups,
                          num_codevectors_per_group=c.num_codevectors_per_group, codevector_dim=c.codevector_dim)
    quantizer = Wav2Vec2GumbelVectorQuantizer(qcfg)
    quantizer.load_state_dict(model.quantizer.state_dict())
    clean_norm = student(clean, mask).extract_features
    aug_norm = student(aug, mask).extract_features
    q_clean = model.project_q(quantizer.eval()(clean_norm)[0])
    q_aug = model.project_q(quantizer.eval()(aug_norm)[0])
    _, perplexity_sum = quantizer.train()(clean_norm, mask_time_indices=m)
    total_codes = c.num_codevector_groups * c.num_codevectors_per_group
    diversity = (total_codes - perplexity_sum) / total_codes

    def contrastive(anchor, codes, negatives, labels):
        flat_codes, flat_labels = codes.reshape(-1, codes.shape[-1]), labels.reshape(-1)
        total = torch.zeros(())
        for b, t in m.nonzero().tolist():
            pos = codes[b, t]
            logits = [F.cosine_similarity(anchor[b, t], pos, dim=0) / c.contrastive_logits_temperature]
            for j in negatives[b, t].tolist():
                logit = F.cosine_similarity(anchor[b, t], flat_codes[j], dim=0) / c.contrastive_logits_temperature
                if flat_labels[j] == labels[b, t]:
                    logit = logit * c.cluster_scale_factor
                if torch.equal(flat_codes[j], pos):
                    logit = torch.tensor(float("-inf"))
                logits.append(logit)
            total = total + F.cross_entropy(torch.stack(logits)[None], torch.tensor([0]))
        return total / n

    negs, labels = fixed["sampled_negative_indices"], fixed["cluster_labels"]
    student_ce = contrastive(model.contr_proj(student_out), q_clean, negs[0], labels[0])
    teacher_ce = contrastive(model.contr_proj(targets), q_aug, negs[1], labels[1])

    features = student.feature_extractor(clean).transpose(1, 2)  # raw CNN features of the clean view
    penalty = features.square().mean(-1)[frame_valid].mean()

    return dict(terms, student_contrastive_loss=student_ce, teacher_contrastive_loss=teacher_ce,
                diversity_loss=diversity, feature_penalty=penalty, perplexity_sum=perplexity_sum)


def test_forward_outputs_and_loss_composition(speech_batch):
    """Each loss term and the total against `_reference_terms` (stock transformers modules, written-out
    cross-entropies), not against the model's own outputs; the weights are the paper's, written here."""
    x, mask = speech_batch
    model = Data2VecAQCForPreTraining(tiny_config()).eval()
    with torch.no_grad():  # a teacher different from the student, as after training has begun
        for p in model.data2vec_audio.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.update_teacher()
    fixed = _fixed_inputs(model, x, mask)
    with torch.no_grad():
        out = model(x, mask, **fixed)
    ref = _reference_terms(model, x, mask, fixed)
    for name in ("regression_loss", "student_contrastive_loss", "teacher_contrastive_loss", "diversity_loss",
                 "feature_penalty"):
        assert torch.allclose(getattr(out, name), ref[name], rtol=1e-4, atol=1e-6), (name, getattr(out, name),
                                                                                     ref[name])
    c = model.config
    assert (c.student_contrastive_weight, c.teacher_contrastive_weight, c.diversity_loss_weight,
            c.feature_penalty_weight) == (0.5, 0.5, 0.1, 10.0)
    expected = (ref["regression_loss"] + 0.5 * ref["student_contrastive_loss"] + 0.5 * ref["teacher_contrastive_loss"]
                + 0.1 * ref["diversity_loss"] + 10.0 * ref["feature_penalty"])
    assert torch.allclose(out.loss, expected, rtol=1e-4), (out.loss, expected)
    assert torch.allclose(out.target_std, ref["target_std"], rtol=1e-4)
    assert torch.allclose(out.prediction_std, ref["prediction_std"], rtol=1e-4)
    # the per-group perplexity, summed, is transformers' perplexity of the clean view's masked frames
    assert out.codebook_perplexity.shape == (2,)
    assert torch.allclose(out.codebook_perplexity.sum(), ref["perplexity_sum"], rtol=1e-4)
    assert abs(out.gumbel_temperature.item() - 2.0 * c.gumbel_temperature_decay) < 1e-6  # after one update
    assert abs(out.ema_decay.item() - (0.999 + 0.0009 / 30000)) < 1e-6  # reported as fp32

    # a generator-driven step: masked frames never fall in padding
    out = model(x, mask, generator=torch.Generator().manual_seed(0))
    frame_valid = model.data2vec_audio._get_feature_vector_attention_mask(out.mask_time_indices.shape[1], mask)
    assert out.mask_time_indices.any() and not (out.mask_time_indices & ~frame_valid).any()
    assert out.num_masked_frames == out.mask_time_indices.sum()


def test_regression_loss_and_stds_match_reference_targets(speech_batch):
    """objective="data2vec": the loss is the regression loss alone, equal to the reference built from transformers'
    encoder (not from `model.teacher_targets`), and so are the target / prediction stds (unbiased std over the
    masked frames per channel, averaged over channels)."""
    x, mask = speech_batch
    model = Data2VecAQCForPreTraining(tiny_config(objective="data2vec")).eval()
    fixed = _fixed_inputs(model, x, mask)
    fixed["augmented_input_values"] = x  # data2vec: the student sees the clean view
    with torch.no_grad():
        out = model(x, mask, mask_time_indices=fixed["mask_time_indices"])
    ref = _reference_terms(model, x, mask, fixed)
    assert torch.allclose(out.regression_loss, ref["regression_loss"], rtol=1e-5)
    assert torch.allclose(out.loss, ref["regression_loss"], rtol=1e-5)
    assert torch.allclose(out.target_std, ref["target_std"], rtol=1e-5)
    assert torch.allclose(out.prediction_std, ref["prediction_std"], rtol=1e-5)


def test_masked_std_by_hand():
    """Unbiased std over the masked frames of the whole batch, per channel, sqrt(var + 1e-6), mean over channels."""
    from data2vec_aqc_hf.modeling_data2vec_aqc import masked_std

    x = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [999.0, 999.0]],
                      [[3.0, 6.0], [-7.0, -7.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # channel 0: (1, 2, 3), variance 1; channel 1: (0, 0, 6), mean 2, variance (4 + 4 + 16) / 2 = 12
    expected = (math.sqrt(1 + 1e-6) + math.sqrt(12 + 1e-6)) / 2
    assert abs(masked_std(x, mask).item() - expected) < 1e-5
    # a collapsed (constant) representation gives sqrt(1e-6), not a positive number of any size
    assert abs(masked_std(torch.full((2, 3, 4), 7.0), mask).item() - 1e-3) < 1e-6


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
    """Loss on one fixed batch of real LibriSpeech audio (fixed masks/augmentation) falls to under a third."""
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
    # measured: 11.6 at the first step, 2.9 on average over the last five (fixed seeds); a single low step is not
    # enough, the mean of the last five must be well below the start
    assert sum(losses[-5:]) / 5 < 0.35 * losses[0], losses


def test_save_load_round_trip_every_class(tmp_path, speech_batch):
    x, mask = speech_batch
    pre = Data2VecAQCForPreTraining(tiny_config()).eval()
    pre.update_teacher()
    pre.save_pretrained(tmp_path / "pre")
    assert (tmp_path / "pre" / "model.safetensors").exists()
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path / "pre").eval()
    assert isinstance(loaded, Data2VecAQCForPreTraining) and loaded.num_updates.item() == 1
    saved, reloaded = pre.state_dict(), loaded.state_dict()
    # same names first (zip would stop silently at the shorter one), then same values and dtypes
    assert set(saved) == set(reloaded), (set(saved) ^ set(reloaded))
    assert any(k.startswith("teacher.") for k in saved) and "num_updates" in saved
    for name, value in saved.items():
        assert value.dtype == reloaded[name].dtype and torch.equal(value, reloaded[name]), name
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
    out = run_without_package(f"""
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
    assert _maxdiff(out) == 0.0


def _maxdiff(out: str) -> float:
    """The number printed after MAXDIFF (a substring check would let "MAXDIFF 0.05" pass)."""
    found = re.findall(r"MAXDIFF (\S+)", out)
    assert len(found) == 1, out
    return float(found[0])


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
    out = run_without_package(f"""
        import torch
        from transformers import AutoModelForCTC
        m = AutoModelForCTC.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True).eval()
        inp = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        with torch.no_grad():
            logits = m(inp["x"], attention_mask=inp["mask"]).logits
        ours = torch.load({str(tmp_path / 'ours.pt')!r}, weights_only=True)
        print(type(m).__module__, "MAXDIFF", (logits - ours).abs().max().item())
    """, tmp_path)
    assert _maxdiff(out) == 0.0 and "transformers_modules" in out


def test_backbone_is_weight_compatible_with_stock_model(speech_batch):
    x, mask = speech_batch
    ours = Data2VecAQCModel(tiny_config()).eval()
    stock = Data2VecAudioModel(ours.config.to_data2vec_audio_config()).eval()
    stock.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(ours(x, mask).last_hidden_state, stock(x, mask).last_hidden_state)


def test_every_auto_class_loads_our_checkpoints_with_remote_code_only(tmp_path):
    """Without this package: AutoModel (embeddings), AutoModelForCTC (start of fine-tuning) and
    AutoModelForPreTraining load a pretraining checkpoint; AutoConfig, AutoModel, AutoModelForCTC and
    AutoModelForPreTraining (a fresh head) a CTC checkpoint."""
    pre = Data2VecAQCForPreTraining(tiny_config())
    pre.save_pretrained(tmp_path / "pre")
    Data2VecAQCForCTC(tiny_config(vocab_size=9)).save_pretrained(tmp_path / "ctc")
    config = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForPreTraining", "AutoModelForCTC"}
    out = run_without_package(f"""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCTC, AutoModelForPreTraining
        pre, ctc = {str(tmp_path / 'pre')!r}, {str(tmp_path / 'ctc')!r}
        x = torch.randn(1, 4000)
        for cls, path, kw in [(AutoModel, pre, {{}}), (AutoModelForCTC, pre, {{"vocab_size": 12}}),
                              (AutoModelForPreTraining, pre, {{}}), (AutoModel, ctc, {{}}), (AutoModelForCTC, ctc, {{}}),
                              (AutoModelForPreTraining, ctc, {{}})]:
            m = cls.from_pretrained(path, trust_remote_code=True, **kw).eval()
            print("LOADED", cls.__name__, type(m).__name__, type(m).__module__.startswith("transformers_modules"))
        for path in (pre, ctc):
            c = AutoConfig.from_pretrained(path, trust_remote_code=True)
            print("CONFIG", type(c).__name__, type(c).__module__.startswith("transformers_modules"))
        print("HIDDEN", tuple(AutoModel.from_pretrained(pre, trust_remote_code=True)(x).last_hidden_state.shape))
    """, tmp_path)
    loaded = [line.split()[1:] for line in out.splitlines() if line.startswith("LOADED")]
    assert loaded == [["AutoModel", "Data2VecAQCModel", "True"], ["AutoModelForCTC", "Data2VecAQCForCTC", "True"],
                      ["AutoModelForPreTraining", "Data2VecAQCForPreTraining", "True"],
                      ["AutoModel", "Data2VecAQCModel", "True"], ["AutoModelForCTC", "Data2VecAQCForCTC", "True"],
                      ["AutoModelForPreTraining", "Data2VecAQCForPreTraining", "True"]], out
    assert [line.split()[1:] for line in out.splitlines() if line.startswith("CONFIG")] == \
        [["Data2VecAQCConfig", "True"]] * 2, out
    assert "HIDDEN (1, 12, 64)" in out


def test_variance_covariance_terms_hand_computed_and_padding_excluded():
    from data2vec_aqc_hf.contrastive import variance_covariance_terms

    # two valid frames (0, 0) and (1, 1), one padded frame of garbage: channel variance (unbiased) 0.5 each,
    # std sqrt(0.5 + 1e-4); covariance between the channels 0.5, squared twice (both off-diagonal entries) / dim 2
    hidden = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [50.0, -80.0]]])
    valid = torch.tensor([[True, True, False]])
    variance, covariance = variance_covariance_terms(hidden, valid)
    assert abs(variance.item() - (1.0 - math.sqrt(0.5 + 1e-4))) < 1e-6
    assert abs(covariance.item() - 0.25) < 1e-6
    # decorrelated channels of std > 1: both terms vanish (the corners of a square of side 4)
    square = torch.tensor([[[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]]])
    variance, covariance = variance_covariance_terms(square)
    assert variance.item() == 0.0 and abs(covariance.item()) < 1e-9
    # a collapsed (rank-1) representation is penalised by both
    collapsed = torch.randn(1, 64, 1) * torch.ones(1, 1, 8) * 0.3
    variance, covariance = variance_covariance_terms(collapsed)
    assert variance.item() > 0.5 and covariance.item() > 0.01


def test_variance_covariance_weights_add_exactly_their_terms_to_the_loss(speech_batch):
    """Off by default (not part of the method); with weights set, the loss grows by exactly the weighted terms of
    the student's last hidden state, and the other loss terms of the same step are unchanged."""
    from data2vec_aqc_hf.contrastive import variance_covariance_terms

    x, mask = speech_batch
    plain = Data2VecAQCForPreTraining(tiny_config()).train()
    fixed = _fixed_inputs(plain, x, mask)
    torch.manual_seed(0)
    a = plain(x, mask, deterministic_quantizer=True, **fixed)
    assert a.variance_loss is None and a.covariance_loss is None
    regularised = Data2VecAQCForPreTraining(tiny_config(variance_loss_weight=2.0, covariance_loss_weight=0.5)).train()
    regularised.load_state_dict(plain.state_dict())
    torch.manual_seed(0)
    b = regularised(x, mask, deterministic_quantizer=True, **fixed)
    frame_valid = plain.data2vec_audio._get_feature_vector_attention_mask(b.last_hidden_state.shape[1], mask)
    variance, covariance = variance_covariance_terms(b.last_hidden_state, frame_valid)
    assert torch.allclose(b.variance_loss, variance) and torch.allclose(b.covariance_loss, covariance)
    assert variance.item() > 0 and covariance.item() > 0
    assert torch.allclose(b.regression_loss, a.regression_loss)
    assert torch.allclose(b.loss, a.loss + 2.0 * variance + 0.5 * covariance, atol=1e-5)
    with pytest.raises(ValueError, match="standard mode only"):
        tiny_config(variance_loss_weight=1.0, efficient_mode=True)
