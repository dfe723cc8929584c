"""The pretraining loop with accelerate: the library side of `training/pretrain.py`.

A step, top to bottom: the step's random draws (`sample_step_randomness`, with the run's generator) -> forward (the
objective lives in the model; with `--torch_compile` one fullgraph-compiled graph) -> backward -> clip -> optimizer
and scheduler step -> EMA teacher update (advances the temperature/EMA schedules) -> log -> maybe checkpoint.

Before every batch it trains on, each rank votes (`run_control.RankVote`): on a stop request (SIGTERM, SIGINT, the
launcher exiting) all ranks stop together at the update boundary with a checkpoint, and a rank whose share of an
epoch held no usable audio stops every rank with one clear error (instead of leaving the others waiting in DDP).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from .audio import TARGET_SAMPLING_RATE, feature_extractor
from .configuration_data2vec_aqc import SCHEDULE_FIELDS, Data2VecAQCConfig
from .data import (
    DataStats,
    PretrainingStream,
    SkipReport,
    check_usable,
    header_lengths,
    hours,
    iterate_batches,
    load_hub_audio,
    local_items,
)
from .modeling_data2vec_aqc import Data2VecAQCForPreTraining
from .run_control import (
    LOCK_NAME,
    OutputDirLock,
    OutputDirLockedError,
    RankVote,
    StopRequests,
    explained_write_errors,
    folder_bytes,
)
from .schedules import tri_stage_schedule

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class PretrainingArguments:
    """Options of `training/pretrain.py` (flags, or a YAML/JSON file given as the only argument)."""

    output_dir: str = field(default="outputs/pretrain", metadata={"help": "Where checkpoints and the model go."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Run even if another live run holds output_dir's lock (pretraining.lock; two runs would overwrite "
                "each other's checkpoints). A lock left by a dead process is taken over anyway."})
    # model
    model_preset: str = field(default="base", metadata={
        "help": "Config preset: 'base' (the paper's model), 'small' (4.3M, learns on 2 CPU cores) or 'tiny' (tests)."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Start from this checkpoint."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "JSON dict of config fields to change, e.g. '{\"efficient_mode\": true}' for data2vec 2.0's efficient "
                "mode (student on unmasked frames, num_clones masked clones per teacher pass, conv decoder)."})
    objective: str = field(default="aqc", metadata={"help": "'aqc' or 'data2vec' (ablation)."})
    # data
    dataset_name: str | None = field(default=None, metadata={"help": "Hub id, e.g. openslr/librispeech_asr."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub config, e.g. 'all' or 'clean'."})
    train_split_name: str = field(default="train.clean.100+train.clean.360+train.other.500",
                                  metadata={"help": "Split(s), '+'-joined (LibriSpeech 960 h by default)."})
    audio_column_name: str = field(default="audio", metadata={"help": 'Audio column of the Hub dataset.'})
    split_channels: bool = field(default=False, metadata={"help": "Two-channel audio: one example per channel."})
    train_data: str | None = field(default=None, metadata={"help": "Local: audio dir, .csv or fairseq .tsv."})
    noise_dir: str | None = field(default=None, metadata={"help": "Background noise clips (e.g. MUSAN noise)."})
    min_duration_in_seconds: float | None = field(default=None, metadata={"help": (
        "Clips shorter than this are skipped and counted. Default: the shortest clip the model can use, derived from "
        "its config (CNN receptive field and stride, one mask span of mask_time_length frames plus one frame: "
        "0.125 s for the small preset, 0.225 s for base). Paper: 2 s (configs/base_librispeech_960h.yaml sets it).")})
    max_duration_in_seconds: float = field(default=20.0, metadata={"help": 'Longer clips are randomly cropped to this (paper: 20 s = 320000 samples).'})
    max_batch_duration_in_seconds: float = field(default=240.0, metadata={"help": 'Padded audio per batch and device (paper: 3.8 M samples = 237.5 s per GPU).'})
    dataloader_num_workers: int = field(default=0, metadata={"help": 'DataLoader worker processes (0: load in the training process).'})
    # optimisation (data2vec-aqc base recipe)
    learning_rate: float = field(default=5e-4, metadata={"help": 'Peak learning rate of the tri-stage schedule (paper: 5e-4).'})
    adam_beta1: float = field(default=0.9, metadata={"help": 'Adam beta1 (paper: 0.9).'})
    adam_beta2: float = field(default=0.98, metadata={"help": 'Adam beta2 (paper: 0.98).'})
    adam_epsilon: float = field(default=1e-6, metadata={"help": 'Adam epsilon (paper: 1e-6).'})
    weight_decay: float = field(default=0.01, metadata={"help": 'AdamW weight decay (paper: 0.01).'})
    max_grad_norm: float = field(default=10.0, metadata={"help": "Clip the gradient norm to this (0: no clipping; fairseq's data2vec recipe does not clip)."})
    max_nonfinite_updates: int = field(default=10, metadata={
        "help": "An update whose loss or gradient norm is NaN/inf is skipped (weights, optimizer, teacher untouched); "
                "after this many in a row the run stops with an error (default 10)."})
    warmup_ratio: float = field(default=0.03, metadata={"help": 'Share of the run spent warming up linearly (tri-stage; paper: 0.03).'})
    hold_ratio: float = field(default=0.9, metadata={"help": 'Share of the run at the peak learning rate (paper: 0.9).'})
    decay_ratio: float = field(default=0.07, metadata={"help": 'Share of the run decaying to 5 %% of the peak (paper: 0.07).'})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer updates to run; the LR schedule spans them "
                                                         "(default without num_train_epochs: the paper's 400k)."})
    num_train_epochs: int | None = field(default=None, metadata={
        "help": "Stop after this many passes over the data (every rank), or at max_steps if that comes first. Local "
                "data: the schedule length is computed from the file headers; a streamed Hub dataset has no length, "
                "so it also needs --max_steps."})
    stop_after_steps: int | None = field(default=None, metadata={"help": "Stop (and checkpoint) early at this step; "
                                                                         "the schedule still spans max_steps."})
    scale_schedules_to_run: bool = field(default=True, metadata={
        "help": "Size the EMA-decay and Gumbel-temperature schedules to this run's length (the config defaults are "
                "for the paper's 400k updates; identical there). Applies to a model built from --model_preset (fields "
                "set in --config_overrides are kept as given); a loaded "
                "--model_name_or_path keeps the schedules saved in its config. See Data2VecAQCConfig.scale_schedules_to."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches accumulated per optimizer update (to reach the paper's batch on fewer GPUs)."})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16 (the teacher stays fp32; the authors' fairseq runs: fp16)."})
    torch_compile: bool = field(default=False, metadata={
        "help": "Compile the step's forward and loss whole with torch.compile(fullgraph=True). The step's random draws "
                "are made outside the compiled graph, so the losses are the eager step's for the same seed (within "
                "float rounding). Compiling takes minutes at the first batch and once more at the first batch of "
                "another shape (shapes are dynamic from then on)."})
    seed: int = field(default=0, metadata={"help": 'Seed of the model init, the data order and every random draw of a step.'})
    # observability, checkpoints, hub
    logging_steps: int = field(default=10, metadata={"help": 'Log the loss terms and diagnostics every this many updates (tensorboard, progress bar).'})
    save_steps: int = field(default=1000, metadata={"help": 'Write a resumable checkpoint every this many updates.'})
    save_total_limit: int = field(default=3, metadata={"help": 'Keep only the newest this many checkpoints (0: keep all).'})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint dir or 'latest'."})
    push_to_hub: bool = field(default=False, metadata={"help": 'Upload the final model (and model card) to the Hub as --hub_model_id.'})
    hub_model_id: str | None = field(default=None, metadata={"help": 'Hub repo id (user/name) for --push_to_hub.'})
    hub_private_repo: bool | None = field(default=None, metadata={"help": 'Create the Hub repo private.'})
    push_checkpoints: bool = field(default=False, metadata={"help": 'Also upload every checkpoint folder (resumable by others) while training.'})
    report_to: str = field(default="tensorboard", metadata={"help": 'Logger: tensorboard or none.'})

    def __post_init__(self):
        if (self.dataset_name is None) == (self.train_data is None):
            raise ValueError("give exactly one of --dataset_name (Hub) or --train_data (local dir/.csv/.tsv)")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        if self.max_steps <= 0 and self.num_train_epochs is None:
            self.max_steps = 400_000  # the paper's base recipe
        if self.num_train_epochs is not None and self.num_train_epochs < 1:
            raise ValueError(f"num_train_epochs must be >= 1, got {self.num_train_epochs}")
        if self.num_train_epochs is not None and self.max_steps <= 0 and self.dataset_name is not None:
            raise ValueError("--num_train_epochs on a streamed Hub dataset needs --max_steps too: the stream has no "
                             "length to size the learning-rate schedule from")
        if self.min_duration_in_seconds is not None and self.min_duration_in_seconds > self.max_duration_in_seconds:
            raise ValueError("min_duration_in_seconds must be <= max_duration_in_seconds")
        for name in ("logging_steps", "save_steps", "gradient_accumulation_steps", "max_nonfinite_updates"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.max_batch_duration_in_seconds <= 0:
            raise ValueError("--learning_rate and --max_batch_duration_in_seconds must be > 0")


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive updates with a non-finite loss or gradient norm."""


class TrainingState:
    """Step counter, data position and the step's random generator; saved in every checkpoint."""

    def __init__(self, seed: int, device, num_workers: int = 0):
        self.step, self.epoch, self.batches_in_epoch, self.samples_seen = 0, 0, 0, 0
        self.positions = [0] * max(1, num_workers)  # per dataloader worker: where its next batch starts
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def state_dict(self):
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "samples_seen": self.samples_seen, "positions": list(self.positions),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batches_in_epoch, self.samples_seen = int(state["batches_in_epoch"]), int(state["samples_seen"])
        self.generator.set_state(state["generator"])
        self.positions = [int(p) for p in state.get("positions", [])] or None  # None: replay to resume

    def next_epoch(self):
        self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        self.positions = [0] * len(self.positions or [0])


def build_config(args: PretrainingArguments) -> Data2VecAQCConfig:
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    return Data2VecAQCConfig.from_preset(args.model_preset, objective=args.objective, **overrides)


def build_model(args: PretrainingArguments) -> Data2VecAQCForPreTraining:
    if args.model_name_or_path:
        return Data2VecAQCForPreTraining.from_pretrained(args.model_name_or_path)
    return Data2VecAQCForPreTraining(build_config(args))


def build_source(args: PretrainingArguments):
    if args.train_data:
        return local_items(args.train_data), args.train_data
    source = load_hub_audio(args.dataset_name, args.dataset_config_name, args.train_split_name,
                            args.audio_column_name, streaming=True, split_channels=args.split_channels)
    return source, f"{args.dataset_name} [{args.train_split_name}]"


def build_optimizer(model: Data2VecAQCForPreTraining, args: PretrainingArguments):
    """Adam(W) over the student and heads only (never the teacher); no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.startswith("teacher.") or not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith("masked_spec_embed") else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon)


def list_checkpoints(output_dir) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(output_dir, value: str | None) -> Path | None:
    """`--resume_from_checkpoint`: `latest` is the newest *complete and readable* checkpoint (newer broken ones are
    skipped with a warning naming them); an explicit folder must be complete and readable (error naming the file)."""
    if not value:
        return None
    if value == "latest":
        for candidate in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(candidate)
            if problem is None:
                return candidate
            logger.warning(f"skipping {problem}; trying an older checkpoint")
        return None
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint directory")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise RuntimeError(f"--resume_from_checkpoint: {problem}")
    return path


def checkpoint_problem(checkpoint: Path) -> str | None:
    """None when every file a resume reads is present and readable: the weights (safetensors) and every
    pickle-format file (optimizer, RNG states, our per-rank state) with `weights_only=True`; else a message naming
    the first bad file and why. Pickled objects other than tensors and plain data count as bad (they could run
    code)."""
    from accelerate.utils.other import load as weights_only_load
    from safetensors.torch import load_file

    weights = checkpoint / "model.safetensors"
    if not weights.exists():
        return f"{weights}: missing (incomplete checkpoint)"
    try:
        load_file(weights)
    except Exception as error:  # noqa: BLE001 - truncated or corrupt
        return f"{weights}: unreadable ({str(error).strip()[:200] or type(error).__name__})"
    if not rank_state_file(checkpoint, 0).exists():
        return f"{rank_state_file(checkpoint, 0)}: missing (incomplete checkpoint)"
    for path in sorted(checkpoint.glob("*")):
        if path.suffix in (".pkl", ".bin", ".pt") and not path.name.startswith("custom_checkpoint_"):
            try:
                weights_only_load(path, map_location="cpu")
            except Exception as error:  # noqa: BLE001 - any failure means: do not resume from this file
                message = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
                return (f"{path}: refusing to resume from this checkpoint file: it is unreadable or holds pickled "
                        f"objects other than tensors and plain data ({message})")
    return None


def rank_state_file(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / f"training_state_rank{rank}.pt"


def load_checkpoint_safely(accelerator: Accelerator, checkpoint: Path) -> None:
    """`accelerator.load_state` of a checkpoint returned by `resolve_checkpoint` (which has already read every
    pickle-format file with `weights_only=True` and refused anything else, see `checkpoint_problem`); nothing is
    registered for accelerate's `weights_only=False` custom objects."""
    legacy = sorted(checkpoint.glob("custom_checkpoint_*.pkl"))
    if not legacy:
        accelerator.load_state(str(checkpoint))
        return
    # a checkpoint of an older version holds the pickled LR scheduler, which accelerate would unpickle with
    # weights_only=False: load from a view of the folder without it (the scheduler is rebuilt from the step)
    import tempfile

    with tempfile.TemporaryDirectory() as view:
        for path in checkpoint.iterdir():
            if path not in legacy:
                os.symlink(path.resolve(), Path(view) / path.name)
        accelerator.load_state(view)


def advance_scheduler(scheduler, steps: int) -> None:
    """Bring a freshly built LR scheduler to `steps` optimizer updates (it is stepped once per update), instead of
    unpickling its saved state."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
        for _ in range(steps):
            scheduler.step()


def write_model_files(model, folder: Path) -> None:
    """config.json (with `auto_map`), the model code and the feature extractor, so that a checkpoint folder is
    also a model folder: `from_pretrained` (also `trust_remote_code` without this package, e.g. from a pushed
    `checkpoints/checkpoint-N`) reads accelerate's `model.safetensors`, whose keys are `save_pretrained`'s."""
    from transformers.dynamic_module_utils import custom_object_save

    custom_object_save(model, folder, config=model.config)
    model.config.save_pretrained(folder)
    feature_extractor().save_pretrained(folder)


def save_checkpoint(accelerator: Accelerator, output_dir, step: int, keep: int, state: TrainingState,
                    needed_bytes: int = 0, model=None) -> Path:
    """`accelerator.save_state` into a temporary folder renamed into place when complete, so an interrupted or
    failed save never replaces or corrupts the previous checkpoint; only then are the oldest beyond `keep` removed.
    A failed write (disk full: torch says only "basic_ios::clear") raises `CheckpointWriteError` naming the path,
    the free space and the size needed (the previous checkpoint's, else `needed_bytes`)."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    previous = list_checkpoints(output_dir)
    needed = folder_bytes(previous[-1]) if previous else needed_bytes
    with explained_write_errors("checkpoint", final, needed, partial=tmp, kept=previous):
        accelerator.save_state(str(tmp))
        # each rank's own step generator and data position (accelerate saves registered objects from rank 0 only)
        torch.save(state.state_dict(), rank_state_file(tmp, accelerator.process_index))
        if model is not None and accelerator.is_main_process:
            write_model_files(model, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_folder(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def replace_folder(new: Path, final: Path) -> None:
    """Rename `new` to `final`; an existing `final` (a checkpoint of the same step) is moved aside first and removed
    only after the rename, so a crash in between leaves one complete copy."""
    if final.exists():
        aside = final.with_name(f".old-{final.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(new, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(new, final)


def estimate_checkpoint_bytes(model: Data2VecAQCForPreTraining) -> int:
    """Bytes of a checkpoint before the first one exists: the weights (student, heads, teacher) plus AdamW's two
    moments per trained parameter, plus 1 MB for RNG and training states."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = sum(2 * p.numel() * 4 for n, p in model.named_parameters()
                  if p.requires_grad and not n.startswith("teacher."))
    return weights + moments + 2 ** 20


def health_warnings(out, step: int) -> dict[str, str]:
    """Collapse warnings by kind: regression targets or codebook usage that has collapsed."""
    warnings = {}
    if out.target_std is not None and float(out.target_std) < 0.01:
        warnings["target"] = f"step {step}: target std {float(out.target_std):.4f} < 0.01 (representation collapse?)"
    rank = effective_rank(out.last_hidden_state) if out.last_hidden_state is not None else None
    if rank is not None and rank < 10.0:
        warnings["rank"] = (f"step {step}: the student's last hidden state uses {rank:.1f} effective dimensions "
                            f"(dimensional collapse? a teacher that follows the student too closely, see "
                            f"ema_decay_start/end)")
    if out.codebook_perplexity is not None and float(out.codebook_perplexity.min()) < 2.0:
        ppl = [round(v, 2) for v in out.codebook_perplexity.tolist()]
        warnings["codebook"] = f"step {step}: codebook perplexity {ppl} < 2 in a group (codebook collapse?)"
    return warnings


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised squared singular values of `x` `(..., dim)` centred over its rows: how many
    directions the representation really uses (Roy and Vetterli 2007). Instance-normalised targets keep unit
    std per channel even when all channels move together, so `target_std` cannot see this dimensional collapse."""
    rows = x.detach().float().reshape(-1, x.shape[-1])
    singular = torch.linalg.svdvals(rows - rows.mean(0))
    share = singular.square() / singular.square().sum().clamp(min=1e-12)
    return float(torch.exp(-(share * torch.log(share.clamp(min=1e-12))).sum()))


def scalar_logs(out, lr: float) -> dict[str, float]:
    """Every loss term and diagnostic of the output as floats."""
    logs = {}
    if out.last_hidden_state is not None:
        logs["representation_rank"] = effective_rank(out.last_hidden_state)
    for key in ("loss", "regression_loss", "student_contrastive_loss", "teacher_contrastive_loss", "diversity_loss",
                "feature_penalty", "variance_loss", "covariance_loss", "target_std", "prediction_std",
                "gumbel_temperature", "ema_decay", "num_masked_frames"):
        value = getattr(out, key)
        if value is not None:
            logs[key] = float(value.detach()) if torch.is_tensor(value) else float(value)
    if out.codebook_perplexity is not None:
        for g, value in enumerate(out.codebook_perplexity.tolist()):
            logs[f"codebook_perplexity_{g}"] = value
    logs["learning_rate"] = lr
    return logs


DIAGNOSTIC_PANELS = [
    ("loss", ["loss", "regression_loss", "student_contrastive_loss", "teacher_contrastive_loss", "variance_loss",
              "covariance_loss"]),
    ("std over masked frames (collapse -> 0)", ["target_std", "prediction_std"]),
    ("effective rank of the student's output (dimensional collapse -> few)", ["representation_rank"]),
    ("codebook perplexity per group", ["codebook_perplexity_0", "codebook_perplexity_1", "codebook_perplexity_2",
                                       "codebook_perplexity_3"]),
    ("schedules", ["gumbel_temperature", "ema_decay", "learning_rate_relative"]),
]


def plot_history(history: list[dict], path, title: str = "data2vec-aqc pretraining") -> None:
    """Loss terms and the health diagnostics (target/prediction std, codebook perplexity, Gumbel temperature, EMA
    decay, learning rate relative to its peak) against the step, one panel each."""
    from .plots import plot_curves

    peak = max((h.get("learning_rate", 0.0) for h in history), default=0.0) or 1.0
    history = [{**h, "learning_rate_relative": h["learning_rate"] / peak} if "learning_rate" in h else h
               for h in history]
    plot_curves(history, DIAGNOSTIC_PANELS, path, title)


def load_noise_bank(noise_dir: str, max_clips: int = 2000) -> list[torch.Tensor]:
    from .audio import AudioError, load_audio
    from .data import audiofolder_items

    clips = []
    for item in audiofolder_items(noise_dir)[:max_clips]:
        try:
            clips.append(torch.from_numpy(load_audio(item["audio"])))
        except AudioError as err:
            logger.warning("noise bank: skipping %s", err)
    return clips


def epochs_schedule_steps(stream: PretrainingStream, epochs: int, world_size: int, num_workers: int,
                          accumulation: int) -> int:
    """Optimizer updates in `epochs` passes over a local source: the batches of the rank with the most over all
    epochs (the others wait for it, training on their next epoch's first batches), over the accumulation steps."""
    lengths = header_lengths(stream.source)
    per_rank = [sum(stream.batches_per_epoch(lengths, num_workers, epoch, rank) for epoch in range(epochs))
                for rank in range(world_size)]
    return max(1, math.ceil(max(per_rank) / accumulation))


def with_last(iterable):
    """Yield `(item, is_last)`, looking one item ahead."""
    iterator = iter(iterable)
    try:
        item = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield item, False
        item = following
    yield item, True


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGINT/SIGTERM (Ctrl-C reaches the whole process group; a worker
    that died of it would crash the training process before it can checkpoint). They end with the training
    process, which stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def fail_without_usable_audio(vote: RankVote, stats: DataStats, description: str, epoch: int, empty_here: bool,
                              rank: int) -> None:
    """Every rank calls this once some rank's share of an epoch held no usable audio (the vote said so): raise on
    every rank with the counts and skipped files of all ranks."""
    from .data import no_usable_audio_error

    reports = vote.gather({"rank": rank, "epoch": epoch, "empty": empty_here, "loaded": stats.loaded,
                           "skipped": len(stats.skipped), "examples": stats.skipped[:3]})
    raise no_usable_audio_error(reports, description)


def run_pretraining(args: PretrainingArguments) -> dict:
    """Pretrain and return a summary dict (also written to `output_dir/summary.json`). SIGTERM/SIGINT stop the run
    after its current update with a checkpoint: the summary then has `stopped_by` (the signal's name)."""
    with StopRequests() as stops:  # first: a signal during set-up is a stop request too
        set_seed(args.seed)  # before building the model: its initial weights come from the seed
        model = build_model(args)
        # LayerDrop skips layers; the efficient mode never uses the backbone's masked_spec_embed (no mask tokens)
        unused = model.config.layerdrop > 0 or model.config.efficient_mode
        kwargs = [DistributedDataParallelKwargs(find_unused_parameters=unused)]
        accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                logging_dir=str(Path(args.output_dir) / "runs")),
            kwargs_handlers=kwargs,
        )
        vote = RankVote(accelerator.num_processes)
        lock = OutputDirLock(args.output_dir, args.overwrite_output_dir)
        refused = None
        if accelerator.is_main_process:
            try:
                lock.acquire()
            except OutputDirLockedError as error:
                refused = error
        if vote.max(refused is not None)[0]:  # every rank stops, not only the one that holds the lock's answer
            raise refused or OutputDirLockedError(f"{lock.path}: the main process could not lock the output "
                                                  f"directory (its error says why)")
        try:
            return train(args, model, accelerator, vote, stops)
        finally:
            lock.release()


def minimum_clip_samples(min_duration_in_seconds: float | None, config) -> tuple[int, str | None]:
    """The shortest clip (in 16 kHz samples) a run trains on, and a note when a given minimum had to be raised:
    the model's own minimum (`minimum_pretraining_samples`: one mask span plus a frame) when none is given, else
    the given one, raised to the model's (shorter clips would fail in masking)."""
    from .modeling_data2vec_aqc import minimum_pretraining_samples

    needed = minimum_pretraining_samples(config)
    if min_duration_in_seconds is None:
        return needed, None
    given = int(min_duration_in_seconds * TARGET_SAMPLING_RATE)
    if given >= needed:
        return given, None
    return needed, (f"minimum clip length raised from {given / TARGET_SAMPLING_RATE:.3f} s to "
                    f"{needed / TARGET_SAMPLING_RATE:.3f} s: mask spans of {config.mask_time_length} frames need "
                    f"{needed} samples")


def train(args: PretrainingArguments, model, accelerator: Accelerator, vote: RankVote, stops: StopRequests) -> dict:
    """The body of `run_pretraining`, inside its stop handlers and output-directory lock."""
    output_dir = Path(args.output_dir)
    if args.noise_dir and model.config.use_aqc:
        model.augmenter.set_noise_bank(load_noise_bank(args.noise_dir))

    source, description = build_source(args)
    stats = DataStats()
    skip_report = SkipReport(prefix=f"rank {accelerator.process_index}: " if accelerator.num_processes > 1 else "")
    min_samples, note = minimum_clip_samples(args.min_duration_in_seconds, model.config)
    if note:
        accelerator.print(note)
    stream = PretrainingStream(
        source,
        min_samples=min_samples,
        max_samples=int(args.max_duration_in_seconds * TARGET_SAMPLING_RATE),
        max_batch_samples=int(args.max_batch_duration_in_seconds * TARGET_SAMPLING_RATE),
        seed=args.seed, rank=accelerator.process_index, world_size=accelerator.num_processes,
    )
    loader_kwargs = dict(batch_size=None, num_workers=args.dataloader_num_workers,
                         worker_init_fn=ignore_stop_signals if args.dataloader_num_workers else None)
    optimizer = build_optimizer(model, args)
    schedule_steps = args.max_steps
    if schedule_steps <= 0:  # epochs on local data: size the schedule from the file headers
        schedule_steps = epochs_schedule_steps(stream, args.num_train_epochs, accelerator.num_processes,
                                               args.dataloader_num_workers, args.gradient_accumulation_steps)
        accelerator.print(f"{args.num_train_epochs} epoch(s) of {description}: {schedule_steps} updates")
    if args.scale_schedules_to_run and not args.model_name_or_path:
        explicit = set(json.loads(args.config_overrides)) if args.config_overrides else set()
        kept = {k: getattr(model.config, k) for k in explicit & set(SCHEDULE_FIELDS)}
        model.config.scale_schedules_to(schedule_steps)
        for key, value in kept.items():  # values given in --config_overrides are taken as they are
            setattr(model.config, key, value)
        c = model.config
        accelerator.print(f"schedules sized to {schedule_steps} updates: EMA {c.ema_decay_start:.4f} -> "
                          f"{c.ema_decay_end:.5f} over {c.ema_anneal_steps} updates, Gumbel temperature x"
                          f"{c.gumbel_temperature_decay:.6f} per update")
    scheduler = tri_stage_schedule(optimizer, schedule_steps, (args.warmup_ratio, args.hold_ratio, args.decay_ratio))
    # the scheduler is stepped by us once per optimizer update (accelerate's wrapper would step it num_processes
    # times per update); it is not checkpointed (accelerate would pickle it and unpickle it with
    # weights_only=False, i.e. run code from the checkpoint): a resume rebuilds it from the step
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    # the step's draws come in as `randomness` (made eagerly below), so the whole forward is one graph
    forward = torch.compile(model, fullgraph=True) if args.torch_compile else model
    checkpoint_bytes = estimate_checkpoint_bytes(unwrapped)
    state = TrainingState(args.seed + accelerator.process_index, accelerator.device, args.dataloader_num_workers)

    resume = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if resume is not None:
        load_checkpoint_safely(accelerator, resume)
        state_file = rank_state_file(resume, accelerator.process_index)
        if not state_file.exists():
            raise FileNotFoundError(f"{state_file}: missing (was the checkpoint written with another number of processes?)")
        state.load_state_dict(torch.load(state_file, weights_only=True))
        advance_scheduler(scheduler, state.step)
        accelerator.print(f"resumed from {resume} at step {state.step} (epoch {state.epoch}, "
                          f"batch {state.batches_in_epoch})")
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("pretrain", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                      for k, v in asdict(args).items()})

    stop_at = min(args.max_steps if args.max_steps > 0 else math.inf, args.stop_after_steps or math.inf)
    progress = tqdm(total=min(schedule_steps, stop_at), initial=state.step, desc="pretraining", unit="step",
                    disable=not accelerator.is_local_main_process)
    history, last_logs, warned, bad_updates = [], {}, set(), 0
    saved_step, accumulated, stopped = state.step, 0, False  # the newest checkpoint's step; batches since an update
    start_time, start_samples = time.time(), state.samples_seen
    model.train()
    # ranks leave the loop together: on the step limit, a stop request, or when all agree their epochs are done (a
    # rank whose shard ran out first keeps training on its next epoch's batches meanwhile, so DDP's collectives
    # stay matched)
    epochs_done = bool(args.num_train_epochs) and vote.all(state.epoch >= args.num_train_epochs)  # resumed at the end
    while state.step < stop_at and not epochs_done:
        # resuming mid-epoch: start each worker at its saved position (nothing re-read) where that reproduces the
        # uninterrupted order exactly, else replay the consumed batches (read again, not trained on)
        restart = (stream.restart_point(state.epoch, state.positions, state.batches_in_epoch,
                                        args.dataloader_num_workers) if state.batches_in_epoch else None)
        stream.set_epoch(state.epoch, *(restart or ()))
        if restart:
            accelerator.print(f"continuing epoch {state.epoch} at batch {state.batches_in_epoch} from data positions "
                              f"{restart[0]} (nothing re-read)")
        # its own generator: a DataLoader without one draws its base seed from the global RNG at every epoch, which
        # shifts dropout's random stream so that a resumed run would differ from an uninterrupted one
        loader = torch.utils.data.DataLoader(stream, generator=torch.Generator().manual_seed(args.seed + state.epoch),
                                             **loader_kwargs)
        batches_this_epoch = state.batches_in_epoch if restart else 0
        if state.positions is None:
            state.positions = [0] * max(1, args.dataloader_num_workers)
        for batch, last_of_epoch in with_last(iterate_batches(loader, stats, skip_report)):
            position = batch.pop("data_position", None)
            batches_this_epoch += 1
            if batches_this_epoch > state.batches_in_epoch:  # a batch to train on: every rank votes first
                peer_without_data, stop = vote.max(0, stops.requested)
                if peer_without_data:
                    fail_without_usable_audio(vote, stats, description, state.epoch, False, accelerator.process_index)
                if stop and accumulated == 0:  # at an update boundary; this batch is not trained on nor recorded
                    stopped = True
                    break
            if position is not None:
                state.positions[int(position[0])] = int(position[1])
            if batches_this_epoch <= state.batches_in_epoch:  # replaying to the saved data position
                continue
            batch_samples = int(batch["attention_mask"].sum())
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(model):
                # every random draw of the step, from the run's generator (what `generator=` would draw, in order)
                randomness = unwrapped.sample_step_randomness(batch["input_values"], batch.get("attention_mask"),
                                                              state.generator)
                out = forward(**batch, randomness=randomness)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    # the all-reduced gradient norm: the same on every rank, non-finite if any rank's loss was
                    grad_norm = accelerator.clip_grad_norm_(unwrapped.student_parameters(),
                                                            args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
                    finite = bool(torch.isfinite(grad_norm))
                    if finite:
                        optimizer.step()
                        scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch = batches_this_epoch
            state.samples_seen += batch_samples * accelerator.num_processes
            accumulated = 0 if accelerator.sync_gradients else accumulated + 1
            if not accelerator.sync_gradients:
                continue
            if not finite:  # weights, optimizer, schedule and teacher untouched; nothing non-finite is saved
                bad_updates += 1
                logger.warning(f"update {state.step + 1}: non-finite loss ({float(out.loss):.4g}) or gradient norm "
                               f"({float(grad_norm):.4g}); skipped ({bad_updates} in a row)")
                if bad_updates >= args.max_nonfinite_updates:
                    raise NonFiniteTrainingError(
                        f"{bad_updates} consecutive updates had a non-finite loss or gradient norm (last at update "
                        f"{state.step + 1}); stopping. The last checkpoint in {output_dir / 'checkpoints'} holds "
                        f"finite weights; lower --learning_rate (now {args.learning_rate:g}) or check the data")
                continue
            bad_updates = 0
            unwrapped.update_teacher()
            state.step += 1
            progress.update(1)
            epochs_done = bool(args.num_train_epochs) and vote.all(state.epoch + last_of_epoch >= args.num_train_epochs)
            if epochs_done and last_of_epoch:  # this rank's last epoch ended with this batch
                skip_report.end_epoch(state.epoch)
                state.next_epoch()
            if state.step % args.logging_steps == 0 or state.step == stop_at or epochs_done:
                last_logs = scalar_logs(out, scheduler.get_last_lr()[0])
                last_logs["hours_seen"] = hours(state.samples_seen)
                history.append({"step": state.step, **last_logs})
                progress.set_postfix(loss=f"{last_logs['loss']:.3f}")
                if args.report_to != "none":
                    accelerator.log(last_logs, step=state.step)
                for kind, warning in health_warnings(out, state.step).items():
                    if kind not in warned:  # once per kind, the tensorboard curves show the rest
                        warned.add(kind)
                        logger.warning(warning)
            if state.step % args.save_steps == 0 or state.step == stop_at or epochs_done:
                path = save_checkpoint(accelerator, output_dir, state.step, args.save_total_limit, state,
                                       checkpoint_bytes, unwrapped)
                saved_step = state.step
                if args.push_to_hub and args.push_checkpoints and accelerator.is_main_process:
                    from .hub import push_folder

                    push_folder(path, args.hub_model_id, f"checkpoint {state.step}", args.hub_private_repo,
                                path_in_repo=f"checkpoints/{path.name}")
            if state.step >= stop_at or epochs_done:
                break
        else:  # the epoch ended
            if accelerator.num_processes > 1 and batches_this_epoch == 0:  # this rank's share had no usable audio
                vote.max(1, stops.requested)  # matches the other ranks' vote before their next batch
                fail_without_usable_audio(vote, stats, description, state.epoch, True, accelerator.process_index)
            if state.epoch == 0 or batches_this_epoch == 0:
                check_usable(stats, description)
            skip_report.end_epoch(state.epoch)
            state.next_epoch()
            continue
        break
    progress.close()
    skip_report.end_epoch(state.epoch)  # the part of an epoch a run ended in (nothing if it was reported)
    if stopped:
        stop_message = stop_with_checkpoint(accelerator, args, output_dir, state, saved_step, stops, checkpoint_bytes,
                                            unwrapped)
    elapsed = time.time() - start_time
    accelerator.wait_for_everyone()
    summary = {
        "steps": state.step, "epochs_completed": state.epoch, "hours_seen": round(hours(state.samples_seen), 4),
        "audio_seconds_per_second": round((state.samples_seen - start_samples) / TARGET_SAMPLING_RATE
                                          / max(elapsed, 1e-9), 2),
        "world_size": accelerator.num_processes,
        "data": dict(zip(("loaded", "cropped", "skipped"), vote.sum(*stats.as_dict().values()))),  # all ranks
        "final": {k: round(v, 5) for k, v in last_logs.items()},
    }
    if stopped:
        summary["stopped_by"] = stops.reason
    finished = not stopped and ((0 < args.max_steps <= state.step)
                                or bool(args.num_train_epochs and state.epoch >= args.num_train_epochs))
    if finished and accelerator.is_main_process:
        finish(unwrapped, args, summary, history, output_dir, description, checkpoint_bytes)
    elif accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    if stopped:
        accelerator.print(stop_message)
    return summary


def stop_with_checkpoint(accelerator: Accelerator, args: PretrainingArguments, output_dir: Path,
                         state: TrainingState, saved_step: int, stops: StopRequests, checkpoint_bytes: int,
                         model=None) -> str:
    """On a stop request (every rank agreed, at an update boundary): write the checkpoint of this step unless the
    newest one already is; returns the message saying where the run can continue."""
    if state.step > saved_step:
        path = save_checkpoint(accelerator, output_dir, state.step, args.save_total_limit, state, checkpoint_bytes,
                               model)
    elif state.step > 0:
        path = Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{state.step}"
    else:
        return (f"stopped by {stops.reason}{stops.detail} before the first update: nothing to save; "
                f"{output_dir} holds no new checkpoint")
    return (f"stopped by {stops.reason}{stops.detail} after update {state.step}: checkpoint {path} is complete; "
            f"continue with --resume_from_checkpoint latest (same --output_dir)")


def finish(model, args, summary, history, output_dir: Path, description: str, needed_bytes: int = 0) -> None:
    """Save the final model (safetensors + config + feature extractor + card), plot, push. A failed write (disk
    full) names the path and the space; the checkpoints are kept."""
    from .cards import datasets_line, write_card

    with explained_write_errors("the final model", output_dir / "model.safetensors", needed_bytes,
                                kept=list_checkpoints(output_dir)[-1:]):
        model.save_pretrained(output_dir, safe_serialization=True)
    feature_extractor().save_pretrained(output_dir)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if history:
        plot_history(history, output_dir / "loss.png", f"{model.config.objective} pretraining: {description}")
    final = summary["final"]
    write_card(output_dir, "pretrained.md", {
        "model_name": args.hub_model_id or output_dir.name,
        "repo_id": args.hub_model_id or str(output_dir),
        "datasets_line": datasets_line(args.dataset_name),
        "dataset_description": description,
        "objective": model.config.objective,
        "init": pretraining_init_text(args.model_name_or_path, args.model_preset),
        "num_parameters": f"{sum(p.numel() for n, p in model.named_parameters() if not n.startswith('teacher.')):,}",
        "steps": summary["steps"],
        "hours_seen": f"{summary['hours_seen']:.3f}",
        "learning_rate": args.learning_rate,
        "mixed_precision": args.mixed_precision,
        "final_losses": ", ".join(f"{k} {v:.4f}" for k, v in final.items() if "loss" in k) or "n/a",
    })
    if args.push_to_hub:
        from .hub import push_folder

        push_folder(output_dir, args.hub_model_id, f"data2vec-aqc pretraining, {summary['steps']} steps",
                    args.hub_private_repo, ignore_patterns=[LOCK_NAME])


def pretraining_init_text(model_name_or_path: str | None, preset: str) -> str:
    """Where a pretraining run started, for its card: the preset, or the checkpoint it continued (a Hub id as is, a
    local folder by name only: its path means nothing on the Hub)."""
    if not model_name_or_path:
        return f"preset `{preset}`, from a random initialisation"
    if Path(model_name_or_path).exists():
        return f"continued from a local checkpoint (`{Path(model_name_or_path).name}`)"
    return f"continued from [`{model_name_or_path}`](https://huggingface.co/{model_name_or_path})"


def main(argv=None) -> dict:
    """`training/pretrain.py` and `python -m data2vec_aqc_hf.pretraining`: flags or one YAML/JSON file; prints one
    `SUMMARY {json}` line (main process only). A run stopped by a signal (checkpoint written) exits with 128 + the
    signal's number (143 for SIGTERM, 130 for SIGINT), not 0: it has not finished."""
    from accelerate import PartialState

    from .cli import parse_args

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    (args,) = parse_args(PretrainingArguments, argv)
    summary = run_pretraining(args)
    if PartialState().is_main_process:  # one summary line, not one per rank interleaved on a shared pipe
        print("SUMMARY " + json.dumps(summary), flush=True)
    if summary.get("stopped_by"):
        raise SystemExit(128 + int(signal.Signals[summary["stopped_by"]]))
    return summary


if __name__ == "__main__":
    main()
