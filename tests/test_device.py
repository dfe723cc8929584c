"""The model on an accelerator: the same step on every available device (issue 2, item 6).

Each test runs on the CPU everywhere and on CUDA where a GPU is present (`pytest tests/test_device.py` on a GPU
machine runs both; `scripts/gpu_checks.sh` is the one command for a lent GPU). Values are checked against the
CPU fp32 step with identical inputs, not only for being finite.
"""

import pytest
import torch

from conftest import tiny_config
from data2vec_aqc_hf import Data2VecAQCForCTC, Data2VecAQCForPreTraining
from test_modeling import _fixed_inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TERMS = ["loss", "regression_loss", "student_contrastive_loss", "teacher_contrastive_loss", "diversity_loss",
         "feature_penalty"]


def _on(device, tensors: dict):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in tensors.items()}


@pytest.fixture(autouse=True)
def full_fp32_on_cuda():
    """CUDA runs fp32 convolutions in TF32 by default (errors ~1e-3): the fp32 comparisons here want real fp32."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("device", DEVICES)
def test_step_on_device_matches_cpu_fp32(device, speech_batch):
    """Every loss term and the gradient of the student on `device` equal the CPU step's (same weights, same random
    choices, deterministic quantizer) to float rounding; the teacher gets no gradient there either."""
    x, mask = speech_batch
    torch.manual_seed(0)
    cpu_model = Data2VecAQCForPreTraining(tiny_config()).train()
    fixed = _fixed_inputs(cpu_model, x, mask)
    reference = cpu_model(x, mask, deterministic_quantizer=True, **fixed)
    reference.loss.backward()
    model = Data2VecAQCForPreTraining(tiny_config()).train()
    model.load_state_dict(cpu_model.state_dict())
    model.to(device)
    out = model(x.to(device), mask.to(device), deterministic_quantizer=True, **_on(device, fixed))
    out.loss.backward()
    for name in TERMS:
        got, want = getattr(out, name), getattr(reference, name)
        assert got.device.type == device, name
        assert abs(got.item() - want.item()) <= 1e-4 * abs(want.item()) + 1e-5, (name, got.item(), want.item())
    for (name, p), (_, q) in zip(model.named_parameters(), cpu_model.named_parameters()):
        if name.startswith("teacher."):
            assert p.grad is None, name
        else:
            assert torch.allclose(p.grad.cpu(), q.grad, rtol=1e-3, atol=1e-5), name


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_with_sdpa_on_device(device, speech_batch):
    """Mixed precision as accelerate runs it on `device`, with sdpa attention: every term within 3 % of the fp32
    step, fp32 finite gradients, an EMA teacher that stays fp32 and moves towards the student."""
    x, mask = speech_batch
    model = Data2VecAQCForPreTraining(tiny_config(attn_implementation="sdpa")).train()
    assert model.config._attn_implementation == "sdpa"
    fixed = _on(device, _fixed_inputs(model, x, mask))  # drawn on the CPU with a CPU generator, then moved
    model, x, mask = model.to(device), x.to(device), mask.to(device)
    reference = model(x, mask, deterministic_quantizer=True, **fixed)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(x, mask, deterministic_quantizer=True, **fixed)
    for name in TERMS:
        low, full = getattr(out, name), getattr(reference, name)
        assert low.dtype == torch.float32 and torch.isfinite(low), name
        assert abs(low.item() - full.item()) <= 0.03 * abs(full.item()) + 1e-3, (name, low.item(), full.item())
    out.loss.backward()
    grads = [p.grad for p in model.student_parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    teacher_before = [p.detach().clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.student_parameters():
            p.add_(0.01)  # a stand-in optimizer step, so that the EMA has something to follow
    model.update_teacher()
    moved = [(p - q).abs().max().item() for p, q in zip(model.teacher.parameters(), teacher_before)]
    assert all(p.dtype == torch.float32 and p.device.type == device for p in model.teacher.parameters())
    assert max(moved) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_step_on_device_is_reproducible_and_draws_there(device, speech_batch):
    """A step whose random choices come from one generator on `device` (masks, negatives, augmentation, k-means)
    is reproduced exactly by the same seed, and differs for another seed."""
    x, mask = (t.to(device) for t in speech_batch)
    model = Data2VecAQCForPreTraining(tiny_config()).train().to(device)
    losses = [model(x, mask, generator=torch.Generator(device).manual_seed(s)).loss for s in (3, 3, 4)]
    assert losses[0].device.type == device
    # bit-identical on the CPU; on CUDA the room-impulse scatter_add accumulates atomically, in any order
    assert torch.equal(losses[0], losses[1]) if device == "cpu" else torch.allclose(losses[0], losses[1], rtol=1e-5)
    assert not torch.allclose(losses[0], losses[2], rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (host syncs only exist there)")
def test_training_step_makes_no_host_round_trip(speech_batch, monkeypatch):
    """Issue 2: masking, negatives, augmentation and k-means run on the device with no host round trip. CUDA's sync
    debug mode raises on any device-to-host copy or `.item()` inside the forward and backward. Left out: the input
    check (`validate_input_values`: its one documented sync per step, for a clear error on NaN or too-short audio)
    and sdpa's mask handling in transformers (eager attention here)."""
    import data2vec_aqc_hf.modeling_data2vec_aqc as modeling

    monkeypatch.setattr(modeling, "validate_input_values", lambda *args: None)
    x, mask = (t.cuda() for t in speech_batch)
    model = Data2VecAQCForPreTraining(tiny_config(attn_implementation="eager")).train().cuda()
    generator = torch.Generator("cuda").manual_seed(0)
    model(x, mask, generator=generator).loss.backward()  # warm-up: lazy initialisations may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x, mask, generator=generator).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", DEVICES)
def test_ctc_logits_on_device_match_cpu_with_eager_and_sdpa(device, speech_batch):
    x, mask = speech_batch
    torch.manual_seed(0)
    cpu_model = Data2VecAQCForCTC(tiny_config(vocab_size=12, attn_implementation="eager")).eval()
    with torch.no_grad():
        reference = cpu_model(x, attention_mask=mask).logits
        for attn in ("eager", "sdpa"):
            model = Data2VecAQCForCTC(tiny_config(vocab_size=12, attn_implementation=attn)).eval()
            model.load_state_dict(cpu_model.state_dict())
            logits = model.to(device)(x.to(device), attention_mask=mask.to(device)).logits
            assert logits.device.type == device
            assert torch.allclose(logits.cpu(), reference, atol=1e-4 * reference.abs().max().item()), attn
