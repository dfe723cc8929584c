"""Convert the authors' fairseq checkpoints to transformers: `data2vec-aqc-convert` / `python -m
data2vec_aqc_hf.convert`.

* a data2vec-aqc (or plain data2vec v1) **pretraining** checkpoint (`cfg.model._name == "data2vec_audio"`) ->
  `Data2VecAQCForPreTraining`: student, EMA teacher (`_ema`), quantizer, `project_q`, `final_proj`, `contr_proj`,
  `num_updates`; pretraining continues from it with `training/pretrain.py --model_name_or_path`;
* a **fine-tuned** `wav2vec_ctc` checkpoint -> a stock transformers `Data2VecAudioForCTC` + `Wav2Vec2Processor`
  (no remote code: `AutoModelForCTC.from_pretrained` and `pipeline("automatic-speech-recognition")` load it).

The config comes from the checkpoint's `cfg` (or `args`): every field the model uses is mapped; a setting this
package does not implement is an error that names it (`UNSUPPORTED`), never a silent default. The file is read
with `fairseq_io.load_fairseq_checkpoint` (no code from the pickle runs).

Vocabulary (as transformers' wav2vec 2.0 converter): fairseq's letter dictionary is `<s>`=0, `<pad>`=1, `</s>`=2,
`<unk>`=3, then the symbols; fairseq's CTC blank is index 0. `vocab.json` keeps every index and swaps the *names*
of 0 and 1, so HF's pad token (its CTC blank) is fairseq's blank row and `lm_head` is `w2v_encoder.proj` unpermuted.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

import torch

from .audio import feature_extractor
from .configuration_data2vec_aqc import Data2VecAQCConfig
from .fairseq_io import FairseqCheckpointError, load_fairseq_checkpoint

__all__ = ["convert_checkpoint", "config_from_fairseq", "map_fairseq_weights", "fairseq_vocab", "main",
           "LIBRISPEECH_LETTERS", "KNOWN_CHECKPOINTS", "release_mismatch"]

# fairseq's dict.ltr.txt for LibriSpeech (https://dl.fbaipublicfiles.com/fairseq/wav2vec/dict.ltr.txt), in order
LIBRISPEECH_LETTERS = "| E T A O N I H S R D L U M W C F G Y P B V K ' X J Q Z".split()
FAIRSEQ_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]

# The authors' released files (github.com/Speech-Lab-IITM/data2vec-aqc README), by file name: what the card says.
_URL = "https://asr.iitm.ac.in/ssl_ckpts/data2vec-aqc"
KNOWN_CHECKPOINTS = {
    "data2vec-aqc_base_360h.pt": ("data2vec-aqc BASE, pretrained on LibriSpeech 360 h", f"{_URL}/360h/data2vec-aqc_base_360h.pt", None),
    "data2vec-aqc_base_360h_100h.pt": ("data2vec-aqc BASE, pretrained on LibriSpeech 360 h, fine-tuned on 100 h",
                                       f"{_URL}/360h/data2vec-aqc_base_360h_100h.pt", (5.5, 14.0)),
    "data2vec-aqc_base_960h.pt": ("data2vec-aqc BASE, pretrained on LibriSpeech 960 h", f"{_URL}/960h/data2vec-aqc_base_960h.pt", None),
    "data2vec-aqc_base_960h_100h.pt": ("data2vec-aqc BASE, pretrained on LibriSpeech 960 h, fine-tuned on 100 h",
                                       f"{_URL}/960h/data2vec-aqc_base_960h_100h.pt", (4.8, 9.5)),
    "data2vec-aqc_base_960h_SUPERB.pt": ("data2vec-aqc BASE (LibriSpeech 960 h), the authors' SUPERB submission",
                                         f"{_URL}/960h/data2vec-aqc_base_960h_SUPERB.pt", None),
    "data2vec_base_360h.pt": ("data2vec BASE baseline of the paper, pretrained on LibriSpeech 360 h",
                              f"{_URL}/360h/data2vec_base_360h.pt", None),
    "data2vec_base_360h_100h.pt": ("data2vec BASE baseline, pretrained on LibriSpeech 360 h, fine-tuned on 100 h",
                                   f"{_URL}/360h/data2vec_base_360h_100h.pt", (6.4, 17.7)),
}

# fairseq model field -> value(s) this package implements. Anything else is refused, naming the field.
REQUIRED = {
    "extractor_mode": ("layer_norm",),           # data2vec-audio's CNN has a LayerNorm in every layer
    "layer_norm_first": (False,),                # data2vec-audio is post-LN
    "layer_type": ("transformer", None),
    "pos_enc_type": ("abs", None),
    "activation_fn": ("gelu",),
    "quantizer_depth": (1, None),
    "mask_selection": ("static", None),
    "no_mask_overlap": (False, None),
    "mask_dropout": (0.0, 0, None),
    "mask_channel_selection": ("static", None),
    "no_mask_channel_overlap": (False, None),
    "mask_channel_before": (False, None),
    "dropout_features": (0.0, 0, None),
    "cross_sample_negatives": (0, None),
    "codebook_negatives": (0, None),
    "negatives_from_everywhere": (False, None),
    "crop_seq_to_multiple": (1, None),
    "loss_beta": (0.0, 0, None),
    "layer_norm_target_layer": (False, None),
    "batch_norm_target_layer": (False, None),
    "group_norm_target_layer": (False, None),
    "instance_norm_targets": (False, None),
    "layer_norm_targets": (False, None),
    "ema_transformer_only": (True, None),
    "ema_layers_only": (True, None),
}
# Fields with no effect on what the converted model computes (runtime, logging, wav2vec 2.0 leftovers the
# data2vec-aqc model never reads). Listed so that an unknown new field is noticed, not ignored.
IGNORED = {
    "_name", "fp16", "max_positions", "checkpoint_activations", "required_seq_len_multiple", "min_target_var",
    "min_pred_var", "max_update", "depthwise_conv_kernel_size", "attn_type", "quantize_targets", "quantize_input",
    "same_quantizer", "target_glu", "final_dim", "quantizer_factor", "mask_other", "mask_min_space",
    "mask_channel_other", "mask_channel_min_space", "offload_activations", "min_params_to_wrap", "ddp_backend",
    "data", "w2v_path", "w2v_args", "no_pretrained_weights", "freeze_finetune_updates", "normalize",
    "apply_mask", "blank_mode", "blank_weight", "final_dropout", "layerdrop", "instance_norm_target_layer",
    "latent_dim", "final_proj_dim", "conv_feature_layers", "encoder_layers", "encoder_embed_dim",
    "encoder_ffn_embed_dim", "encoder_attention_heads", "dropout", "attention_dropout", "activation_dropout",
    "encoder_layerdrop", "dropout_input", "logit_temp", "latent_vars", "latent_groups", "latent_temp",
    "mask_length", "mask_prob", "require_same_masks", "mask_channel_length", "mask_channel_prob", "num_negatives",
    "conv_pos", "conv_pos_groups", "pos_conv_depth", "conv_bias", "cluster_factor", "scale_factor", "loss_scale",
    "average_top_k_layers", "ema_decay", "ema_end_decay", "ema_anneal_end_step", "fp32_attention", "seed",
    "feature_grad_mult",
}


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's `conv_feature_layers` string (a Python expression of lists of (dim, kernel, stride) tuples joined
    with `+` and `*`) without `eval`: only literals, `+` and `*` are accepted."""
    def value(node):
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported expression {ast.dump(node)[:80]}")

    layers = value(ast.parse(spec, mode="eval"))
    if not layers or not all(isinstance(t, tuple) and len(t) == 3 for t in layers):
        raise ValueError(f"conv_feature_layers {spec!r} is not a list of (dim, kernel, stride)")
    return layers


def _model_cfg(state: dict, path) -> tuple[dict, dict]:
    """(`cfg.model`, `cfg.task`) of a checkpoint saved with a `cfg` or, for older files, an `args` namespace."""
    cfg = state.get("cfg")
    if cfg and cfg.get("model"):
        return dict(cfg["model"]), dict(cfg.get("task") or {})
    if state.get("args"):
        args = dict(state["args"])
        name = args.get("arch") or args.get("_name")
        return {**args, "_name": name}, args
    raise FairseqCheckpointError(f"{path}: the checkpoint has neither cfg.model nor args: cannot read its architecture")


def config_from_fairseq(model: dict, task: dict | None = None, objective: str = "aqc", path="checkpoint",
                        **extra) -> Data2VecAQCConfig:
    """`Data2VecAQCConfig` for a fairseq `data2vec_audio` model config (a dict). Raises `FairseqCheckpointError`
    naming each unsupported setting."""
    problems = [f"{k}={model[k]!r} (supported: {[v for v in ok if v is not None]})"
                for k, ok in REQUIRED.items() if k in model and model[k] not in ok]
    unknown = sorted(set(model) - set(REQUIRED) - IGNORED)
    if unknown:
        problems.append(f"unknown field(s) {unknown}")
    depth = int(model.get("pos_conv_depth", 1))
    if depth < 2:
        problems.append(f"pos_conv_depth={depth}: a single weight-normed positional conv is wav2vec 2.0's layout, "
                        f"not data2vec-audio's (use transformers' wav2vec 2.0 converter)")
    if task and task.get("normalize") is False:
        problems.append("task.normalize=False: data2vec models are trained on normalised audio")
    if problems:
        raise FairseqCheckpointError(f"{path}: unsupported fairseq setting(s): " + "; ".join(problems))
    try:
        conv = parse_conv_layers(model["conv_feature_layers"])
    except (KeyError, ValueError, SyntaxError) as error:
        raise FairseqCheckpointError(f"{path}: conv_feature_layers: {error}") from None
    hidden = int(model["encoder_embed_dim"])
    final_proj_dim = int(model.get("final_proj_dim") or hidden)
    latent_dim = int(model.get("latent_dim") or 0) or final_proj_dim
    temp = list(model.get("latent_temp") or (2.0, 0.5, 0.999995))
    values = dict(
        objective=objective,
        conv_dim=tuple(c[0] for c in conv), conv_kernel=tuple(c[1] for c in conv), conv_stride=tuple(c[2] for c in conv),
        conv_bias=bool(model.get("conv_bias", False)), feat_extract_activation="gelu",
        hidden_size=hidden, num_hidden_layers=int(model["encoder_layers"]),
        intermediate_size=int(model["encoder_ffn_embed_dim"]), num_attention_heads=int(model["encoder_attention_heads"]),
        hidden_act="gelu", hidden_dropout=float(model.get("dropout", 0.1)),
        attention_dropout=float(model.get("attention_dropout", 0.1)),
        activation_dropout=float(model.get("activation_dropout", 0.0)),
        feat_proj_dropout=float(model.get("dropout_input", 0.0)),
        layerdrop=float(model.get("encoder_layerdrop", 0.0)),
        num_conv_pos_embeddings=depth, conv_pos_kernel_size=max(3, int(model["conv_pos"]) // depth),
        num_conv_pos_embedding_groups=int(model["conv_pos_groups"]),
        mask_time_prob=float(model.get("mask_prob", 0.65)), mask_time_length=int(model.get("mask_length", 10)),
        mask_time_min_masks=1, mask_require_same_masks=bool(model.get("require_same_masks", True)),
        mask_feature_prob=float(model.get("mask_channel_prob", 0.0)),
        mask_feature_length=int(model.get("mask_channel_length", 10)),
        num_target_layers=int(model.get("average_top_k_layers", 8)),
        instance_norm_target_layers=bool(model.get("instance_norm_target_layer", True)),
        regression_loss_scale=model.get("loss_scale"),
        ema_decay_start=float(model.get("ema_decay", 0.999)), ema_decay_end=float(model.get("ema_end_decay", 0.9999)),
        ema_anneal_steps=int(model.get("ema_anneal_end_step", 30000)),
        max_gumbel_temperature=float(temp[0]), min_gumbel_temperature=float(temp[1]),
        gumbel_temperature_decay=float(temp[2]), quantizer_init_std=1.0,
        feature_grad_mult=float(model.get("feature_grad_mult", 1.0)),
    )
    if objective == "aqc":
        values.update(
            num_codevector_groups=int(model["latent_groups"]), num_codevectors_per_group=int(model["latent_vars"]),
            codevector_dim=latent_dim, proj_codevector_dim=final_proj_dim,
            contrastive_logits_temperature=float(model.get("logit_temp", 0.1)),
            num_negatives=int(model.get("num_negatives", 100)), cluster_factor=int(model.get("cluster_factor", 16)),
            cluster_scale_factor=float(model.get("scale_factor", 0.3)),
        )
    values.update(extra)
    return Data2VecAQCConfig(**values)


# ----- weights -------------------------------------------------------------------------------------------------
_ENCODER_RULES = [
    (r"pos_conv\.(\d+)\.0\.(weight|bias)$", r"pos_conv_embed.layers.\1.conv.\2"),
    (r"layer_norm\.(weight|bias)$", r"layer_norm.\1"),
    (r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|q_proj|out_proj)\.(weight|bias)$", r"layers.\1.attention.\2.\3"),
    (r"layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"layers.\1.layer_norm.\2"),
    (r"layers\.(\d+)\.fc1\.(weight|bias)$", r"layers.\1.feed_forward.intermediate_dense.\2"),
    (r"layers\.(\d+)\.fc2\.(weight|bias)$", r"layers.\1.feed_forward.output_dense.\2"),
    (r"layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"layers.\1.final_layer_norm.\2"),
]
_MODEL_RULES = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)$", r"data2vec_audio.feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$",
     r"data2vec_audio.feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"layer_norm\.(weight|bias)$", r"data2vec_audio.feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)$", r"data2vec_audio.feature_projection.projection.\1"),
    (r"mask_emb$", r"data2vec_audio.masked_spec_embed"),
    (r"quantizer\.vars$", r"quantizer.codevectors"),
    (r"quantizer\.weight_proj\.(weight|bias)$", r"quantizer.weight_proj.\1"),
    (r"(project_q|final_proj|contr_proj)\.(weight|bias)$", r"\1.\2"),
]


def _rename(key: str, rules) -> str | None:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def map_fairseq_weights(model_state: dict, path="checkpoint") -> tuple[dict, list[str]]:
    """fairseq `data2vec_audio` weights (student keys, `_ema` teacher dict, optionally `w2v_encoder.w2v_model.`
    prefixed, `w2v_encoder.proj`) -> this package's names. Returns (mapped, fairseq keys left unmapped)."""
    mapped, unmapped = {}, []
    for key, value in model_state.items():
        if key == "_ema":
            for sub, tensor in value.items():
                name = _rename(sub, _ENCODER_RULES)
                if name is None:
                    unmapped.append(f"_ema.{sub}")
                else:
                    mapped[f"teacher.{name}"] = tensor
            continue
        if not torch.is_tensor(value):
            unmapped.append(key)
            continue
        local = key.removeprefix("w2v_encoder.w2v_model.")
        if key.startswith("w2v_encoder.proj."):
            mapped["lm_head." + key.rsplit(".", 1)[1]] = value
            continue
        name = _rename(local, _MODEL_RULES)
        if name is None and local.startswith("encoder."):
            inner = _rename(local.removeprefix("encoder."), _ENCODER_RULES)
            name = f"data2vec_audio.encoder.{inner}" if inner else None
        if name is None:
            unmapped.append(key)
        else:
            mapped[name] = value
    return mapped, unmapped


def _load_strict(model: torch.nn.Module, weights: dict, allow_missing: tuple[str, ...], path) -> list[str]:
    """Copy `weights` into `model` checking names and shapes; returns the missing names (only `allow_missing`
    prefixes may be missing)."""
    own = model.state_dict()
    unexpected = sorted(set(weights) - set(own))
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in weights.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(k for k in own if k not in weights)
    bad_missing = [k for k in missing if not k.startswith(allow_missing)]
    if unexpected or wrong or bad_missing:
        raise FairseqCheckpointError(
            f"{path}: weights do not fit the converted architecture: "
            + "; ".join(filter(None, [f"unexpected {unexpected[:5]}" if unexpected else "",
                                      f"shape mismatch {wrong[:5]}" if wrong else "",
                                      f"missing {bad_missing[:5]}" if bad_missing else ""])))
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v.to(own[k].dtype))
    return missing


def fairseq_vocab(symbols: list[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """HF `vocab.json` for a fairseq letter dictionary (symbols after the 4 specials; LibriSpeech's by default):
    fairseq index order kept, the names of index 0 (`<s>`, fairseq's CTC blank) and 1 (`<pad>`) swapped."""
    symbols = list(LIBRISPEECH_LETTERS if symbols is None else symbols)
    full = FAIRSEQ_SPECIALS + [s for s in symbols if s not in FAIRSEQ_SPECIALS]
    vocab = {s: i for i, s in enumerate(full)}
    vocab["<pad>"], vocab["<s>"] = 0, 1
    return dict(sorted(vocab.items(), key=lambda kv: kv[1])), full


def read_dict_file(path: str | Path) -> list[str]:
    """Symbols of a fairseq `dict.*.txt` (`symbol count` per line)."""
    symbols = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip().rsplit(" ", 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise FairseqCheckpointError(f"{path}:{n}: expected '<symbol> <count>', got {line!r}")
        symbols.append(parts[0])
    return symbols


# ----- the two conversions ----------------------------------------------------------------------------------------
def _objective(model_state: dict) -> str:
    """`"aqc"` when the weights hold the AQC quantizer (pretraining or fine-tuned key layout), else `"data2vec"`."""
    return "aqc" if any(f".{k}".find(".quantizer.") >= 0 for k in model_state) else "data2vec"


def convert_pretraining(state: dict, path="checkpoint"):
    """`Data2VecAQCForPreTraining` from a fairseq `data2vec_audio` pretraining checkpoint."""
    from .modeling_data2vec_aqc import Data2VecAQCForPreTraining

    model_cfg, task_cfg = _model_cfg(state, path)
    objective = _objective(state["model"])
    config = config_from_fairseq(model_cfg, task_cfg, objective, path)
    model = Data2VecAQCForPreTraining(config)
    weights, unmapped = map_fairseq_weights(state["model"], path)
    if unmapped:
        raise FairseqCheckpointError(f"{path}: fairseq weights with no place in the model: {unmapped[:8]}")
    missing = _load_strict(model, weights, ("teacher.", "num_updates"), path)
    notes = []
    if any(k.startswith("teacher.") for k in missing):
        model.reset_teacher()
        notes.append("no EMA teacher (`_ema`) in the checkpoint: the teacher starts as a copy of the student")
    history = state.get("optimizer_history") or [{}]
    model.num_updates.fill_(int(history[-1].get("num_updates", 0)))
    model.teacher.requires_grad_(False)
    return model.eval(), notes


def convert_finetuned(state: dict, symbols: list[str] | None, path="checkpoint"):
    """(stock `Data2VecAudioForCTC`, vocabulary dict) from a fairseq `wav2vec_ctc` checkpoint."""
    from transformers import Data2VecAudioForCTC

    model_cfg, task_cfg = _model_cfg(state, path)
    w2v_args = model_cfg.get("w2v_args")
    if not w2v_args or not (w2v_args.get("model") or {}).get("_name"):
        raise FairseqCheckpointError(f"{path}: cfg.model.w2v_args (the pretraining config the encoder was built from) "
                                     f"is missing; this converter needs it for the architecture")
    arch = dict(w2v_args["model"])
    if arch["_name"] != "data2vec_audio":
        raise FairseqCheckpointError(f"{path}: the encoder is a fairseq {arch['_name']!r} model, not data2vec_audio "
                                     f"(for wav2vec 2.0 use transformers' wav2vec 2.0 converter)")
    if model_cfg.get("blank_mode", "add") != "add":
        raise FairseqCheckpointError(f"{path}: blank_mode={model_cfg['blank_mode']!r} is not supported (only 'add')")
    proj = state["model"].get("w2v_encoder.proj.weight")
    if proj is None:
        raise FairseqCheckpointError(f"{path}: no w2v_encoder.proj (CTC output layer) in the checkpoint")
    vocab, full = fairseq_vocab(symbols)
    if len(full) != proj.shape[0]:
        raise FairseqCheckpointError(
            f"{path}: the dictionary has {len(full)} entries (4 specials + {len(full) - 4} symbols) but the CTC "
            f"output layer has {proj.shape[0]} rows: pass the dict.ltr.txt this model was fine-tuned with")
    apply_mask = bool(model_cfg.get("apply_mask", True))
    finetune = dict(
        hidden_dropout=float(model_cfg.get("dropout", 0.0)),
        attention_dropout=float(model_cfg.get("attention_dropout", 0.0)),
        activation_dropout=float(model_cfg.get("activation_dropout", 0.1)),
        feat_proj_dropout=float(model_cfg.get("dropout_input", 0.0)),
        final_dropout=float(model_cfg.get("final_dropout", 0.0)),
        layerdrop=float(model_cfg.get("layerdrop", 0.0)),
        mask_time_prob=float(model_cfg.get("mask_prob", 0.5)) if apply_mask else 0.0,
        mask_time_length=int(model_cfg.get("mask_length", 10)),
        mask_feature_prob=float(model_cfg.get("mask_channel_prob", 0.0)) if apply_mask else 0.0,
        mask_feature_length=int(model_cfg.get("mask_channel_length", 10)),
        mask_time_min_masks=2,
        vocab_size=len(full), pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ctc_loss_reduction="sum", ctc_zero_infinity=True,
    )
    aqc_config = config_from_fairseq(arch, w2v_args.get("task"), "data2vec", path, **finetune)
    config = aqc_config.to_data2vec_audio_config()
    config.architectures = ["Data2VecAudioForCTC"]
    model = Data2VecAudioForCTC(config)
    weights, _ = map_fairseq_weights(state["model"], path)
    # pretraining-only modules the fork keeps in fine-tuned files (quantizer, project_q, contr_proj) are unused
    weights = {k: v for k, v in weights.items() if k.startswith(("data2vec_audio.", "lm_head."))}
    if model_cfg.get("blank_weight"):
        weights["lm_head.bias"] = weights["lm_head.bias"].clone()
        weights["lm_head.bias"][0] += float(model_cfg["blank_weight"])  # fairseq adds it to the blank logit
    missing = _load_strict(model, weights, ("data2vec_audio.masked_spec_embed",), path)
    if missing:
        model.data2vec_audio.masked_spec_embed.data.zero_()
    return model.eval(), vocab


def _processor(vocab: dict[str, int], directory: Path, do_normalize: bool):
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2Processor

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1))
    tokenizer = Wav2Vec2CTCTokenizer(str(directory / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                     bos_token="<s>", eos_token="</s>", word_delimiter_token="|", do_lower_case=False)
    return Wav2Vec2Processor(feature_extractor=feature_extractor(do_normalize), tokenizer=tokenizer)


def checkpoint_kind(state: dict, path="checkpoint") -> str:
    """`"pretraining"` (`data2vec_audio`) or `"finetuned"` (`wav2vec_ctc`)."""
    name = _model_cfg(state, path)[0].get("_name")
    if name == "data2vec_audio":
        return "pretraining"
    if name == "wav2vec_ctc":
        return "finetuned"
    raise FairseqCheckpointError(
        f"{path}: a fairseq {name!r} model; this converter reads data2vec_audio (pretraining) and wav2vec_ctc "
        f"(fine-tuned) checkpoints")


def convert_checkpoint(checkpoint: str | Path, output_dir: str | Path, dict_path: str | Path | None = None,
                       trust_pickle: bool = False) -> dict:
    """Convert one fairseq file into `output_dir` (a transformers model folder). Returns a summary dict
    (kind, objective, num_updates, notes)."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    state = load_fairseq_checkpoint(checkpoint, trust_pickle=trust_pickle)
    kind = checkpoint_kind(state, checkpoint)
    history = state.get("optimizer_history") or [{}]
    summary = {"source": checkpoint.name, "kind": kind, "num_updates": int(history[-1].get("num_updates", 0)),
               "notes": []}
    output_dir.mkdir(parents=True, exist_ok=True)
    if kind == "pretraining":
        model, notes = convert_pretraining(state, checkpoint)
        model.save_pretrained(output_dir)
        feature_extractor().save_pretrained(output_dir)
        summary.update(objective=model.config.objective, notes=notes)
    else:
        if dict_path is not None:
            symbols = read_dict_file(dict_path)
        else:
            stored = (state.get("task_state") or {}).get("target_dictionary")
            symbols = list(stored.symbols[stored.nspecial:]) if stored is not None and hasattr(stored, "symbols") \
                else None
            summary["notes"].append("dictionary: " + ("the checkpoint's own task_state" if symbols is not None
                                                      else "LibriSpeech letters (built in)"))
        model, vocab = convert_finetuned(state, symbols, checkpoint)
        model.save_pretrained(output_dir, safe_serialization=True)
        task = _model_cfg(state, checkpoint)[1]
        _processor(vocab, output_dir, bool(task.get("normalize", True))).save_pretrained(output_dir)
        summary.update(objective="ctc")
    summary.update(num_hidden_layers=model.config.num_hidden_layers, hidden_size=model.config.hidden_size)
    problem = release_mismatch(summary)
    if problem:
        summary["notes"].append(problem)
    (output_dir / "conversion.json").write_text(json.dumps(summary, indent=1))
    return summary


def release_mismatch(summary: dict) -> str | None:
    """Where the file has a released checkpoint's name but not its contents (every release is a BASE model:
    12 layers of 768; `_100h` ones are CTC fine-tuned, the others pretraining), why; None otherwise. The card
    quotes a release's description and WER only for a file that passes, so a renamed file is not credited with
    the paper's numbers."""
    name = summary["source"]
    if name not in KNOWN_CHECKPOINTS:
        return None
    expected = {"kind": "finetuned" if name.endswith("_100h.pt") else "pretraining", "num_hidden_layers": 12,
                "hidden_size": 768}
    differs = [f"{key} {summary.get(key)} (the release: {value})" for key, value in expected.items()
               if summary.get(key) != value]
    if not differs:
        return None
    return (f"{name} is named like the authors' release but its contents differ: {'; '.join(differs)}; the card "
            f"does not quote the release's description or WER")


def card_text(summary: dict, repo_id: str | None) -> str:
    """Model card for a converted checkpoint: where it came from and, for a file that is an authors' release
    (name and contents, `release_mismatch`), the paper's numbers for it."""
    from .cards import render_card

    release = None if release_mismatch(summary) else KNOWN_CHECKPOINTS.get(summary["source"])
    title, url, wer = release or (f"fairseq checkpoint {summary['source']}", None, None)
    source = f"[`{summary['source']}`]({url})" if url else f"`{summary['source']}`"
    model_id = repo_id or "path/to/converted"
    if summary["kind"] == "finetuned":
        usage = ("import soundfile as sf\n"
                 "import soxr\n"
                 "import torch\n"
                 "from transformers import AutoModelForCTC, AutoProcessor\n\n"
                 f"model = AutoModelForCTC.from_pretrained({model_id!r})\n"
                 f"processor = AutoProcessor.from_pretrained({model_id!r})\n"
                 "audio, rate = sf.read(\"speech.flac\", dtype=\"float32\", always_2d=True)\n"
                 "audio = audio.mean(axis=1)                      # mono\n"
                 "if rate != 16000:\n"
                 "    audio = soxr.resample(audio, rate, 16000)   # the model expects 16 kHz\n"
                 "inputs = processor(audio, sampling_rate=16000, return_tensors=\"pt\")\n"
                 "with torch.no_grad():\n"
                 "    ids = model(**inputs).logits.argmax(-1)\n"
                 "print(processor.batch_decode(ids)[0])")
    else:  # the folder carries the model code and auto_map: plain transformers loads it with trust_remote_code
        usage = ("import torch\n"
                 "from transformers import AutoFeatureExtractor, AutoModel, AutoModelForPreTraining\n\n"
                 f"extractor = AutoFeatureExtractor.from_pretrained({model_id!r})\n"
                 f"encoder = AutoModel.from_pretrained({model_id!r}, trust_remote_code=True).eval()  # the student\n"
                 "audio = torch.randn(16000).numpy()  # one second of 16 kHz mono audio (e.g. read with soundfile)\n"
                 "with torch.no_grad():\n"
                 "    embeddings = encoder(**extractor(audio, sampling_rate=16000, return_tensors=\"pt\")).last_hidden_state\n"
                 "print(tuple(embeddings.shape))  # (1, frames, hidden_size): one vector per 20 ms\n"
                 f"full = AutoModelForPreTraining.from_pretrained({model_id!r}, trust_remote_code=True)  "
                 "# student, EMA teacher, heads: continue pretraining")
    numbers = (f"The authors report {wer[0]} / {wer[1]} % WER on LibriSpeech test-clean / test-other without a "
               f"language model for this checkpoint." if wer else "")
    return render_card("converted.md", dict(
        title=title, source=source, kind=summary["kind"], objective=summary.get("objective", ""),
        num_updates=summary["num_updates"], numbers=numbers, usage=usage,
        pipeline_tag="automatic-speech-recognition" if summary["kind"] == "finetuned" else "feature-extraction"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="data2vec-aqc-convert",
        description="Convert a fairseq data2vec-aqc / data2vec checkpoint (pretraining or wav2vec_ctc fine-tuned) "
                    "to a transformers model folder, without fairseq.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="the fairseq .pt file")
    parser.add_argument("output_dir", help="folder to write the transformers model (and processor) to")
    parser.add_argument("--dict", dest="dict_path", default=None,
                        help="fairseq dict.ltr.txt of a fine-tuned model (default: the checkpoint's own dictionary "
                             "when it holds one, else the standard LibriSpeech letters)")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="unpickle types outside the allow-list (can run code from the file: only for files you "
                             "trust; default: refuse)")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID",
                        help="also upload the folder, with a model card, to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private (with --push_to_hub)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = convert_checkpoint(args.checkpoint, args.output_dir, args.dict_path, args.trust_pickle)
    except FairseqCheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    (Path(args.output_dir) / "README.md").write_text(card_text(summary, args.push_to_hub or args.output_dir))
    print(f"converted {summary['kind']} checkpoint ({summary.get('objective')}, {summary['num_updates']} updates) "
          f"-> {args.output_dir}")
    for note in summary["notes"]:
        print(f"note: {note}")
    if args.push_to_hub:
        from .hub import push_folder

        url = push_folder(args.output_dir, args.push_to_hub, f"Convert {summary['source']} from fairseq",
                          private=args.private or None)
        print(f"pushed: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
