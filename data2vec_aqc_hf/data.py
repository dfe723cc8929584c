"""Pretraining data: sources (Hub streaming, audiofolder directory, CSV manifest, fairseq .tsv), random crops and
batches bounded by total audio samples, sharded across processes and dataloader workers.

Every source becomes a stream of examples `{"audio": <path | {"bytes", "path"}>, "channel": int | None}` that the
package's one audio loader (`audio.load_audio_example`) decodes to mono 16 kHz. Unusable files (unreadable, empty,
silent or constant, too short) are skipped with a warning naming the file and counted in `DataStats`, and so is a
random crop that falls on digital silence (it would normalise to an all-zero input).
"""

from __future__ import annotations

import csv
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import (
    TARGET_SAMPLING_RATE,
    AudioError,
    load_audio_crop,
    load_audio_example,
    resampled_length,
    window_start,
    with_file_name,
)

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".flac", ".wav", ".mp3", ".ogg", ".opus", ".sph", ".aiff", ".aif")

# Hub ids that need per-dataset defaults
LIBRISPEECH = "openslr/librispeech_asr"
LIBRISPEECH_960H = ("train.clean.100", "train.clean.360", "train.other.500")


class NoUsableAudioError(RuntimeError):
    """The dataset produced no usable audio at all."""


# ----- local sources ---------------------------------------------------------------------------------------------
def audiofolder_items(directory: str | Path) -> list[dict]:
    """Every audio file under `directory` (recursively, sorted), the layout of `datasets`' audiofolder."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{directory}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found")
    return [{"audio": str(p), "channel": None} for p in files]


def csv_manifest_items(manifest: str | Path, path_column: str = "file_name") -> list[dict]:
    """A CSV with a `file_name` column (paths relative to the CSV's folder, or absolute)."""
    manifest = Path(manifest)
    with open(manifest, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a BOM (Excel) is not part of a column name
        reader = csv.DictReader(f)
        if path_column not in (reader.fieldnames or []):
            raise ValueError(f"{manifest}: no {path_column!r} column (columns: {reader.fieldnames})")
        rows = list(reader)
    return [{"audio": str(manifest.parent / r[path_column]), "channel": None} for r in rows]


def fairseq_tsv_items(manifest: str | Path) -> list[dict]:
    """A fairseq manifest: first line the root folder, then `relative_path<TAB>num_samples` per line."""
    manifest = Path(manifest)
    lines = manifest.read_text().splitlines()
    if not lines:
        raise ValueError(f"{manifest}: empty fairseq manifest (expected a root line, then path<TAB>num_samples)")
    root = Path(lines[0].strip())
    if not root.is_absolute():
        root = manifest.parent / root
    items = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[1].strip().isdigit():
            raise ValueError(f"{manifest}:{number}: expected 'path<TAB>num_samples', got {line!r}")
        items.append({"audio": str(root / parts[0]), "channel": None})
    return items


def local_items(path: str | Path) -> list[dict]:
    """Items of a local corpus: a directory (audiofolder), a `.csv` manifest or a fairseq `.tsv` manifest."""
    path = Path(path)
    if path.is_dir():
        return audiofolder_items(path)
    if path.suffix == ".csv":
        return csv_manifest_items(path)
    if path.suffix == ".tsv":
        return fairseq_tsv_items(path)
    raise ValueError(f"{path}: expected a directory, a .csv manifest or a fairseq .tsv manifest")


# ----- Hub sources -----------------------------------------------------------------------------------------------
def load_hub_audio(
    dataset_name: str,
    config_name: str | None = None,
    splits: str | list[str] = "train",
    audio_column: str = "audio",
    streaming: bool = True,
    split_channels: bool = False,
    **load_kwargs,
):
    """A streamed Hub dataset (LibriSpeech, Switchboard, ...) as `{"audio", "channel"}` examples.

    `splits` may combine several with `+` (e.g. `"train.clean.100+train.clean.360+train.other.500"` is
    LibriSpeech 960 h). Audio is not decoded by `datasets` (`Audio(decode=False)`): the package's loader does it,
    so no torchcodec/ffmpeg is needed. With `split_channels=True` (two-channel telephone audio such as
    Switchboard, one speaker per channel) each recording yields one example per channel.
    `load_kwargs` go to `datasets.load_dataset` (e.g. `data_files` for a local dataset of the same schema)."""
    import datasets

    if isinstance(splits, str):
        splits = [s for s in splits.split("+") if s]
    parts = []
    for split in splits:
        ds = datasets.load_dataset(dataset_name, config_name, split=split, streaming=streaming, **load_kwargs)
        if audio_column not in ds.column_names:
            raise ValueError(f"{dataset_name} [{split}]: no audio column {audio_column!r} (columns: {ds.column_names})")
        ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
        ds = ds.select_columns([audio_column])
        if audio_column != "audio":
            ds = ds.rename_column(audio_column, "audio")
        parts.append(ds)
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    channels = [0, 1] if split_channels else [None]

    def expand(batch):
        audio = [a for a in batch["audio"] for _ in channels]
        return {"audio": audio, "channel": channels * len(batch["audio"])}

    return ds.map(expand, batched=True, remove_columns=["audio"])


# ----- crops, batches, sharding ---------------------------------------------------------------------------------
@dataclass
class DataStats:
    """Counts of what the stream saw; `skipped` lists `(file, reason)` of the unusable files."""

    loaded: int = 0
    cropped: int = 0
    skipped: list = field(default_factory=list)

    def as_dict(self):
        return {"loaded": self.loaded, "cropped": self.cropped, "skipped": len(self.skipped)}

    def merge(self, other: DataStats) -> None:
        self.loaded, self.cropped = self.loaded + other.loaded, self.cropped + other.cropped
        self.skipped += other.skipped

    def __bool__(self) -> bool:
        return bool(self.loaded or self.cropped or self.skipped)


def random_crop(audio: np.ndarray, max_samples: int, rng: random.Random) -> np.ndarray:
    """A uniformly placed window of at most `max_samples`."""
    start = window_start(len(audio), max_samples, rng)
    return audio[start : start + max_samples]


def normalize(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (as `Wav2Vec2FeatureExtractor(do_normalize=True)`)."""
    return ((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)).astype(np.float32)


def collate_audio(waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Zero-pad to the longest; `attention_mask` marks real samples."""
    lengths = np.array([len(w) for w in waves])
    input_values = np.zeros((len(waves), lengths.max()), dtype=np.float32)
    for i, w in enumerate(waves):
        input_values[i, : len(w)] = w
    attention_mask = (np.arange(lengths.max())[None] < lengths[:, None]).astype(np.int64)
    return {"input_values": torch.from_numpy(input_values), "attention_mask": torch.from_numpy(attention_mask)}


class PretrainingStream(torch.utils.data.IterableDataset):
    """Batches for pretraining, from a list of local items or a (streamed) Hub dataset.

    * rank `r` of `world_size` takes every `world_size`-th example, and dataloader worker `w` of `n` every `n`-th of
      those (a Hub stream is split with `datasets.distributed.split_dataset_by_node`), so each example of an epoch
      goes to exactly one place;
    * examples are shuffled per epoch (seed + epoch), cropped at random to `max_samples`, those shorter than
      `min_samples` are skipped (counted as too short);
    * a batch holds as many utterances as fit in `max_batch_samples` padded samples.
    Iteration is deterministic given (seed, epoch, rank, worker), which is what makes resuming exact. For a list
    source each batch also carries `"data_position"` = (worker, position in that worker's order where the next batch
    starts), and each crop is seeded by its example, so `set_epoch(epoch, positions, rotation)` can restart mid-epoch
    without reading the consumed audio again (`rotation` maps dataloader worker `j` to the stream's worker
    `(j + rotation) % n`, so the dataloader's round-robin continues where it was).

    Each yielded dict carries `"data_stats"`, the `DataStats` of what was read since the previous one (dataloader
    workers are separate processes, so counts travel with the data); after the last batch a dict with only
    `"data_stats"` may follow. Consume through `iterate_batches(loader, stats)`, which sums them and yields batches.
    """

    def __init__(self, source, min_samples: int, max_samples: int, max_batch_samples: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000):
        super().__init__()
        if max_batch_samples < max_samples:
            raise ValueError(f"max_batch_samples={max_batch_samples} must be >= max_samples={max_samples}")
        self.source, self.min_samples, self.max_samples = source, min_samples, max_samples
        self.max_batch_samples, self.seed, self.rank, self.world_size = max_batch_samples, seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.epoch, self.positions, self.rotation = 0, None, 0

    def set_epoch(self, epoch: int, positions: list[int] | None = None, rotation: int = 0) -> None:
        """Iterate epoch `epoch`; with `positions` (one per worker, list sources only), start each worker there."""
        if positions is not None and not isinstance(self.source, list):
            raise TypeError("starting at data positions needs a list source; a stream is replayed instead")
        self.epoch, self.positions, self.rotation = epoch, positions, rotation

    def restart_point(self, epoch: int, positions: list[int] | None, batches_consumed: int,
                      num_workers: int) -> tuple[list[int], int] | None:
        """`(positions, rotation)` to continue epoch `epoch` after `batches_consumed` batches without re-reading
        them, or None where that would not reproduce the uninterrupted order (a stream source, a different worker
        count, or a worker already finished: the dataloader's round-robin then skips it), so the caller replays."""
        workers = max(1, num_workers)
        if not isinstance(self.source, list) or positions is None or len(positions) != workers:
            return None
        lengths = [len(self._local_order(w, workers, epoch)) for w in range(workers)]
        if any(p >= n for p, n in zip(positions, lengths)):
            return None
        return list(positions), batches_consumed % workers

    def _local_order(self, worker: int, num_workers: int, epoch: int | None = None,
                     rank: int | None = None) -> list[int]:
        """Indices into a list source that a rank (default: this one) and worker read in an epoch (default: the
        current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        rank = self.rank if rank is None else rank
        order = list(range(len(self.source)))
        random.Random(self.seed + epoch).shuffle(order)
        return order[rank :: self.world_size][worker::num_workers]

    def _examples(self, worker: int, num_workers: int) -> Iterator[tuple[int, dict, random.Random | None]]:
        """`(position, example, crop rng)`: list sources seed each crop by the example (position-independent, so a
        restart mid-epoch gives the same crops); streams use one rng per worker."""
        if isinstance(self.source, list):
            order = self._local_order(worker, num_workers)
            start = self.positions[worker] if self.positions else 0
            for position in range(start, len(order)):
                index = order[position]
                yield position, self.source[index], random.Random(f"{self.seed}-{self.epoch}-{index}")
        else:  # a datasets IterableDataset: datasets splits it over workers itself
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(self.source, rank=self.rank, world_size=self.world_size)
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            ds.set_epoch(self.epoch)
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
            for position, example in enumerate(ds):
                yield position, example, rng

    def _closes_batch(self, pending_longest: int, pending_count: int, new_length: int) -> bool:
        """Whether the pending utterances form a batch before one of `new_length` samples joins (padded size)."""
        return pending_count > 0 and max(pending_longest, new_length) * (pending_count + 1) > self.max_batch_samples

    def batches_per_epoch(self, lengths: list[int], num_workers: int = 0, epoch: int | None = None,
                          rank: int | None = None) -> int:
        """How many batches a rank (default: this one) yields in an epoch (default: the current one) from a list
        source whose 16 kHz lengths are `lengths`
        (e.g. from `header_lengths`): the same order, minimum length and batching rule as `__iter__`, computed
        without decoding. Files whose content turns out unusable (silent, NaN) make the real count smaller."""
        if not isinstance(self.source, list):
            raise TypeError("batches_per_epoch needs a list source (a streamed Hub dataset has no known length)")
        total = 0
        for worker in range(max(1, num_workers)):
            longest = count = 0
            for i in self._local_order(worker, max(1, num_workers), epoch, rank):
                if lengths[i] < max(self.min_samples, 1):
                    continue
                crop = min(lengths[i], self.max_samples)
                if self._closes_batch(longest, count, crop):
                    total, longest, count = total + 1, 0, 0
                longest, count = max(longest, crop), count + 1
            total += count > 0
        return total

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (physical + self.rotation) % num_workers
        listed = isinstance(self.source, list)
        pending: list[np.ndarray] = []
        stats = DataStats()

        def batch(next_position):
            out = {**collate_audio(pending), "data_stats": stats}
            if listed:
                out["data_position"] = torch.tensor([worker, next_position])
            return out

        position = -1
        for position, example, rng in self._examples(worker, num_workers):
            name = example["audio"] if isinstance(example["audio"], str) else (example["audio"] or {}).get("path")
            try:
                if isinstance(example["audio"], str) and example.get("channel") is None:  # a local file
                    crop, length = load_audio_crop(example["audio"], self.max_samples, rng)
                else:
                    audio = load_audio_example(example, "audio", channel=example.get("channel"))
                    crop, length = random_crop(audio, self.max_samples, rng), len(audio)
            except AudioError as err:
                self._skip(stats, name, str(err))
                continue
            if length < self.min_samples:
                self._skip(stats, name, f"{length / TARGET_SAMPLING_RATE:.2f} s is shorter than the minimum "
                                        f"{self.min_samples / TARGET_SAMPLING_RATE:.2f} s")
                continue
            if not np.ptp(crop):  # digital silence: normalising gives an all-zero input, which trains on nothing
                self._skip(stats, name, f"{name}: a {len(crop) / TARGET_SAMPLING_RATE:.2f} s random crop of it is "
                                        f"silent (every sample {float(crop[0]):g}); skipped this time")
                continue
            stats.loaded += 1
            if length > self.max_samples:
                stats.cropped += 1
            crop = normalize(crop)
            if self._closes_batch(max((len(w) for w in pending), default=0), len(pending), len(crop)):
                yield batch(position)  # the next batch starts with this example
                pending, stats = [], DataStats()
            pending.append(crop)
        if pending:
            yield batch(position + 1)
        elif stats:
            yield {"data_stats": stats}

    def _skip(self, stats: DataStats, name, reason):
        """Count a skipped file. Nothing is logged here: dataloader workers are recreated every epoch and would
        name the same files again; `SkipReport`, in the process that consumes the batches, names them."""
        stats.skipped.append((name, reason))


class SkipReport:
    """Says what the stream skipped, from the process that consumes its batches (where the counts of every
    dataloader worker arrive): the first `max_listed` distinct files are named once per run with their reason,
    then one line says the rest are counted, and `end_epoch` gives one summary line per epoch that skipped any."""

    def __init__(self, max_listed: int = 5, prefix: str = ""):
        self.max_listed, self.prefix = max_listed, prefix
        self.named: set = set()
        self.said_more = False
        self.epoch_loaded, self.epoch_skipped, self.epoch_files = 0, 0, set()

    def add(self, stats: DataStats) -> None:
        self.epoch_loaded += stats.loaded
        self.epoch_skipped += len(stats.skipped)
        for name, reason in stats.skipped:
            self.epoch_files.add(name)
            if name in self.named:
                continue
            if len(self.named) < self.max_listed:
                self.named.add(name)
                logger.warning("%sskipping %s", self.prefix, with_file_name(name, reason))
            elif not self.said_more:
                self.said_more = True
                logger.warning("%smore files are skipped (counted in the summary, not listed)", self.prefix)

    def end_epoch(self, epoch: int) -> None:
        if self.epoch_skipped:
            logger.warning("%sepoch %d: %d clip(s) skipped (%d distinct file(s)), %d loaded", self.prefix, epoch,
                           self.epoch_skipped, len(self.epoch_files), self.epoch_loaded)
        self.epoch_loaded, self.epoch_skipped, self.epoch_files = 0, 0, set()


def iterate_batches(batches, stats: DataStats, report: SkipReport | None = None):
    """The batches of a `PretrainingStream` (or a DataLoader over one), with their `data_stats` summed into `stats`
    (and passed to `report`, which names skipped files)."""
    for item in batches:
        item_stats = item.pop("data_stats")
        stats.merge(item_stats)
        if report is not None:
            report.add(item_stats)
        if "input_values" in item:
            yield item


def check_usable(stats: DataStats, source_description: str) -> None:
    """Stop with a clear error when an epoch yielded no usable audio."""
    if stats.loaded == 0:
        examples = "; ".join(f"{n}: {r}" for n, r in stats.skipped[:3])
        raise NoUsableAudioError(
            f"{source_description}: no usable audio ({len(stats.skipped)} file(s) skipped{': ' + examples if examples else ''})"
        )


def no_usable_audio_error(reports: list[dict], source_description: str) -> NoUsableAudioError:
    """The error when some process's share of an epoch held no usable audio, from every process's report
    (`rank`, `epoch`, `empty`, `loaded` and `skipped` counts so far, `examples` of skipped files): each process
    reads only its own share of the files, so every one needs at least one usable file."""
    loaded, skipped = sum(r["loaded"] for r in reports), sum(r["skipped"] for r in reports)
    examples = "; ".join(f"{n}: {r}" if n and str(n) not in r else r
                         for report in reports for n, r in report["examples"])
    examples = f": {examples}" if examples else ""
    if loaded == 0:
        return NoUsableAudioError(f"{source_description}: no usable audio ({skipped} file(s) skipped over all "
                                  f"{len(reports)} processes{examples})")
    empty = ", ".join(f"{r['rank']} (epoch {r['epoch']})" for r in reports if r["empty"])
    return NoUsableAudioError(
        f"{source_description}: process(es) {empty} of {len(reports)} found no usable audio in their share of the "
        f"data (all processes so far: {loaded} file(s) loaded, {skipped} skipped{examples}). Each process reads "
        f"its own share of the files and needs at least one usable file: with fewer usable files than processes, "
        f"use fewer processes (accelerate launch --num_processes) or more data")


def hours(num_samples: float) -> float:
    return num_samples / TARGET_SAMPLING_RATE / 3600.0


def header_lengths(items: list[dict]) -> list[int]:
    """16 kHz lengths of local items from their file headers (no decoding); 0 for a file that cannot be opened."""
    import soundfile as sf

    lengths = []
    for item in items:
        try:
            info = sf.info(item["audio"])
        except (sf.LibsndfileError, RuntimeError, OSError):
            lengths.append(0)
            continue
        lengths.append(resampled_length(info.frames, info.samplerate))
    return lengths
