"""The learning experiment: pretrain (data2vec-aqc, data2vec, none) -> CTC fine-tune on 3 FSDD speakers (low-resource
and full) -> WER on the unseen 4th speaker (rotated), clean and in white/babble noise; writes docs/RESULTS.md.

    python training/experiments/fsdd_ssl.py                      # the one-hour CPU design (2 cores)
    python training/experiments/fsdd_ssl.py --scale 8 --jobs 1   # the same design, 8x the updates (GPU)

See data2vec_aqc_hf/experiment.py for the design; finished runs are skipped on a second invocation.
"""

from transformers import HfArgumentParser

from data2vec_aqc_hf.experiment import ExperimentArguments, run_experiment

if __name__ == "__main__":
    (args,) = HfArgumentParser(ExperimentArguments).parse_args_into_dataclasses()
    run_experiment(args)
