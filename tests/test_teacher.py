import torch
import torch.nn.functional as F
from conftest import tiny_config

from data2vec_aqc_hf import Data2VecAQCForPreTraining
from data2vec_aqc_hf.teacher import average_layer_targets, ema_decay, ema_update_, masked_instance_norm


def test_ema_decay_schedule_values():
    assert ema_decay(0, 0.999, 0.9999, 30000).item() == 0.999
    assert abs(ema_decay(15000, 0.999, 0.9999, 30000).item() - 0.99945) < 1e-12
    assert abs(ema_decay(30000, 0.999, 0.9999, 30000).item() - 0.9999) < 1e-12
    assert abs(ema_decay(400000, 0.999, 0.9999, 30000).item() - 0.9999) < 1e-12


def test_ema_update_formula_and_copied_keys():
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t_w, s_w = teacher.weight.detach().clone(), student.weight.detach().clone()
    t_b = teacher.bias.detach().clone()
    ema_update_(teacher, student, 0.9, copy_prefixes=("bias",))
    assert torch.allclose(teacher.weight, 0.9 * t_w + 0.1 * s_w, atol=1e-7)
    assert torch.equal(teacher.bias, student.bias) and not torch.equal(teacher.bias, t_b)


def test_model_update_teacher_moves_layers_copies_pos_conv():
    model = Data2VecAQCForPreTraining(tiny_config())
    student = model.data2vec_audio.encoder
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    tau = model.update_teacher()
    # the authors' k-th update steps the EMA with decay(k) (fairseq set_num_updates(k)): decay(1), not decay(0)
    assert model.num_updates.item() == 1 and tau == float(ema_decay(1, 0.999, 0.9999, 30000)) and tau > 0.999
    assert abs(tau - (0.999 + 0.0009 / 30000)) < 1e-12
    for name, value in model.teacher.state_dict().items():
        if name.startswith("pos_conv_embed."):
            assert torch.equal(value, student.state_dict()[name]), name
        else:
            assert torch.allclose(value, tau * before[name] + (1 - tau) * student.state_dict()[name], atol=1e-6)
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_instance_norm_equals_torch_and_excludes_padding():
    x = torch.randn(2, 30, 8)
    ref = F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(masked_instance_norm(x, None), ref, atol=1e-5)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, 20:] = False
    padded = x.clone()
    padded[1, 20:] = 1000.0  # garbage in padding must not matter
    out = masked_instance_norm(padded, valid)
    ref1 = F.instance_norm(x[1:, :20].transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(out[1:, :20], ref1, atol=1e-5)
    assert torch.all(out[1, 20:] == 0)


def test_targets_equal_reference_from_transformers_layers():
    """Reference: run transformers' encoder with output_hidden_states, recompute each layer's FFN output (before
    the residual add) from its input with the layer's own submodules, instance-norm, average the top K."""
    config = tiny_config(num_hidden_layers=3, num_target_layers=2)
    model = Data2VecAQCForPreTraining(config).eval()
    feats = torch.randn(2, 25, config.hidden_size)
    targets = model.teacher_targets(feats, None)

    teacher = model.teacher
    with torch.no_grad():
        h = teacher.layer_norm(feats + teacher.pos_conv_embed(feats))
        ffn_outputs = []
        for layer in teacher.layers:
            attn, _ = layer.attention(h)
            a = layer.layer_norm(h + attn)
            ffn = layer.feed_forward(a)
            ffn_outputs.append(ffn)
            h = layer.final_layer_norm(a + ffn)
        # h must equal transformers' own encoder output: the reference is built on the same computation
        assert torch.allclose(h, teacher(feats).last_hidden_state, atol=1e-5)
    normed = [F.instance_norm(y.transpose(1, 2)).transpose(1, 2) for y in ffn_outputs[-2:]]
    assert torch.allclose(targets, torch.stack(normed).mean(0), atol=1e-5)
    assert torch.allclose(average_layer_targets(ffn_outputs[-2:], None), targets, atol=1e-5)
