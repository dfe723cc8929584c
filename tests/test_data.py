import logging
import random
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import DEMO, demo_unlabeled_paths

from data2vec_aqc_hf.audio import AudioError, load_audio, load_audio_crop
from data2vec_aqc_hf.data import (
    DataStats,
    NoUsableAudioError,
    PretrainingStream,
    SkipReport,
    check_usable,
    fairseq_tsv_items,
    iterate_batches,
    load_hub_audio,
    local_items,
    random_crop,
)


def test_load_audio_resamples_8k_fsdd_to_16k():
    path = DEMO / "audio/fsdd/jackson/0_jackson_0.flac"
    raw, sr = sf.read(path, dtype="float32")
    assert sr == 8000
    audio = load_audio(path)
    assert audio.dtype == np.float32 and abs(len(audio) - 2 * len(raw)) <= 2
    # the same signal at twice the rate: every other output sample is (close to) the original sample at that
    # instant, and the energy per second is kept
    inner = slice(64, len(raw) - 64)
    assert np.corrcoef(audio[::2][inner], raw[inner])[0, 1] > 0.999  # a half-sample shift gives 0.98
    assert abs(np.mean(audio**2) / np.mean(raw**2) - 1) < 0.005


def test_resampled_sine_matches_the_analytic_sine_at_16k(tmp_path):
    """A 440 Hz sine written at 8 kHz, loaded: the samples are the same sine evaluated at 16 kHz instants (same
    frequency, phase and amplitude), away from the filter's edge effects; the mean power A**2 / 2 is kept."""
    freq, amp, seconds = 440.0, 0.5, 1.0
    t8 = np.arange(int(8000 * seconds)) / 8000
    sf.write(tmp_path / "sine.wav", (amp * np.sin(2 * np.pi * freq * t8)).astype(np.float32), 8000, subtype="FLOAT")
    audio = load_audio(tmp_path / "sine.wav")
    assert len(audio) == 16000
    expected = amp * np.sin(2 * np.pi * freq * np.arange(16000) / 16000)
    inner = slice(400, 16000 - 400)
    assert np.abs(audio[inner] - expected[inner]).max() < 1e-4  # linear interpolation: 7e-3
    assert abs(np.mean(audio[inner] ** 2) - amp**2 / 2) < 1e-3


@pytest.mark.parametrize("content, message", [(b"not audio at all", "cannot decode"), (None, "file not found")])
def test_load_audio_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AudioError, match=f"bad.wav: {message}"):
        load_audio(path)


def test_silent_and_empty_files_are_errors(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="silent.wav: the audio is silent"):
        load_audio(tmp_path / "silent.wav")
    with pytest.raises(AudioError, match="empty.wav: the audio is empty"):
        load_audio(tmp_path / "empty.wav")


def test_two_channel_audio_yields_each_speaker():
    left, right = np.sin(np.arange(8000) / 5.0), np.cos(np.arange(8000) / 9.0)
    from data2vec_aqc_hf.audio import prepare_audio

    stereo = np.stack([left, right], 1).astype(np.float32)
    a0 = prepare_audio(stereo, 8000, channel=0)
    a1 = prepare_audio(stereo, 8000, channel=1)
    assert len(a0) == len(a1) == 16000
    # each is its own channel at 16 kHz: sin(n / 5) at 8 kHz is sin(m / 10) at 16 kHz, cos(n / 9) is cos(m / 18)
    m, inner = np.arange(16000), slice(400, 16000 - 400)
    assert np.abs(a0[inner] - np.sin(m / 10.0)[inner]).max() < 1e-4
    assert np.abs(a1[inner] - np.cos(m / 18.0)[inner]).max() < 1e-4


def _stream(items, **kw):
    args = dict(min_samples=32000, max_samples=64000, max_batch_samples=192000, seed=0)
    args.update(kw)
    return PretrainingStream(items, **args)


def _batches(stream_or_loader, stats=None):
    """The stream's batches (its per-batch `data_stats` summed into `stats`, skipped files named)."""
    return list(iterate_batches(stream_or_loader, stats if stats is not None else DataStats(), SkipReport()))


@pytest.mark.parametrize("max_samples", [3000, 16000, 64000, 10**7])
def test_crop_decoding_gives_the_crop_of_the_whole_file(tmp_path, max_samples):
    """The pretraining stream decodes only the crop of a 16 kHz integer-sample file: the same samples and length as
    decoding the whole file and cropping it with the same rng; 8 kHz, float and two-channel files decode whole. A
    crop that falls on digital silence decodes the file whole (so a silent file still fails as a file), and gives
    the same silent crop for a file that is not silent."""
    rate = 16000
    silent_middle = np.concatenate([np.sin(np.arange(rate)), np.zeros(3 * rate), np.sin(np.arange(rate))])
    sf.write(tmp_path / "float.wav", 0.1 * np.sin(np.arange(3 * rate) / 7), rate, subtype="FLOAT")
    sf.write(tmp_path / "stereo.flac", 0.1 * np.random.default_rng(0).standard_normal((2 * rate, 2)), rate)
    sf.write(tmp_path / "silent_middle.flac", 0.2 * silent_middle, rate)
    paths = (demo_unlabeled_paths()[:3] + [DEMO / "audio/fsdd/jackson/0_jackson_0.flac"]
             + sorted(tmp_path.glob("*.*")))
    for path in paths:
        for draw in range(3):
            crop, length = load_audio_crop(path, max_samples, random.Random(f"{path}{draw}"))
            whole = load_audio(path)
            assert length == len(whole), path
            np.testing.assert_array_equal(crop, random_crop(whole, max_samples, random.Random(f"{path}{draw}")))
    sf.write(tmp_path / "zeros.flac", np.zeros(3 * rate), rate)
    with pytest.raises(AudioError, match=r"zeros\.flac: the audio is silent \(all samples are zero\)"):
        load_audio_crop(tmp_path / "zeros.flac", 3000, random.Random(0))


def test_batches_bounded_by_total_samples_and_crops():
    items = local_items(DEMO / "unlabeled.csv")
    batches = _batches(_stream(items))
    assert sum(b["input_values"].shape[0] for b in batches) == len(items)
    for b in batches:
        assert b["input_values"].numel() <= 192000 and b["input_values"].shape[1] <= 64000
        lengths = b["attention_mask"].sum(1)
        for row, n in zip(b["input_values"], lengths):  # normalised per utterance, zero padding
            assert abs(row[:n].mean()) < 1e-3 and abs(row[:n].std() - 1) < 1e-2 and torch.all(row[n:] == 0)


def test_sharding_over_ranks_and_workers_covers_each_example_once():
    items = [{"audio": str(p), "channel": None} for p in demo_unlabeled_paths()]
    seen = []
    for rank in range(2):
        stream = _stream(items, rank=rank, world_size=2, max_batch_samples=64000)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        for batch in _batches(loader):
            seen += [round(float(v), 4) for v in batch["input_values"][:, :50].abs().sum(1)]
    assert len(seen) == len(items) and len(set(seen)) == len(items)


def test_batches_per_epoch_predicts_the_stream_without_decoding():
    """The header-based batch count (used to size the LR schedule for --num_train_epochs) equals what the stream
    yields, per rank, per epoch (the shuffle changes), with and without dataloader workers; 8 kHz FSDD files are
    counted at their 16 kHz length and the ones under the minimum are left out, as the stream does."""
    from data2vec_aqc_hf.data import header_lengths

    items = local_items(DEMO / "unlabeled.csv") + local_items(DEMO / "metadata.csv")
    lengths = header_lengths(items)
    assert lengths[-1] == 2 * sf.info(items[-1]["audio"]).frames  # 8 kHz -> 16 kHz
    counts = set()
    logging.disable(logging.WARNING)  # the too-short digits are skipped with a warning each
    try:
        for workers in (0, 2):
            for rank in range(2):
                for epoch in range(2):
                    stream = _stream(items, rank=rank, world_size=2, min_samples=8000, max_samples=48000,
                                     max_batch_samples=96000)
                    stream.set_epoch(epoch)
                    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
                    actual = len(_batches(loader))
                    assert stream.batches_per_epoch(lengths, workers) == actual, (workers, rank, epoch)
                    counts.add(actual)
    finally:
        logging.disable(logging.NOTSET)
    assert len(counts) > 1 and min(counts) > 5  # a real test: several batches, counts differ between shards


@pytest.mark.parametrize("workers", [0, 2])
def test_restart_at_data_position_gives_the_remaining_batches_exactly(workers):
    """Stopping after k batches and restarting from the saved per-worker positions (with the worker rotation) yields
    exactly the batches the uninterrupted epoch would have yielded next: same audio, same crops, same order."""
    items = local_items(DEMO / "metadata.csv")
    make = lambda: _stream(items, rank=1, world_size=2, min_samples=4800, max_samples=12000,  # noqa: E731
                           max_batch_samples=40000)
    stream = make()
    stream.set_epoch(3)
    logging.disable(logging.WARNING)
    try:
        full = _batches(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))
        n = max(1, workers)
        for k in (3, 4):  # both rotations with two workers
            positions = [0] * n
            for b in full[:k]:
                worker, position = b["data_position"].tolist()
                positions[worker] = position
            restarted = make()
            restart = restarted.restart_point(3, positions, k, workers)
            assert restart is not None and restart[1] == k % n
            restarted.set_epoch(3, *restart)
            rest = _batches(torch.utils.data.DataLoader(restarted, batch_size=None, num_workers=workers))
            assert len(rest) == len(full) - k and len(full) > 6
            for a, b in zip(full[k:], rest):
                assert torch.equal(a["input_values"], b["input_values"]) and torch.equal(a["data_position"],
                                                                                         b["data_position"])
    finally:
        logging.disable(logging.NOTSET)
    # a finished worker, another worker count, or a stream source: replay instead
    assert make().restart_point(3, [10**6] * n, 5, workers) is None
    assert make().restart_point(3, [0] * (n + 1), 5, workers) is None


def test_bad_files_are_skipped_with_warning_and_counted(tmp_path, caplog):
    shutil.copy(demo_unlabeled_paths()[0], tmp_path / "good.flac")
    (tmp_path / "broken.wav").write_bytes(b"garbage")
    sf.write(tmp_path / "short.wav", np.random.randn(8000).astype(np.float32), 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    stats = DataStats()
    with caplog.at_level(logging.WARNING):
        batches = _batches(_stream(local_items(tmp_path)), stats)
    assert sum(b["input_values"].shape[0] for b in batches) == 1
    assert stats.loaded == 1 and len(stats.skipped) == 3
    text = caplog.text
    assert "broken.wav" in text and "short.wav" in text and "shorter than the minimum" in text and "empty.wav" in text


def test_counts_reach_the_main_process_from_dataloader_workers(tmp_path):
    """Workers are separate processes: their loaded/skipped counts must travel with the data, or the trainer would
    see 0 loaded files and stop with 'no usable audio' after the first epoch (it did, before this test)."""
    for path in demo_unlabeled_paths()[:3]:
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "broken.wav").write_bytes(b"garbage")
    for workers in (0, 2):
        stats = DataStats()
        loader = torch.utils.data.DataLoader(_stream(local_items(tmp_path), max_batch_samples=64000),
                                             batch_size=None, num_workers=workers)
        logging.disable(logging.WARNING)
        try:
            batches = _batches(loader, stats)
        finally:
            logging.disable(logging.NOTSET)
        assert sum(b["input_values"].shape[0] for b in batches) == 3 and all("data_stats" not in b for b in batches)
        assert (stats.loaded, len(stats.skipped)) == (3, 1), workers
        assert "broken.wav" in stats.skipped[0][0]
        check_usable(stats, str(tmp_path))  # no error


def test_no_usable_audio_is_a_clear_error(tmp_path):
    (tmp_path / "broken.wav").write_bytes(b"garbage")
    stats = DataStats()
    _batches(_stream(local_items(tmp_path)), stats)
    with pytest.raises(NoUsableAudioError, match="no usable audio"):
        check_usable(stats, str(tmp_path))


def test_fairseq_tsv_manifest(tmp_path):
    paths = demo_unlabeled_paths()[:3]
    lines = [str(paths[0].parent.parent)] + [f"{p.parent.name}/{p.name}\t{sf.info(p).frames}" for p in paths]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    items = fairseq_tsv_items(tmp_path / "train.tsv")
    assert [i["audio"] for i in items] == [str(p) for p in paths]
    (tmp_path / "bad.tsv").write_text("/root\nno-tab-here\n")
    with pytest.raises(ValueError, match="bad.tsv:2"):
        fairseq_tsv_items(tmp_path / "bad.tsv")


def _librispeech_parquet(tmp_path, n=4):
    """Local parquet files with the columns of openslr/librispeech_asr (file, audio, text, speaker_id, ...); the two
    splits hold different files (the first `n` and the next `n` demo clips)."""
    import datasets

    audio_struct = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({"file": datasets.Value("string"), "audio": audio_struct,
                                  "text": datasets.Value("string"), "speaker_id": datasets.Value("int64"),
                                  "chapter_id": datasets.Value("int64"), "id": datasets.Value("string")})
    files = {}
    for j, split in enumerate(("train.clean.100", "train.clean.360")):
        rows = {"file": [], "audio": [], "text": [], "speaker_id": [], "chapter_id": [], "id": []}
        for i, p in enumerate(demo_unlabeled_paths()[j * n : (j + 1) * n]):
            rows["file"].append(p.name)
            # the audio column's on-disk layout is Audio's {bytes, path} struct (written without torchcodec)
            rows["audio"].append({"bytes": p.read_bytes(), "path": p.name})
            rows["text"].append("UNKNOWN")
            rows["speaker_id"].append(j * n + i)
            rows["chapter_id"].append(0)
            rows["id"].append(p.stem)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / f"{split}.parquet"))
        files[split] = str(tmp_path / f"{split}.parquet")
    return files


def _utterance_ids(batches, references):
    """Which reference utterance each batch row is: the one of the same length whose normalised samples it holds
    (streams here never crop, and the demo clips all differ in length)."""
    ids = []
    for b in batches:
        for row, n in zip(b["input_values"], b["attention_mask"].sum(1).tolist()):
            matches = [i for i, ref in enumerate(references) if len(ref) == n and np.allclose(row[:n], ref, atol=1e-5)]
            assert len(matches) == 1, (n, matches)
            ids.append(matches[0])
    return ids


def test_hub_streaming_path_on_local_parquet_with_librispeech_schema(tmp_path):
    from data2vec_aqc_hf.data import normalize

    files = _librispeech_parquet(tmp_path)
    paths = demo_unlabeled_paths()[:8]
    references = [normalize(load_audio(p)) for p in paths]
    assert len({len(r) for r in references}) == 8
    ds = load_hub_audio("parquet", None, "train.clean.100+train.clean.360", data_files=files)
    uncropped = dict(max_samples=300000, max_batch_samples=600000, shuffle_buffer=10)
    batches = _batches(torch.utils.data.DataLoader(_stream(ds, **uncropped), batch_size=None))
    assert sorted(_utterance_ids(batches, references)) == list(range(8))  # 4 utterances x 2 splits, each once
    # two ranks of the streamed dataset see disjoint halves that together are the whole dataset
    per_rank = [_utterance_ids(_batches(_stream(ds, rank=r, world_size=2, **uncropped)), references) for r in range(2)]
    assert all(len(ids) == len(set(ids)) == 4 for ids in per_rank), per_rank
    assert not set(per_rank[0]) & set(per_rank[1]), per_rank
    assert set(per_rank[0]) | set(per_rank[1]) == set(range(8)), per_rank


def test_hub_two_channel_switchboard_style_split(tmp_path):
    import datasets

    stereo = np.random.randn(8000 * 3, 2).astype(np.float32) * 0.1
    sf.write(tmp_path / "call.wav", stereo, 8000)
    ds = datasets.Dataset.from_dict({"audio": [{"bytes": (tmp_path / "call.wav").read_bytes(), "path": "call.wav"}]},
                                    features=datasets.Features({"audio": {"bytes": datasets.Value("binary"),
                                                                          "path": datasets.Value("string")}}))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    stream_ds = load_hub_audio("parquet", None, "train", data_files={"train": str(tmp_path / "train.parquet")},
                               split_channels=True)
    examples = list(stream_ds)
    assert [e["channel"] for e in examples] == [0, 1]
    batches = _batches(_stream(stream_ds, shuffle_buffer=4))
    assert sum(b["input_values"].shape[0] for b in batches) == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_files_are_named_once_then_one_line_per_epoch(tmp_path, caplog, num_workers):
    """Each skipped file is named once per run (not again in later epochs, also with dataloader workers, which
    are recreated every epoch), at most five are listed, one line says the rest are counted, and each epoch ends
    with one summary line of its counts; the counts stay complete."""
    shutil.copy(demo_unlabeled_paths()[0], tmp_path / "good.flac")
    for i in range(8):
        sf.write(tmp_path / f"short{i}.wav", np.random.randn(8000).astype(np.float32), 16000)
    stream = _stream(local_items(tmp_path))
    stats, report = DataStats(), SkipReport()
    with caplog.at_level(logging.WARNING):
        for epoch in range(3):
            stream.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
            assert len(list(iterate_batches(loader, stats, report))) == 1
            report.end_epoch(epoch)
    assert len(stats.skipped) == 3 * 8 and stats.loaded == 3  # every skip counted
    lines = [r.getMessage() for r in caplog.records]
    named = [line for line in lines if "short" in line and "shorter than the minimum" in line]
    assert len(named) == 5 and len(set(named)) == 5, lines
    assert lines.count("more files are skipped (counted in the summary, not listed)") == 1
    summaries = [line for line in lines if line.startswith("epoch ")]
    assert summaries == [f"epoch {e}: 8 clip(s) skipped (8 distinct file(s)), 1 loaded" for e in range(3)], lines
    assert len(lines) == 5 + 1 + 3, lines
