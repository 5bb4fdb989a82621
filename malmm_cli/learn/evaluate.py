"""Scoring the model on a labelled data file: one prediction record per case, then the metrics.

Three layers, so that each can be used (and run elsewhere) on its own:

- `plan` / `cases_for`: what to ask of every case, checked before any model loads.
- `run_cases(session, job, cases, runner)`: each case is a unit (its video, its job) for the
  batch commands' runners (runs/runners.py: one by one, lockstep, Ray workers) -> one record
  per case (a prediction, or an error with one sentence).
- `report(task, records, ...)`: the records -> an EvalReport (metrics only; no model).

`evaluate(model, items, task)` puts them together for Python users.

Metrics follow the official MA-LMM evaluation (lavis/tasks in the research code):
classify: top-1 and top-5, which the official eval takes from 5 generated beams matched
exactly against the label; here every label of the set is ranked by its likelihood (as
`malmm classify` does), so each prediction is a label and the top 5 are the 5 likeliest;
ask: exact match, and the first word of the answer against the ground truth, which is how
MSRVTT-QA and MSVD-QA are scored; caption: CIDEr(-D) and BLEU-4 from pycocoevalcap, the
library the official eval calls.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .dataset import Item, columns
from malmm_cli.errors import UsageError
from malmm_cli.engine.presets import TASK_DEFAULTS
from malmm_cli.engine.tasks import (LABEL_SET_NAMES, Job, LabelSet, check_labels, custom_label_set, load_label_set,
                                   question_prompt)

TOP_K = 5  # top-5 accuracy, as the official classification eval reports
CAPTION_EXTRA = "eval"  # pip install 'malmm[eval]' brings pycocoevalcap


# ---- cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One scored unit. classify and ask: one data row. caption: one video, its references being
    the captions of all rows naming it (MSRVTT has 20 per video; CIDEr is built for many)."""

    index: int  # the row index of the data item (caption: of the video's first row)
    video: str
    targets: tuple[str, ...]
    question: str | None = None
    where: str = ""  # "FILE, line N" of its (first) row: how messages name it

    @property
    def target(self) -> str:
        return self.targets[0]

    @property
    def row(self) -> str:
        """How a message names the case: its data file and line, as every data-file message does."""
        return self.where or f"data row {self.index + 1}"


def cases_for(items: Sequence[Item], task: str) -> list[Case]:
    """The data items as scored units (see Case)."""
    columns(task)  # an unknown task is a usage error
    if task != "caption":
        return [Case(i.index, i.video, (i.target,), i.question, i.where) for i in items]
    refs: dict[str, list[str]] = {}
    first: dict[str, Item] = {}
    for item in items:
        refs.setdefault(item.video, []).append(item.target)
        first.setdefault(item.video, item)
    return [Case(first[v].index, v, tuple(r), where=first[v].where) for v, r in refs.items()]


def data_label_set(cases: Sequence[Case], prompt: str | None = None) -> LabelSet:
    """The distinct labels of the data, sorted: the label set when none is given."""
    labels = tuple(sorted({c.target for c in cases}))
    if len(labels) < 2:
        raise UsageError(f"The data has only one label ({labels[0]!r}); classification needs at least two: "
                         "add rows or give the label set with --labels or --label-set.")
    check_labels(labels, "The data's label set")
    return LabelSet("data", prompt or TASK_DEFAULTS["classify"].prompt, labels)


def choose_label_set(cases: Sequence[Case], *, labels: str | None, label_set: str | None,
                     prompt: str | None) -> LabelSet:
    """--labels (a file or "a,b,c"), --label-set NAME, or the data's own labels; every target
    must be one of them (compared exactly, then ignoring case, which the target then takes)."""
    if label_set is not None:
        if label_set not in LABEL_SET_NAMES:
            raise UsageError(f"Unknown --label-set '{label_set}': choose one of {', '.join(LABEL_SET_NAMES)}.")
        return load_label_set(label_set)
    if labels is not None:
        return custom_label_set(labels, prompt)
    return data_label_set(cases, prompt)


def align_targets(cases: Sequence[Case], label_set: LabelSet) -> list[Case]:
    """Cases whose targets are spelled as in the label set; a target not in it is a usage error."""
    exact = set(label_set.labels)
    folded: dict[str, str] = {}
    for label in label_set.labels:
        folded.setdefault(label.casefold(), label)
    out = []
    for case in cases:
        label = case.target if case.target in exact else folded.get(case.target.casefold())
        if label is None:
            raise UsageError(f"{case.row}: the label {case.target!r} is not in the label set "
                             f"'{label_set.name}' ({_preview(label_set.labels)}).")
        out.append(replace(case, targets=(label,)))
    return out


def _preview(labels: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in labels[:n])
    return shown + (f" and {len(labels) - n} more" if len(labels) > n else "")


def check_questions(cases: Sequence[Case]) -> None:
    """A question without words is a usage error naming its row, found before the model loads."""
    for case in cases:
        try:
            question_prompt(case.question or "")
        except UsageError as err:
            raise UsageError(f"{case.row}: {err}") from None


def case_job(job: Job, case: Case) -> Job:
    """The job for one case: ask puts the case's question in; the others use the job as is."""
    if job.task != "ask":
        return job
    return replace(job, questions=(case.question,), prompts=(question_prompt(case.question),))


# ---- running the cases ------------------------------------------------------------------------


def case_units(job: Job, cases: Sequence[Case]) -> list:
    """Each case as a unit of work for a runner: its video, and its job (case_job)."""
    from malmm_cli.engine.session import Unit

    return [Unit(case.video, case_job(job, case)) for case in cases]


def run_cases(session, job: Job, cases: Sequence[Case], runner=None) -> Iterator[tuple[Case, dict[str, Any]]]:
    """(case, its record) for every case, as each finishes, through `runner` (runs/runners.py:
    OneByOne, the default; Lockstep(n); OnRay(...)). An unreadable video is its case's error
    record; an interrupt is never swallowed."""
    import contextlib

    from malmm_cli.runs.runners import OneByOne

    runner = runner or OneByOne()
    with contextlib.closing(runner.run(session, case_units(job, cases))) as outcomes:
        for i, outcome in outcomes:
            yield cases[i], case_record(cases[i], job.task, outcome)


def case_record(case: Case, task: str, outcome) -> dict[str, Any]:
    """A case's record from its outcome: a Result's prediction, or an ErrorResult's sentence."""
    from malmm_cli.results.records import ErrorResult

    if isinstance(outcome, ErrorResult):
        return error_record(case, outcome.error)
    return prediction_record(case, task, outcome)


def _head(case: Case) -> dict[str, Any]:
    head: dict[str, Any] = {"input": case.video, "index": case.index}
    if case.question is not None:
        head["question"] = case.question
    return head


def error_record(case: Case, message: str) -> dict[str, Any]:
    return {**_head(case), "error": message}


def prediction_record(case: Case, task: str, result) -> dict[str, Any]:
    """What a Result says about a case, with what the metrics need to score it later."""
    record = _head(case)
    if task == "classify":
        ranked = [score.label for score in result.labels]
        record.update(target=case.target, prediction=ranked[0], correct=ranked[0] == case.target,
                      rank=ranked.index(case.target) + 1 if case.target in ranked else None,
                      top5=[{"label": s.label, "score": s.score} for s in result.labels[:TOP_K]])
    elif task == "ask":
        answer = result.answers[0].answer
        record.update(target=case.target, prediction=answer, correct=exact_match(answer, case.target),
                      first_word_correct=first_word_match(answer, case.target))
    else:
        record.update(references=list(case.targets), prediction=result.text)
    if result.made_by is not None:  # what made it: a results file may mix runs (--resume)
        record.update(result.made_by.fields())
    if result.warnings:
        record["warnings"] = list(result.warnings)
    return record


def record_matches(record: dict, case: Case, task: str) -> bool:
    """Whether a kept record (--resume) is this very case: same row, video, question and
    target(s). A data file edited since is redone where it changed, never mis-scored."""
    if record.get("index") != case.index or record.get("input") != case.video or "prediction" not in record:
        return False
    if record.get("question") != case.question:
        return False
    if task == "caption":
        return record.get("references") == list(case.targets)
    return record.get("target") == case.target


# ---- metrics --------------------------------------------------------------------------------


def exact_match(prediction: str, target: str) -> bool:
    """As the official QA eval: the text as generated (spaces trimmed) equals the answer."""
    return prediction.strip() == target.strip()


def first_word_match(prediction: str, target: str) -> bool:
    """As the official MSRVTT-QA / MSVD-QA eval: the answer's first word (split on a space)
    equals the ground truth, which is a single word there."""
    return prediction.strip().split(" ")[0] == target.strip()


def classify_metrics(records: Sequence[dict], labels: Sequence[str]) -> dict[str, Any]:
    """Top-1, top-5, per-class accuracy (by true label) and the confusion matrix
    (rows: true label, columns: predicted, in label-set order)."""
    at = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for r in records:
        matrix[at[r["target"]]][at[r["prediction"]]] += 1
    n = len(records)
    top1 = sum(r["prediction"] == r["target"] for r in records)
    top5 = sum(r.get("rank") is not None and r["rank"] <= TOP_K for r in records)
    per_class = {}
    for label in labels:
        row = matrix[at[label]]
        if sum(row):
            per_class[label] = {"n": sum(row), "accuracy": _ratio(row[at[label]], sum(row))}
    return {"accuracy": _ratio(top1, n), "top5": _ratio(top5, n), "per_class": per_class,
            "confusion": {"labels": list(labels), "matrix": matrix}}


def ask_metrics(records: Sequence[dict]) -> dict[str, Any]:
    n = len(records)
    return {"accuracy": _ratio(sum(r["correct"] for r in records), n),
            "first_word_accuracy": _ratio(sum(r["first_word_correct"] for r in records), n)}


_PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", '"', "(", ")", "[", "]", "{", "}", ".", "?", "!", ",", ":",
                              "-", "--", "...", ";"])
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'\w+|\w+(?:[-.'/]\w+)*|\.\.\.|--|\S")


def caption_tokens(text: str) -> str:
    """The caption as pycocoevalcap's PTB tokenizer leaves it, without Java: lowercased,
    clitics split off ("don't" -> "do n't", "man's" -> "man 's"), punctuation dropped, tokens
    joined by spaces. For plain English captions this matches the Stanford tokenizer."""
    text = _CLITIC.sub(r" \1", text.lower().replace("\n", " "))
    return " ".join(t for t in _TOKEN.findall(text) if t not in _PTB_PUNCTUATION)


def caption_metrics(records: Sequence[dict]) -> dict[str, Any]:
    """Corpus CIDEr-D and BLEU-4 (pycocoevalcap's scorers, the official eval's), on 0-1 scale
    for BLEU and COCO's for CIDEr (its x10), as papers report them before x100."""
    if not records:
        return {"cider": None, "bleu4": None}
    Bleu, Cider = caption_scorers()
    refs = {i: [caption_tokens(t) for t in r["references"]] for i, r in enumerate(records)}
    hyps = {i: [caption_tokens(r["prediction"])] for i, r in enumerate(records)}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    cider, _ = Cider().compute_score(refs, hyps)
    return {"cider": round(float(cider), 6), "bleu4": round(float(bleu[3]), 6)}


def caption_scorers():
    """pycocoevalcap's Bleu and Cider classes, or a usage error saying how to install it."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise UsageError("Caption scores (CIDEr, BLEU-4) need pycocoevalcap: "
                         f"pip install 'malmm[{CAPTION_EXTRA}]' (or pip install pycocoevalcap).") from None
    return Bleu, Cider


def _ratio(k: int, n: int) -> float | None:
    return round(k / n, 6) if n else None


# ---- the report -----------------------------------------------------------------------------


@dataclass
class EvalReport:
    """The final record of an eval: `accuracy` and `n` at top level (accuracy is None for
    captions, whose scores are `cider` and `bleu4`), the task's metrics, and the per-case
    records it was computed from (not part of to_record())."""

    task: str
    n: int  # cases scored (caption: videos)
    errors: int  # cases whose video failed
    accuracy: float | None
    metrics: dict[str, Any]
    records: list[dict] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)  # data file, model, label set, ...

    def to_record(self) -> dict[str, Any]:
        return {"task": self.task, "n": self.n, "errors": self.errors, "accuracy": self.accuracy,
                **{k: v for k, v in self.metrics.items() if k != "accuracy"}, **self.extra}


def report(task: str, records: Iterable[dict], *, labels: Sequence[str] = (), errors: int = 0,
           extra: dict | None = None) -> EvalReport:
    """Metrics over the prediction records (error records are counted, not scored)."""
    records = list(records)
    scored = [r for r in records if "error" not in r]
    errors += len(records) - len(scored)
    if task == "classify":
        metrics = classify_metrics(scored, labels)
    elif task == "ask":
        metrics = ask_metrics(scored)
    else:
        metrics = {"accuracy": None, **caption_metrics(scored)}
    return EvalReport(task, len(scored), errors, metrics["accuracy"], metrics, records, dict(extra or {}))


# ---- jobs -----------------------------------------------------------------------------------


def check_options(task: str, *, labels: str | None, label_set: str | None, prompt: str | None) -> None:
    """Options that contradict the task, found before the data file is read."""
    columns(task)
    if task != "classify" and (labels is not None or label_set is not None):
        raise UsageError("--labels and --label-set are for --task classify.")
    if labels is not None and label_set is not None:
        raise UsageError("Give --labels or --label-set, not both.")
    if task == "ask" and prompt:
        raise UsageError("--prompt is not used by --task ask: each row's question is the prompt.")
    if label_set is not None and prompt:
        raise UsageError("--prompt goes with --labels or the data's labels; built-in label sets use the "
                         "paper's prompt.")


def plan(task: str, items: Sequence[Item], model_label: str, *, labels: str | None = None,
         label_set: str | None = None, prompt: str | None = None, **options) -> tuple[Job, list[Case]]:
    """The job (task defaults + `options`: fps, frames, memory, beams, max_tokens, as
    engine.jobs.build_job takes them) and the checked cases. Everything a user can get wrong in
    the data or options is found here, before a model loads."""
    from malmm_cli.engine.jobs import build_job

    check_options(task, labels=labels, label_set=label_set, prompt=prompt)
    cases = cases_for(items, task)
    if task == "caption":
        caption_scorers()  # missing pycocoevalcap is found before hours of captioning
        return build_job("caption", model_label, prompt=prompt, **options), cases
    if task == "ask":
        check_questions(cases)
        return build_job("ask", model_label, questions=(), **options), cases
    chosen = choose_label_set(cases, labels=labels, label_set=label_set, prompt=prompt)
    cases = align_targets(cases, chosen)
    # build_job resolves sampling, memory and generation for classify; its label set is
    # replaced by the chosen one, and every label is ranked so each record has the target's rank.
    job = build_job("classify", model_label, labels="-,+", **options)
    return replace(job, label_set=chosen, top_k=len(chosen.labels)), cases


def evaluate(model, items: Sequence[Item], task: str, *, labels: str | None = None, label_set: str | None = None,
             prompt: str | None = None, frames: int | None = None, fps: float | None = None,
             memory: int | None = None, beams: int | None = None, max_tokens: int | None = None,
             cache=None, model_id: str | None = None, batch: int = 1,
             on_record: Callable[[dict], None] | None = None) -> EvalReport:
    """Evaluate a loaded MALMM on data items (dataset.load_dataset) without the CLI.

    Options default to the task presets, and a finetuned checkpoint's own frame count and
    memory length apply where none is given, as in the CLI. `cache` is an optional
    features.FeatureCache: the ViT then runs once per video across cases and runs. Its
    entries are keyed by `model_id`, which must change when the vision weights do (default:
    the model's name and overlaid checkpoint, right unless the ViT was changed in memory).
    `batch` > 1 reads that many videos at a time in lockstep (as `malmm eval --batch`).
    `on_record` is called with each case's record as it finishes.
    """
    from malmm_cli.engine.session import Session
    from malmm_cli.runs.command import CommonOptions, validate

    opts = CommonOptions(frames=frames, fps=fps, memory=memory, beams=beams, max_tokens=max_tokens, batch=batch)
    validate(opts)
    session = Session.from_model(model, model_id=model_id, cache=cache)
    job, cases = plan(task, items, session.label, labels=labels, label_set=label_set, prompt=prompt,
                      **opts.job_options())
    job = session.resolve(job)  # the model is loaded: its tokenizer checks the labels (Session.resolve)
    records = []
    for _, record in run_cases(session, job, cases, opts.runner()):
        records.append(record)
        if on_record is not None:
            on_record(record)
    return report(task, records, labels=job.label_set.labels if job.label_set else (),
                  extra=job_summary(job))


def job_summary(job: Job) -> dict[str, Any]:
    """How the cases were run, for the final record: sampling, memory, label set."""
    out: dict[str, Any] = {"memory": job.memory}
    out["frames" if job.frames is not None else "fps"] = job.frames if job.frames is not None else job.fps
    if job.label_set is not None:
        out["label_set"] = job.label_set.name
        out["labels"] = len(job.label_set.labels)
    return out
