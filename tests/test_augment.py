import torch
from conftest import tiny_config

from data2vec_aqc_hf.augment import (
    WaveformAugmenter,
    add_white_noise,
    coloured_noise,
    crop_noise_bank,
    mix_at_snr,
    normalize_waveform,
    reverberate,
    synthetic_rir,
)


def _power_db(x):
    return 10 * torch.log10(x.square().mean(-1))


def test_normalize_matches_feature_extractor_and_keeps_padding_zero(speech_batch):
    from transformers import Wav2Vec2FeatureExtractor

    x, mask = speech_batch
    out = normalize_waveform(x, mask.bool())
    fe = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    n = int(mask[-1].sum())
    ref = fe(x[-1, :n].numpy(), sampling_rate=16000, return_tensors="pt").input_values[0]
    assert torch.allclose(out[-1, :n], ref, atol=1e-4)
    assert torch.all(out[-1, n:] == 0)


def test_background_noise_hits_requested_snr_within_half_db(speech_batch):
    x, mask = speech_batch
    valid = mask.bool()
    g = torch.Generator().manual_seed(0)
    noise = coloured_noise(x.shape, torch.tensor([0.0, 1.0, 2.0, 1.0]), g)
    snr = torch.tensor([0.0, 5.0, 10.0, 15.0])
    mixed = mix_at_snr(x, noise, valid.float(), snr)
    for b in range(4):
        n = int(mask[b].sum())
        clean, added = x[b, :n], (mixed - x)[b, :n]
        measured = 10 * torch.log10(clean.square().mean() / added.square().mean())
        assert abs(measured.item() - snr[b].item()) < 0.5
        assert torch.all(mixed[b, n:] == 0)


def test_augmenter_with_only_background_noise_hits_integer_snr_in_range(speech_batch):
    x, mask = speech_batch
    config = tiny_config(aug_white_noise_prob=0.0, aug_reverb_prob=0.0, aug_background_prob=1.0,
                         aug_background_snr_db=(7, 7))
    out = WaveformAugmenter(config)(x, mask.bool(), torch.Generator().manual_seed(1))
    for b in range(4):
        n = int(mask[b].sum())
        measured = 10 * torch.log10(x[b, :n].square().mean() / (out - x)[b, :n].square().mean())
        assert abs(measured.item() - 7.0) < 0.5
        assert torch.all(out[b, n:] == 0)


def test_white_noise_std_is_fraction_of_utterance_std():
    x = torch.randn(3, 48000) * torch.tensor([[0.1], [1.0], [3.0]])
    valid = torch.ones_like(x)
    out = add_white_noise(x, valid, (0.5, 0.5), torch.Generator().manual_seed(2))
    ratio = (out - x).std(-1) / x.std(-1)
    assert torch.allclose(ratio, torch.full((3,), 0.5), atol=0.01)


def test_reverb_keeps_level_padding_and_is_causal():
    x = torch.zeros(2, 16000)
    x[:, 4000] = 1.0
    x[1, 12000:] = 0
    valid = torch.ones_like(x)
    valid[1, 12000:] = 0
    rir = synthetic_rir(torch.tensor([0.3, 0.8]), 16000, 16000, torch.Generator().manual_seed(3))
    assert torch.all(rir[:, 0] == 1.0)
    wet = reverberate(x, valid, rir)
    assert wet[:, :4000].abs().max() < 1e-6  # nothing before the impulse (FFT round-off only)
    assert torch.all(wet[1, 12000:] == 0)  # padding stays zero
    assert torch.allclose(wet.square().sum(-1) / valid.sum(-1), x.square().sum(-1) / valid.sum(-1), rtol=1e-4)
    # a longer RT60 leaves more energy late in the response
    late = rir[:, 8000:].square().sum(-1) / rir.square().sum(-1)
    assert late[1] > late[0]


def test_coloured_noise_slopes():
    g = torch.Generator().manual_seed(4)
    noise = coloured_noise((3, 65536), torch.tensor([0.0, 1.0, 2.0]), g)
    spec = torch.fft.rfft(noise).abs().square()
    low, high = spec[:, 100:1000].mean(-1), spec[:, 10000:20000].mean(-1)
    ratio_db = 10 * torch.log10(low / high)
    assert abs(ratio_db[0]) < 1.0  # white: flat
    assert ratio_db[1] > 10 and ratio_db[2] > ratio_db[1] + 10  # pink, then brown, fall with frequency


def test_noise_bank_crop_and_zero_pad():
    bank = torch.stack([torch.arange(1, 11).float(), torch.cat([torch.arange(1, 4).float(), torch.zeros(7)])])
    lengths = torch.tensor([10, 3])
    out = crop_noise_bank(bank, lengths, 5, 64, torch.Generator().manual_seed(5))
    for row in out:
        nz = row[row != 0]
        assert torch.all(nz[1:] - nz[:-1] == 1)  # a contiguous crop
        if nz.max() <= 3 and len(nz) == 3:
            assert torch.all(row[3:] == 0)  # the short clip is zero-padded


def test_augmenter_reproducible_and_input_untouched(speech_batch):
    x, mask = speech_batch
    x0 = x.clone()
    aug = WaveformAugmenter(tiny_config())
    a = aug(x, mask.bool(), torch.Generator().manual_seed(6))
    b = aug(x, mask.bool(), torch.Generator().manual_seed(6))
    c = aug(x, mask.bool(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, x0)
    assert torch.all(a[mask == 0] == 0)
