"""data2vec 2.0 efficient mode with the AQC losses (spec 8, `efficient.py`): masks, student, decoder, clones, losses,
export. Values, not only shapes."""

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import DEMO, gathered_contrastive_logits, real_speech_batch, tiny_config

from data2vec_aqc_hf import Data2VecAQCForPreTraining
from data2vec_aqc_hf.augment import normalize_waveform
from data2vec_aqc_hf.configuration_data2vec_aqc import AQC_ONLY_FIELDS, Data2VecAQCConfig
from data2vec_aqc_hf.contrastive import cosine_matrix, logits_from_similarity
from data2vec_aqc_hf.efficient import (
    ConvDecoder,
    blocks_kept,
    encode_kept_frames,
    inverse_block_mask,
    kept_frames_budget,
    sample_clone_masks,
)
from data2vec_aqc_hf.masking import compute_span_mask, sample_negative_indices


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on two cores shared with other jobs, two threads were ~5x slower for these small models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def efficient_config(**overrides):
    return tiny_config(efficient_mode=True, **overrides)


def runs(row):
    """(value, length) of the maximal runs of a 1-D bool tensor."""
    out, values = [], row.tolist()
    start = 0
    for t in range(1, len(values) + 1):
        if t == len(values) or values[t] != values[start]:
            out.append((values[start], t - start))
            start = t
    return out


# ----- masking -------------------------------------------------------------------------------------------------------
def test_inverse_block_mask_masks_half_in_whole_blocks_every_placement_equally_likely():
    # 20 frames, prob 0.5, blocks of 5: keep n = 2 non-overlapping blocks (10 frames), mask the other 10. The blocks
    # can sit at C(12, 2) = 66 places (stars and bars: 10 free frames and 2 blocks); each should come up ~1/66.
    rows = 66 * 60
    mask = inverse_block_mask((rows, 20), 0.5, 5, generator=torch.Generator().manual_seed(0))
    assert (mask.sum(1) == 10).all()
    placements = Counter()
    for row in mask:
        kept = [length for masked, length in runs(row) if not masked]
        assert all(length % 5 == 0 for length in kept) and sum(kept) == 10, runs(row)
        placements[tuple((~row).nonzero().flatten().tolist())] += 1
    assert len(placements) == math.comb(12, 2)
    assert min(placements.values()) > 25 and max(placements.values()) < 100  # expected 60 each (sd ~7.7)


def test_inverse_block_mask_with_padding_by_hand():
    lengths = torch.tensor([20, 13, 6, 3])
    mask = inverse_block_mask((4, 20), 0.5, 5, lengths, torch.Generator().manual_seed(1))
    # L=13: round(0.5 * 13 / 5) = 1 block kept, 8 masked; L=6: 1 block (at most (6-1)//5 = 1), 1 masked;
    # L=3: one block clipped to the 3 frames, nothing masked; padded frames never masked
    assert mask.sum(1).tolist() == [10, 8, 1, 0]
    positions = torch.arange(20)
    assert not (mask & (positions[None] >= lengths[:, None])).any()
    assert [blocks_kept(L, 0.5, 5) for L in (20, 13, 6, 3)] == [2, 1, 1, 1]
    assert kept_frames_budget(20, 0.5, 5) == 10
    # the int and tensor forms agree, and the kept count never decreases with the length (the budget's premise)
    Ls = torch.arange(1, 300)
    as_tensor = blocks_kept(Ls, 0.5, 5)
    assert as_tensor.tolist() == [blocks_kept(int(L), 0.5, 5) for L in Ls]
    assert (as_tensor.diff() >= 0).all()


def test_span_kind_is_the_standard_span_mask():
    config = efficient_config(efficient_mask_kind="span")
    lengths = torch.tensor([40, 31])
    got = sample_clone_masks(config, 2, 40, lengths, torch.Generator().manual_seed(3))
    want = compute_span_mask((2, 40), 0.5, 5, lengths, 1, torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_config_validates_and_export_drops_every_efficient_field():
    with pytest.raises(ValueError, match="efficient_mask_kind"):
        tiny_config(efficient_mode=True, efficient_mask_kind="random")
    with pytest.raises(ValueError, match="odd"):
        tiny_config(efficient_mode=True, decoder_kernel=6)
    with pytest.raises(ValueError, match="decoder_groups"):
        tiny_config(efficient_mode=True, decoder_dim=30)
    names = [n for n in Data2VecAQCConfig.__dataclass_fields__ if n.startswith(("efficient_", "decoder_"))]
    assert set(names + ["num_clones"]) <= set(AQC_ONLY_FIELDS)
    stock = efficient_config().to_data2vec_audio_config().to_dict()
    assert not [k for k in stock if k.startswith(("efficient", "decoder_")) or k == "num_clones"]


# ----- the student sees only kept frames -----------------------------------------------------------------------------
def test_student_encodes_only_kept_frames():
    torch.manual_seed(0)
    model = Data2VecAQCForPreTraining(efficient_config(objective="data2vec")).eval()
    encoder = model.data2vec_audio.encoder
    hidden = torch.randn(3, 30, 64)
    keep = ~inverse_block_mask((3, 30), 0.5, 5, torch.tensor([30, 30, 22]), torch.Generator().manual_seed(0))
    keep[2, 22:] = False
    seen = []
    hook = encoder.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    out, slot_valid = encode_kept_frames(encoder, hidden, keep, 15)
    hook.remove()
    assert seen == [torch.Size([3, 15, 64])]  # the transformer's input: 15 kept frames of 30, no mask tokens
    assert slot_valid.sum(1).tolist() == keep.sum(1).tolist() == [15, 15, 10]
    # whatever the masked (and padded) frames hold, the kept frames' outputs are the same
    changed = torch.where(keep[..., None], hidden, 100 * torch.randn_like(hidden))
    out2, _ = encode_kept_frames(encoder, changed, keep, 15)
    assert torch.equal(out[slot_valid], out2[slot_valid])
    # ...while a kept frame's content does change them
    poked = hidden.clone()
    poked[0, keep[0].nonzero()[0, 0]] += 1.0
    assert not torch.allclose(encode_kept_frames(encoder, poked, keep, 15)[0][0], out[0])


def test_model_loss_ignores_what_masked_frames_hold_for_the_student(speech_batch):
    # the student's projected features at frames masked in every clone are replaced by noise (a hook on the
    # projection, which only the student uses): the losses do not move; a change at a kept frame moves them
    x, mask = speech_batch
    torch.manual_seed(0)
    model = Data2VecAQCForPreTraining(efficient_config(objective="data2vec", num_clones=3)).eval()
    frames = int(model.data2vec_audio._get_feat_extract_output_lengths(torch.tensor(x.shape[1])))
    one = inverse_block_mask((4, frames), 0.5, 5, generator=torch.Generator().manual_seed(0))
    clone_masks = one.repeat_interleave(3, 0)  # the same mask for the clones of an utterance
    noise = torch.randn(12, frames, 64) * 0.01
    fixed = {"mask_time_indices": clone_masks, "decoder_mask_noise": noise}

    def loss_with(edit):
        handle = model.data2vec_audio.feature_projection.register_forward_hook(
            lambda module, args, output: (edit(output[0]), output[1]))
        try:
            with torch.no_grad():
                return model(x, attention_mask=mask, **fixed).loss
        finally:
            handle.remove()

    base = loss_with(lambda h: h)
    masked_noise = loss_with(lambda h: torch.where(one[..., None], 50 * torch.randn_like(h), h))
    assert torch.equal(base, masked_noise)
    kept_frame = (~one[0]).nonzero()[0, 0]
    assert not torch.allclose(base, loss_with(lambda h: h.index_add(1, kept_frame[None], torch.ones(4, 1, 64))))


# ----- the decoder ---------------------------------------------------------------------------------------------------
def _reference_decoder(decoder, student_out, keep, noise, frame_valid):
    """The decoder written out with loops: fill, then per layer a grouped convolution as explicit sums over the
    kernel taps and each group's input channels, layer norm over channels (no parameters), exact GELU, residual
    when the widths match, zeroed padding; then the output projection."""
    batch, frames = keep.shape
    filled = torch.zeros(batch, frames, student_out.shape[-1], dtype=torch.float64)
    for b in range(batch):
        slot = 0
        for t in range(frames):
            if not frame_valid[b, t]:
                continue
            if keep[b, t]:
                filled[b, t] = student_out[b, slot].double()
                slot += 1
            else:
                filled[b, t] = noise[b, t].double()
    x = filled
    for conv in decoder.convs:
        w, bias = conv.weight.double(), conv.bias.double()
        out_ch, in_per_group, kernel = w.shape
        groups, half = conv.groups, kernel // 2
        out_per_group = out_ch // groups
        y = torch.zeros(batch, frames, out_ch, dtype=torch.float64)
        for b in range(batch):
            for t in range(frames):
                for o in range(out_ch):
                    g = o // out_per_group
                    acc = bias[o].item()
                    for k in range(kernel):
                        s = t + k - half
                        if 0 <= s < frames:
                            acc += float(w[o, :, k] @ x[b, s, g * in_per_group:(g + 1) * in_per_group])
                    y[b, t, o] = acc
        mean = y.mean(-1, keepdim=True)
        var = y.var(-1, unbiased=False, keepdim=True)
        y = (y - mean) / torch.sqrt(var + 1e-5)
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        if y.shape == x.shape:
            y = y + x
        x = y * frame_valid[..., None].double()
    return x @ decoder.proj.weight.double().T + decoder.proj.bias.double()


@torch.no_grad()
def test_decoder_output_equals_hand_built_reference():
    config = SimpleNamespace(hidden_size=4, decoder_dim=6, decoder_kernel=3, decoder_layers=3, decoder_groups=2,
                             decoder_input_dropout=0.0, decoder_mask_noise_std=0.01)
    torch.manual_seed(0)
    decoder = ConvDecoder(config).eval()
    keep = torch.tensor([[1, 1, 0, 0, 1, 0, 1], [0, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    frame_valid = torch.tensor([[1] * 7, [1] * 5 + [0] * 2], dtype=torch.bool)
    student_out = torch.randn(2, 4, 4)  # row 1 keeps 2 frames: its slots 2, 3 hold nothing (ignored)
    noise = torch.randn(2, 7, 4) * 0.01
    got = decoder(decoder.fill(student_out, keep, frame_valid, noise), frame_valid)
    want = _reference_decoder(decoder, student_out, keep, noise, frame_valid)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()
    # layers 2 and 3 have residuals (6 -> 6 channels), layer 1 not (4 -> 6); padding never reaches a valid frame
    padded_noise = noise.clone()
    padded_noise[1, 5:] = 9.0  # what sits at row 1's padded frames (5, 6) is never read
    again = decoder(decoder.fill(student_out, keep, frame_valid, padded_noise), frame_valid)
    assert torch.equal(again, got)


# ----- clones share one teacher pass ---------------------------------------------------------------------------------
def test_teacher_runs_once_per_utterance_and_targets_repeat_per_clone(speech_batch):
    from data2vec_aqc_hf.modeling_data2vec_aqc import conv_features

    x, mask = speech_batch
    torch.manual_seed(0)
    model = Data2VecAQCForPreTraining(efficient_config(objective="aqc", num_clones=4)).eval()
    teacher_batches, predictions = [], []
    model.teacher.register_forward_hook(lambda module, args, output: teacher_batches.append(args[0].shape[0]))
    model.decoder.register_forward_hook(lambda module, args, output: predictions.append(output))
    with torch.no_grad():
        out = model(x, attention_mask=mask, generator=torch.Generator().manual_seed(0))
    assert teacher_batches == [4]  # one pass, over the 4 utterances (not the 16 clones)
    assert out.mask_time_indices.shape[0] == 16 and out.last_hidden_state.shape[0] == 16

    # the regression loss recomputed from the teacher's targets of each utterance, repeated for its 4 clones
    backbone = model.data2vec_audio
    with torch.no_grad():
        features = conv_features(backbone.feature_extractor, normalize_waveform(x.float(), mask.bool()))
        frame_valid = backbone._get_feature_vector_attention_mask(features.shape[1], mask)
        targets = model.teacher_targets(backbone.feature_projection.projection(
            backbone.feature_projection.layer_norm(features)), frame_valid)
    m = out.mask_time_indices

    def regression(repeated):
        error = (predictions[0] - repeated).square().sum(-1) / math.sqrt(64)
        return (error * m).sum() / m.sum()

    assert torch.allclose(out.regression_loss, regression(targets.repeat_interleave(4, 0)), rtol=1e-5)
    assert not torch.allclose(out.regression_loss, regression(targets.repeat(4, 1, 1)), rtol=1e-3)
    # the clones differ in their masks, and each masks half of its utterance (whole 5-frame blocks kept)
    assert not torch.equal(m[0], m[1])
    full = frame_valid.sum(1)[0].item()
    assert m[0].sum().item() == full - kept_frames_budget(full, 0.5, 5)


# ----- it learns ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["aqc", "data2vec"])
def test_loss_finite_and_falls_over_twenty_updates(objective):
    x, mask = real_speech_batch(n=2, seconds=1.0)
    torch.manual_seed(0)
    model = Data2VecAQCForPreTraining(efficient_config(objective=objective, num_clones=4)).train()
    optimizer = torch.optim.AdamW(model.student_parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        out = model(x, attention_mask=mask, generator=generator)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_teacher()
        losses.append(out.loss.item())
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses


# ----- export --------------------------------------------------------------------------------------------------------
def test_pretrain_script_switches_it_on_and_the_export_is_the_stock_backbone(tmp_path):
    from safetensors.torch import load_file
    from transformers import Data2VecAudioForCTC

    from data2vec_aqc_hf import Data2VecAQCForCTC
    from data2vec_aqc_hf.export import to_data2vec_audio
    from data2vec_aqc_hf.pretraining import PretrainingArguments, run_pretraining

    run_pretraining(PretrainingArguments(
        output_dir=str(tmp_path), model_preset="tiny", train_data=str(DEMO / "unlabeled.csv"),
        config_overrides='{"efficient_mode": true, "num_clones": 2}', max_duration_in_seconds=2,
        max_batch_duration_in_seconds=6, max_steps=1, save_steps=1, report_to="none"))
    saved = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("decoder.convs.") for k in saved) and "final_proj.weight" not in saved
    standard = Data2VecAQCForPreTraining(tiny_config())
    backbone = sorted(k for k in standard.state_dict() if k.startswith("data2vec_audio."))
    assert sorted(k for k in saved if k.startswith("data2vec_audio.")) == backbone  # same backbone names

    ctc, info = Data2VecAQCForCTC.from_pretrained(tmp_path, vocab_size=12, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["lm_head.bias", "lm_head.weight"]  # the decoder is dropped silently
    weights = ctc.state_dict()
    for key in backbone:
        assert torch.equal(weights[key], saved[key]), key
    stock = to_data2vec_audio(ctc)
    assert isinstance(stock, Data2VecAudioForCTC)
    assert sorted(stock.state_dict()) == sorted(Data2VecAudioForCTC(stock.config).state_dict())
    assert not [k for k in stock.state_dict() if k.startswith("decoder")]


def test_draws_up_front_give_the_same_losses_as_the_generator(speech_batch):
    # what a compiled step does: every draw made eagerly (`model.sample_step_randomness`), none inside the forward
    x, mask = speech_batch
    torch.manual_seed(0)
    model = Data2VecAQCForPreTraining(efficient_config(num_clones=3)).train()
    torch.manual_seed(1)  # dropout (the decoder's input dropout) is on the global RNG
    eager = model(x, attention_mask=mask, generator=torch.Generator().manual_seed(5))
    randomness = model.sample_step_randomness(x, mask, torch.Generator().manual_seed(5))
    assert randomness.mask_time_indices.shape[0] == 12 and randomness.gumbel_uniform.shape[0] == 8
    torch.manual_seed(1)
    drawn = model(x, attention_mask=mask, randomness=randomness)
    for key in ("loss", "regression_loss", "student_contrastive_loss", "teacher_contrastive_loss", "diversity_loss"):
        assert torch.equal(getattr(eager, key), getattr(drawn, key)), key
    with pytest.raises(ValueError, match="randomness holds every draw"):
        model(x, attention_mask=mask, randomness=randomness, generator=torch.Generator())


def test_clone_logits_from_the_similarity_matrix_equal_the_gathered_contrastive_logits():
    # 2 utterances x 3 clones; the codes of each utterance shared by its clones, some codes repeated (-> -inf)
    g = torch.Generator().manual_seed(0)
    batch, clones, frames, dim = 2, 3, 12, 8
    codes = torch.randn(batch, frames, dim, generator=g)
    codes[:, 5] = codes[:, 2]  # frames 2 and 5 hold the same code
    anchors = torch.randn(batch * clones, frames, dim, generator=g)
    mask = torch.rand(batch * clones, frames, generator=g) < 0.6
    negatives = sample_negative_indices(mask, 4, g)
    labels = torch.randint(0, 3, (batch, frames), generator=g)
    repeated = codes.repeat_interleave(clones, 0)
    want = gathered_contrastive_logits(anchors, repeated, negatives, 0.1, labels.repeat_interleave(clones, 0), 0.3)
    similarity = cosine_matrix(anchors.view(batch, clones * frames, dim), codes).view(-1, frames, frames) / 0.1
    times = negatives - (torch.arange(batch * clones) * frames)[:, None, None]
    equal = (repeated[:, :, None] == repeated[:, None]).all(-1).gather(2, times)
    got = logits_from_similarity(similarity, times, equal, labels.repeat_interleave(clones, 0), 0.3)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(want).any()
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite], want[finite], atol=1e-5)


@pytest.mark.parametrize("overrides,run_compiled", [({}, True), ({"objective": "data2vec", "layerdrop": 0.2}, False)])
def test_efficient_step_compiles_as_one_graph_with_the_eager_losses(overrides, run_compiled):
    # what `training/pretrain.py --torch_compile` compiles (fullgraph=True), the draws made up front. As
    # tests/test_compile.py: the compiled run uses the `aot_eager` backend (the traced forward and backward graphs run
    # by eager kernels); with inductor (minutes to compile on a CPU) the losses were measured equal once, 11.358927
    # both (tiny AQC). The LayerDrop case (layers drawn as a mask inside the graph) is traced only, for time.
    x, mask = real_speech_batch(n=2, seconds=0.5)
    torch.manual_seed(0)
    model = Data2VecAQCForPreTraining(efficient_config(num_clones=2, **overrides)).train()
    randomness = model.sample_step_randomness(x, mask, torch.Generator().manual_seed(0))
    try:
        if not run_compiled:
            explanation = torch._dynamo.explain(model)(x, attention_mask=mask, randomness=randomness)
            assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
            assert explanation.graph_count == 1
            return
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break would raise
        torch.manual_seed(1)  # dropout comes from the global RNG
        got = compiled(x, attention_mask=mask, randomness=randomness)
        got.loss.backward()
        compiled_grads = [p.grad.clone() for p in model.decoder.parameters()]
        model.zero_grad()
        torch.manual_seed(1)
        want = model(x, attention_mask=mask, randomness=randomness)
        want.loss.backward()
    finally:
        torch._dynamo.reset()
    for key in ("loss", "regression_loss", "student_contrastive_loss", "teacher_contrastive_loss"):
        torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=1e-5, atol=1e-6, msg=key)
    for grad, p in zip(compiled_grads, model.decoder.parameters()):
        torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6)
