"""Fine-tune a data2vec-aqc checkpoint for CTC speech recognition with transformers' Trainer.

    python training/finetune.py --model_name_or_path outputs/demo-pretrain --train_manifest data/demo/metadata.csv \
        --eval_speakers fsdd_yweweler --output_dir outputs/demo-finetune --max_steps 200
"""

import json
import logging

from data2vec_aqc_hf.cli import parse_args
from data2vec_aqc_hf.finetuning import FinetuneArguments, TrainerOptions, run_finetuning

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args, training_args = parse_args((FinetuneArguments, TrainerOptions))
    metrics = run_finetuning(args, training_args)
    print("METRICS " + json.dumps({k: v for k, v in metrics.items() if k != "examples"}))
