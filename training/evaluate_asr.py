"""Score a CTC model on a manifest: WER, CER, per speaker, optionally with white noise at a chosen SNR.

(Not named `evaluate.py`: a script of that name in `training/` would shadow the `evaluate` library for every
script run from this folder, since Python puts the script's folder first on `sys.path`.)

    python training/evaluate_asr.py MODEL data/demo/metadata.csv [--speakers fsdd_yweweler] [--snr_db 10] [--lm lm.arpa]
"""

import data2vec_aqc_hf  # noqa: F401  (registers data2vec-aqc checkpoints)
from data2vec_aqc_hf.evaluation import main

if __name__ == "__main__":
    main()
