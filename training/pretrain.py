"""Pretrain data2vec-aqc.

    accelerate launch training/pretrain.py configs/demo.yaml
    accelerate launch training/pretrain.py --dataset_name openslr/librispeech_asr --dataset_config_name all \
        --train_split_name train.clean.100+train.clean.360+train.other.500 --output_dir outputs/base
"""

from data2vec_aqc_hf.pretraining import main

if __name__ == "__main__":
    main()
