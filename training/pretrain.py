"""Pretrain data2vec-aqc.

    accelerate launch training/pretrain.py configs/demo.yaml
    accelerate launch training/pretrain.py --dataset_name openslr/librispeech_asr --dataset_config_name all \
        --train_split_name train.clean.100+train.clean.360+train.other.500 --output_dir outputs/base
"""

import json
import logging

from accelerate import PartialState

from data2vec_aqc_hf.cli import parse_args
from data2vec_aqc_hf.pretraining import PretrainingArguments, run_pretraining

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    (args,) = parse_args(PretrainingArguments)
    summary = run_pretraining(args)
    if PartialState().is_main_process:  # one summary line, not one per rank interleaved on a shared pipe
        print("SUMMARY " + json.dumps(summary), flush=True)
