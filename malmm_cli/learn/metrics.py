"""The metrics of an evaluation, from its per-case records (no model): what the official MA-LMM
evaluation computes (lavis/tasks in the research code).

- classify: top-1 and top-5. The official eval (``classification.py`` lines 61-77 and
  111-143) generates 5 beams and counts top-1 when beam 0 is the label exactly, top-5 when
  any of the 5 is; ranked by likelihood instead, the prediction is the likeliest label and
  top-5 the 5 likeliest. Per-class accuracy and the confusion matrix either way.
- ask: exact match, and the answer's first word against the ground truth, which is how
  MSRVTT-QA and MSVD-QA are scored (``vqa.py``).
- caption: BLEU-1..4, METEOR, ROUGE-L and CIDEr as COCOEvalCap computes them
  (caption_metrics.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TOP_K = 5  # top-5 accuracy, as the official classification eval reports
OTHER = "(not a label)"  # the confusion matrix's column for generated answers outside the label set


def exact_match(prediction: str, target: str) -> bool:
    """As the official QA eval: the text as generated (spaces trimmed) equals the answer."""
    return prediction.strip() == target.strip()


def first_word_match(prediction: str, target: str) -> bool:
    """As the official MSRVTT-QA / MSVD-QA eval: the answer's first word (split on a space)
    equals the ground truth, which is a single word there."""
    return prediction.strip().split(" ")[0] == target.strip()


def classify_metrics(records: Sequence[dict], labels: Sequence[str]) -> dict[str, Any]:
    """Top-1, top-5, per-class accuracy (by true label) and the confusion matrix (rows: true
    label, columns: predicted, in label-set order; with generated predictions, a last column
    for answers that are none of the labels)."""
    at = {label: i for i, label in enumerate(labels)}
    columns = list(labels) + ([OTHER] if any(r["prediction"] not in at for r in records) else [])
    matrix = [[0] * len(columns) for _ in labels]
    for r in records:
        matrix[at[r["target"]]][at.get(r["prediction"], len(labels))] += 1
    n = len(records)
    top1 = sum(r["prediction"] == r["target"] for r in records)
    top5 = sum(r.get("rank") is not None and r["rank"] <= TOP_K for r in records)
    per_class = {}
    for label in labels:
        row = matrix[at[label]]
        if sum(row):
            per_class[label] = {"n": sum(row), "accuracy": ratio(row[at[label]], sum(row))}
    return {"accuracy": ratio(top1, n), "top5": ratio(top5, n), "per_class": per_class,
            "confusion": {"labels": list(labels), "columns": columns, "matrix": matrix}}


def ask_metrics(records: Sequence[dict]) -> dict[str, Any]:
    n = len(records)
    return {"accuracy": ratio(sum(r["correct"] for r in records), n),
            "first_word_accuracy": ratio(sum(r["first_word_correct"] for r in records), n)}


def ratio(k: int, n: int) -> float | None:
    return round(k / n, 6) if n else None
