import math

import torch
from transformers import Wav2Vec2Config
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2GumbelVectorQuantizer

from data2vec_aqc_hf.quantizer import (
    GumbelProductQuantizer,
    diversity_loss,
    gumbel_temperature,
    masked_mean_probs,
    perplexity_per_group,
)


def test_eval_mode_matches_transformers_quantizer():
    cfg = Wav2Vec2Config(conv_dim=(32,) * 7, num_codevector_groups=2, num_codevectors_per_group=16,
                         codevector_dim=24)
    torch.manual_seed(0)
    ref = Wav2Vec2GumbelVectorQuantizer(cfg).eval()
    # transformers allocates `codevectors` uninitialised (its PreTrainedModel initialises it); give it values
    torch.nn.init.uniform_(ref.codevectors)
    torch.nn.init.normal_(ref.weight_proj.weight, std=1.0)
    torch.nn.init.zeros_(ref.weight_proj.bias)
    ours = GumbelProductQuantizer(32, 2, 16, 24).eval()
    ours.load_state_dict(ref.state_dict())  # same parameter names and shapes
    x = torch.randn(3, 7, 32)
    mask = torch.rand(3, 7) > 0.3
    ref_codes, _ = ref(x, mask)
    codes, probs = ours(x)
    assert torch.allclose(codes, ref_codes, atol=1e-6)
    # in training mode transformers' perplexity comes from the soft distribution of the masked frames, summed
    # over groups (it does not depend on the Gumbel noise)
    _, ref_ppl = ref.train()(x, mask)
    assert torch.allclose(perplexity_per_group(masked_mean_probs(probs, mask)).sum(), ref_ppl, atol=1e-4)


def test_diversity_loss_bounds():
    groups, entries = 2, 8
    uniform = torch.full((groups, entries), 1.0 / entries)
    assert abs(diversity_loss(uniform).item()) < 1e-5
    single = torch.zeros(groups, entries)
    single[:, 3] = 1.0
    expected_max = (groups * entries - groups) / (groups * entries)
    assert abs(diversity_loss(single).item() - expected_max) < 1e-5
    mixed = torch.softmax(torch.randn(groups, entries), -1)
    assert 0 < diversity_loss(mixed).item() < expected_max


def test_gumbel_temperature_schedule():
    assert gumbel_temperature(0, 2.0, 0.5, 0.999995).item() == 2.0
    assert math.isclose(gumbel_temperature(100_000, 2.0, 0.5, 0.999995).item(), 2.0 * 0.999995**100_000, rel_tol=1e-9)
    # 2 * d**n reaches 0.5 at n = ln(0.25)/ln(d) ~ 277,258 updates, then stays at the minimum
    assert gumbel_temperature(277_000, 2.0, 0.5, 0.999995).item() > 0.5
    assert gumbel_temperature(278_000, 2.0, 0.5, 0.999995).item() == 0.5


def test_training_mode_is_one_hot_straight_through_and_seeded():
    q = GumbelProductQuantizer(16, 2, 8, 12).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    codes1, _ = q(x, temperature=1.0, generator=torch.Generator().manual_seed(0))
    codes2, _ = q(x, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes1, codes2)
    # each group's output is exactly one codebook entry
    book = q.codevectors.view(2, 8, 6)
    for g in range(2):
        part = codes1[..., g * 6 : (g + 1) * 6].reshape(-1, 1, 6)
        assert (torch.isclose(part, book[g][None], atol=1e-6).all(-1).sum(-1) >= 1).all()
    codes1.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # straight-through gradient reaches the input
    det, _ = q(x, deterministic=True)
    ref, _ = q.eval()(x)
    assert torch.equal(det, ref)


def test_perplexity_and_marginal_values_of_known_distributions():
    """exp(entropy) in nats, per group: uniform over k of V codes -> k, one code -> 1, all V -> V; (1/2, 1/4, 1/4)
    -> 2**1.5. The marginal averages only the masked frames."""
    marginal = torch.zeros(4, 16)
    marginal[0, :4] = 0.25
    marginal[1, 5] = 1.0
    marginal[2] = 1.0 / 16
    marginal[3, [0, 7, 9]] = torch.tensor([0.5, 0.25, 0.25])
    assert torch.allclose(perplexity_per_group(marginal), torch.tensor([4.0, 1.0, 16.0, 2**1.5]), atol=1e-4)
    # diversity loss of two groups of 8 codes using 4 and 8 of them: (16 - 12) / 16
    two = torch.zeros(2, 8)
    two[0, :4], two[1] = 0.25, 0.125
    assert abs(diversity_loss(two).item() - 0.25) < 1e-5

    # (batch 2, frames 2, groups 1, entries 2): masked frames are rows (0, 0) and (1, 1) only
    probs = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[0.3, 0.7]], [[0.5, 0.5]]]])
    mask = torch.tensor([[True, False], [False, True]])
    assert torch.allclose(masked_mean_probs(probs, mask), torch.tensor([[0.75, 0.25]]))
    assert torch.allclose(masked_mean_probs(probs, None), torch.tensor([[0.45, 0.55]]))
