"""WER and CER as an `evaluate` metric that loads without the Hub: `evaluate.load(data2vec_aqc_hf.metrics.METRIC_PATH)`.

The numbers come from `data2vec_aqc_hf.metrics.wer_cer` (jiwer), the package's one WER/CER function.
"""

import datasets
import evaluate

from data2vec_aqc_hf.metrics import wer_cer

_DESCRIPTION = "Corpus-level word and character error rates (jiwer); utterances with an empty reference are skipped."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of transcripts.
    references: list of reference transcripts.
Returns:
    {"wer": float, "cer": float}
Examples:
    >>> metric = evaluate.load(METRIC_PATH)
    >>> metric.compute(predictions=["A B"], references=["A C"])
    {'wer': 0.5, 'cer': 0.3333333333333333}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WerCerMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return wer_cer(list(predictions), list(references))
