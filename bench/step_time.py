"""Pretraining step time: data2vec-aqc (ours) against transformers' own pretraining code, same device, same batch.

    python bench/step_time.py --preset tiny                         # CPU smoke run, seconds
    python bench/step_time.py --preset base --dtype bf16 --steps 20  # on a GPU
    python bench/step_time.py --preset base --batch_size 2 --seconds 4 --compile --threads 1 \
        --contenders w2v2-hf,d2v-aqc,d2v-plain,w2v2-hf+compile,d2v-aqc+compile,d2v-plain+compile   # CPU, compiled

Each contender does the full optimizer step the way its training script does it, on the same real speech batch:
* `w2v2-hf`: `Wav2Vec2ForPreTraining` as `run_wav2vec2_pretraining_no_trainer.py` drives it: masks and negatives from
  transformers' numpy helpers on the host, copied to the device, forward (contrastive + diversity), backward, AdamW,
  Gumbel temperature update. Same width/depth as our preset.
* `d2v-aqc`: `Data2VecAQCForPreTraining` (student + EMA teacher + augmentation + quantizer + clustering), backward,
  AdamW, `update_teacher()`; masks/negatives/augmentation on the device.
* `d2v-plain`: ours with `objective="data2vec"` (the AQC parts off), the data2vec baseline.
* `d2v-aqc-eff`, `d2v-plain-eff`: the same two with `efficient_mode=True` (data2vec 2.0: the student encodes only
  unmasked frames of `num_clones` masked clones per utterance, one teacher pass per utterance, a conv decoder).
* `backbone`: a stock `Data2VecAudioModel` forward + backward of the student alone: the floor any method pays.
Prints ms/step, audio-seconds per second, achieved GFLOP/s (torch's FlopCounterMode count of one eager step:
matmuls and convolutions), student views per second (a view = one masked student copy of one
utterance: `batch` per step in the standard mode, `batch x num_clones` in the efficient mode) and ratios against
`w2v2-hf` and, for the efficient contenders, the views/s ratio against their standard mode, all measured in this run;
writes JSON and a PNG. The contenders' steps are interleaved (one step of each in turn, `--steps` rounds), so a
change in the machine's load over the run hits all of them alike; the median of the rounds is reported.
fairseq is not installable here (no wheels for this Python/torch); its numbers are not measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data2vec_aqc_hf import Data2VecAQCConfig, Data2VecAQCForPreTraining
from data2vec_aqc_hf.audio import load_audio
from data2vec_aqc_hf.data import local_items, normalize


def speech_batch(batch_size: int, seconds: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Real LibriSpeech speech (shared corpus if present, else the vendored clips), cropped to `seconds`."""
    shared = ROOT.parent / "shared" / "speech_corpus"
    files = sorted((shared / "unlabeled").rglob("*.flac")) if shared.exists() else []
    files = files or [Path(i["audio"]) for i in local_items(ROOT / "data/demo/unlabeled.csv")]
    length = int(seconds * 16000)
    waves = []
    for path in files:
        audio = load_audio(path)
        if len(audio) >= length:
            waves.append(normalize(audio[:length]))
        if len(waves) == batch_size:
            break
    if not waves:
        raise SystemExit(f"no utterance of at least {seconds} s found; lower --seconds")
    waves += [waves[i % len(waves)] for i in range(batch_size - len(waves))]  # too few long files: repeat
    x = torch.from_numpy(np.stack(waves)).to(device)
    return x, torch.ones_like(x, dtype=torch.long)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps_interleaved(steps: dict, rounds: int, warmup: int, device) -> dict[str, list[float]]:
    """Wall time of each step function, one step of each contender in turn per round (after `warmup` of each)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def count_flops(steps: dict) -> dict[str, int]:
    """FLOPs of one step of each (eager) contender, forward + backward + optimizer, by torch's FlopCounterMode
    (matmuls and convolutions; elementwise work is not counted). One extra, untimed step each."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for name, step in steps.items():
        with FlopCounterMode(display=False) as counter:
            step()
        counts[name] = counter.get_total_flops()
    return counts


def ours_step(config: Data2VecAQCConfig, x, mask, device, autocast, compiled: bool = False):
    """As `training/pretrain.py` does it: the step's draws from `sample_step_randomness`, then the forward
    (`torch.compile(fullgraph=True)` with `compiled`: the whole forward + loss is one graph)."""
    model = Data2VecAQCForPreTraining(config).to(device).train()
    optimizer = torch.optim.AdamW(model.student_parameters(), lr=5e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    forward = torch.compile(model, fullgraph=True) if compiled else model

    def step():
        randomness = model.sample_step_randomness(x, mask, generator)
        with autocast():
            out = forward(x, attention_mask=mask, randomness=randomness)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher()

    return step, sum(p.numel() for p in model.student_parameters())


def hf_wav2vec2_step(config: Data2VecAQCConfig, x, mask, device, autocast, compiled: bool = False):
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    w2v = Wav2Vec2Config(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        conv_dim=config.conv_dim, conv_stride=config.conv_stride, conv_kernel=config.conv_kernel,
        num_conv_pos_embeddings=config.num_conv_pos_embeddings, feat_extract_norm="layer", do_stable_layer_norm=False,
        mask_time_prob=config.mask_time_prob, mask_time_length=config.mask_time_length,
        num_codevector_groups=config.num_codevector_groups, num_codevectors_per_group=config.num_codevectors_per_group,
        codevector_dim=config.codevector_dim, proj_codevector_dim=config.proj_codevector_dim,
        num_negatives=config.num_negatives, layerdrop=0.0, attn_implementation=config._attn_implementation,
    )
    model = Wav2Vec2ForPreTraining(w2v).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    forward = torch.compile(model) if compiled else model  # transformers' model may break the graph: not fullgraph
    num_updates = [0]

    def step():
        # the collator of transformers' pretraining script: numpy on the host, then to the device
        frames = int(model._get_feat_extract_output_lengths(torch.tensor(x.shape[1])))
        shape = (x.shape[0], frames)
        sub_mask = model._get_feature_vector_attention_mask(frames, mask.cpu())
        mask_time = _compute_mask_indices(shape, w2v.mask_time_prob, w2v.mask_time_length, attention_mask=sub_mask,
                                          min_masks=2)
        negatives = _sample_negative_indices(shape, w2v.num_negatives, mask_time_indices=mask_time)
        mask_time = torch.tensor(mask_time, dtype=torch.bool, device=device)
        negatives = torch.tensor(negatives, dtype=torch.long, device=device)
        with autocast():
            out = forward(x, attention_mask=mask, mask_time_indices=mask_time, sampled_negative_indices=negatives)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        num_updates[0] += 1
        model.set_gumbel_temperature(max(2.0 * 0.999995 ** num_updates[0], 0.5))

    return step, sum(p.numel() for p in model.parameters())


def backbone_step(config: Data2VecAQCConfig, x, mask, device, autocast):
    from transformers import Data2VecAudioModel

    model = Data2VecAudioModel(config.to_data2vec_audio_config()).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)

    def step():
        with autocast():
            hidden = model(x, attention_mask=mask).last_hidden_state
        hidden.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="audio per utterance")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast (GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=str(ROOT / "outputs/bench"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; on cores shared with other jobs 1 is often faster)")
    parser.add_argument("--num_clones", type=int, default=None,
                        help="clones per utterance of the efficient contenders (default: the config's, 8)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each contender under torch.compile (`<name>+compile`; ours with "
                             "fullgraph=True); the first compiled steps, which build the graph, are warm-up")
    parser.add_argument("--contenders", default=None,
                        help="comma-separated subset of: w2v2-hf, d2v-aqc, d2v-plain, d2v-aqc-eff, d2v-plain-eff, "
                             "backbone (default: all)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    x, mask = speech_batch(args.batch_size, args.seconds, device)
    audio_seconds = args.batch_size * args.seconds
    def preset(**overrides):
        return Data2VecAQCConfig.from_preset(args.preset, layerdrop=0.0, **overrides)

    config = preset()
    efficient = dict(efficient_mode=True, **({"num_clones": args.num_clones} if args.num_clones else {}))
    clones = preset(**efficient).num_clones
    contenders = {  # name: (build, student views per step, the standard contender its views/s is compared with)
        "w2v2-hf": (lambda **kw: hf_wav2vec2_step(config, x, mask, device, autocast, **kw), args.batch_size, None),
        "d2v-aqc": (lambda **kw: ours_step(config, x, mask, device, autocast, **kw), args.batch_size, None),
        "d2v-plain": (lambda **kw: ours_step(preset(objective="data2vec"), x, mask, device, autocast, **kw),
                      args.batch_size, None),
        "d2v-aqc-eff": (lambda **kw: ours_step(preset(**efficient), x, mask, device, autocast, **kw),
                        args.batch_size * clones, "d2v-aqc"),
        "d2v-plain-eff": (lambda **kw: ours_step(preset(objective="data2vec", **efficient), x, mask, device,
                                                 autocast, **kw), args.batch_size * clones, "d2v-plain"),
        "backbone": (lambda: backbone_step(config, x, mask, device, autocast), args.batch_size, None),
    }
    if args.compile:  # the compiled twin of each (not the backbone floor); its ratios compare with the eager ones
        for key, (build, views, standard) in list(contenders.items()):
            if key != "backbone":
                contenders[f"{key}+compile"] = (
                    lambda build=build: build(compiled=True), views, standard and f"{standard}+compile")
    if args.contenders:
        wanted = args.contenders.split(",")
        unknown = sorted(set(wanted) - set(contenders))
        if unknown:
            raise SystemExit(f"unknown contenders {unknown}; choose from {list(contenders)}")
        contenders = {name: contenders[name] for name in wanted}
    steps, params = {}, {}
    for name, (build, _, _) in contenders.items():
        steps[name], params[name] = build()
    flops = count_flops({name: step for name, step in steps.items() if not name.endswith("+compile")})
    times = time_steps_interleaved(steps, args.steps, args.warmup, device)
    results = {}
    for name, (_, views, _) in contenders.items():
        median = statistics.median(times[name])
        step_flops = flops.get(name.removesuffix("+compile"))  # compiling does not change the arithmetic
        results[name] = {"ms_per_step": 1000 * median, "ms_min": 1000 * min(times[name]),
                         "gflop_per_step": step_flops / 1e9 if step_flops else None,
                         "achieved_gflop_s": step_flops / 1e9 / median if step_flops else None,
                         "audio_s_per_s": audio_seconds / median, "views_per_step": views,
                         "views_per_s": views / median, "params": params[name],
                         "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}

    base = results["w2v2-hf"]["ms_per_step"] if "w2v2-hf" in results else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"{args.preset} preset, batch {args.batch_size} x {args.seconds} s, {args.dtype}, {name}, "
          f"median of {args.steps} interleaved rounds after {args.warmup} warm-up, {clones} clones in efficient mode")
    compiled_base = results["w2v2-hf+compile"]["ms_per_step"] if "w2v2-hf+compile" in results else None
    print(f"{'':22s} {'ms/step':>9s} {'audio s/s':>10s} {'views/s':>8s} {'x w2v2-hf time':>15s} "
          + (f"{'x w2v2+compile':>15s} " if compiled_base else "") + f"{'views/s vs std':>15s} {'params':>12s} "
          f"{'GFLOP/step':>11s} {'GFLOP/s':>8s}")
    for key, r in results.items():
        r["time_ratio_vs_w2v2_hf"] = r["ms_per_step"] / base if base else None
        r["time_ratio_vs_w2v2_hf_compiled"] = r["ms_per_step"] / compiled_base if compiled_base else None
        standard = contenders[key][2]
        r["views_ratio_vs_standard"] = (r["views_per_s"] / results[standard]["views_per_s"]
                                        if standard in results else None)
        time_ratio = f"{r['time_ratio_vs_w2v2_hf']:15.2f}" if base else f"{'-':>15s}"
        compiled_ratio = f"{r['time_ratio_vs_w2v2_hf_compiled']:15.2f} " if compiled_base else ""
        views_ratio = (f"{r['views_ratio_vs_standard']:15.2f}" if r["views_ratio_vs_standard"] is not None
                       else f"{'-':>15s}")
        print(f"{key:22s} {r['ms_per_step']:9.1f} {r['audio_s_per_s']:10.1f} {r['views_per_s']:8.2f} {time_ratio} "
              f"{compiled_ratio}{views_ratio} {r['params']:12,d} {r['gflop_per_step'] or 0:11.1f} "
              f"{r['achieved_gflop_s'] or 0:8.1f}")

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"step_time_{args.preset}_{args.dtype}_{device.type}" + ("_compile" if args.compile else "")
    (out / f"{tag}.json").write_text(json.dumps({"args": vars(args), "device": name, "results": results}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    colors = [f"C{i}" if key != "w2v2-hf" else "gray" for i, key in enumerate(results)]
    for ax, key, label in zip(axes, ("audio_s_per_s", "views_per_s"),
                              ("audio seconds / second", "student views / second")):
        ax.bar(list(results), [r[key] for r in results.values()], color=colors)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"pretraining throughput, {args.preset}, {args.dtype}, {name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{tag}.png", dpi=120)
    print(f"wrote {out / tag}.json and .png")
    return results


if __name__ == "__main__":
    main()
