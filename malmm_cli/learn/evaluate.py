"""Scoring the model on a labelled data file: one prediction record per case, then the metrics.

Three layers, so that each can be used (and run elsewhere) on its own:

- `plan` / `cases_for`: what to ask of every case, checked before any model loads.
- `run_cases(session, job, cases, runner)`: each case is a unit (its video, its job) for the
  batch commands' runners (runs/runners.py: one by one, lockstep, Ray workers) -> one record
  per case (a prediction, or an error with one sentence).
- `report(task, records, ...)`: the records -> an EvalReport (metrics only; no model).

`evaluate(model, items, task)` puts them together for Python users. The metrics are
metrics.py's and caption_metrics.py's, as the official MA-LMM evaluation computes them.

classify is scored one of two ways (`scoring`): "likelihood" ranks every label of the set by
the model's likelihood of answering it (as `malmm classify` does; `label_score` "sum" or
"mean" over the label's tokens), so every prediction is a label; "generate" is the official
eval: 5 beams generated, top-1 when beam 0 is the label exactly, top-5 when any beam is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from malmm_cli.engine.presets import TASK_DEFAULTS
from malmm_cli.engine.tasks import (LABEL_SET_NAMES, Job, LabelSet, check_labels, custom_label_set, label_set_name,
                                   load_label_set, official_label_set, question_prompt)
from malmm_cli.errors import UsageError

from .caption_metrics import caption_scores, scorers
from .dataset import Item, columns
from .metrics import TOP_K, ask_metrics, classify_metrics, exact_match, first_word_match

__all__ = ["Case", "cases_for", "plan", "run_cases", "report", "evaluate", "EvalReport", "classify_metrics",
           "ask_metrics", "exact_match", "first_word_match", "caption_scores", "TOP_K"]


# ---- cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One scored unit. classify and ask: one data row. caption: one video, its references being
    the captions of all rows naming it (MSRVTT has 20 per video; CIDEr is built for many)."""

    index: int  # the row index of the data item (caption: of the video's first row)
    video: str  # where to read it (an absolute path, or a URL)
    targets: tuple[str, ...]
    question: str | None = None
    spec: str = ""  # the video as the data file writes it (what records show)
    where: str = ""  # "FILE, line N" of its (first) row: how messages name it

    @property
    def shown(self) -> str:
        return self.spec or self.video

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
        return [Case(i.index, i.video, (i.target,), i.question, i.shown, i.where) for i in items]
    refs: dict[str, list[str]] = {}
    first: dict[str, Item] = {}
    for item in items:
        refs.setdefault(item.video, []).append(item.target)
        first.setdefault(item.video, item)
    return [Case(first[v].index, v, tuple(r), spec=first[v].shown, where=first[v].where) for v, r in refs.items()]


def data_label_set(cases: Sequence[Case], prompt: str | None = None) -> LabelSet:
    """The distinct labels of the data, sorted: the label set when none is given."""
    labels = tuple(sorted({c.target for c in cases}))
    if len(labels) < 2:
        raise UsageError(f"The data has only one label ({labels[0]!r}); classification needs at least two: "
                         "add rows or give the label set with --labels or --label-set.")
    check_labels(labels, "The data's label set")
    return LabelSet("data", prompt or TASK_DEFAULTS["classify"].prompt, labels)


def choose_label_set(cases: Sequence[Case], *, labels: str | None, label_set: str | None,
                     prompt: str | None, trained=None) -> LabelSet:
    """--labels (a file or "a,b,c"), --label-set NAME, else a --checkpoint's own label set (the
    set it names, or the labels it was trained on), else the data's labels. The prompt: --prompt,
    else the checkpoint's, else the set's. Every target must be one of the labels (compared
    exactly, then ignoring case, which the target then takes: align_targets)."""
    if label_set is not None:
        if label_set not in LABEL_SET_NAMES:
            raise UsageError(f"Unknown --label-set '{label_set}': choose one of {', '.join(LABEL_SET_NAMES)}.")
        return load_label_set(label_set)
    learnt = None if trained is None else trained.prompt
    if labels is not None:
        chosen = custom_label_set(labels, prompt)
    else:
        name = None if trained is None else trained.label_set or official_label_set(trained)
        if name is not None:
            chosen = load_label_set(name)
            learnt = learnt or chosen.prompt
        elif trained is not None and trained.labels and len(trained.labels) >= 2:
            chosen = LabelSet("checkpoint", TASK_DEFAULTS["classify"].prompt, tuple(trained.labels))
        else:
            chosen = data_label_set(cases, prompt)
        if chosen.name != "data" and not _covers(chosen, cases):
            from malmm_cli.messages import log

            log.warning("the data has labels outside the label set the checkpoint was trained on (%s); scoring the "
                        "data's own labels, with the prompt it learnt", label_set_name(chosen))
            chosen = data_label_set(cases, prompt)
    return replace(chosen, prompt=prompt or learnt or chosen.prompt)


def _covers(label_set: LabelSet, cases: Sequence[Case]) -> bool:
    folded = {label.casefold() for label in label_set.labels}
    return all(c.target.casefold() in folded for c in cases)


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
            hint = " (the labels the checkpoint was trained on; give --labels to score others)" if (
                label_set.name == "checkpoint") else ""
            raise UsageError(f"{case.row}: the label {case.target!r} is not in the label set "
                             f"'{label_set.name}' ({_preview(label_set.labels)}){hint}.")
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
    head: dict[str, Any] = {"input": case.shown, "index": case.index}
    if case.question is not None:
        head["question"] = case.question
    return head


def error_record(case: Case, message: str) -> dict[str, Any]:
    return {**_head(case), "error": message}


def prediction_record(case: Case, task: str, result) -> dict[str, Any]:
    """What a Result says about a case, with what the metrics need to score it later."""
    record = _head(case)
    record["prompt"] = result.answers[0].prompt if task == "ask" else result.prompt
    if task == "classify" and result.beams is not None:  # generated: the official match on 5 beams
        beams = list(result.beams)
        record.update(target=case.target, prediction=beams[0], correct=beams[0] == case.target,
                      rank=beams.index(case.target) + 1 if case.target in beams else None, beams=beams)
    elif task == "classify":
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
    if record.get("index") != case.index or record.get("input") != case.shown or "prediction" not in record:
        return False
    if record.get("question") != case.question:
        return False
    if task == "caption":
        return record.get("references") == list(case.targets)
    return record.get("target") == case.target


# ---- the report -----------------------------------------------------------------------------


@dataclass
class EvalReport:
    """The final record of an eval: `accuracy` and `n` at top level (accuracy is None for
    captions, whose scores are `cider`, `meteor`, `bleu1`..`bleu4` and `rouge_l`), the task's metrics, and the per-case
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
        metrics = {"accuracy": None, **caption_scores(scored)}
    return EvalReport(task, len(scored), errors, metrics["accuracy"], metrics, records, dict(extra or {}))


# ---- jobs -----------------------------------------------------------------------------------


def check_options(task: str, *, labels: str | None, label_set: str | None, prompt: str | None,
                  scoring: str | None = None, label_score: str | None = None) -> None:
    """Options that contradict the task, found before the data file is read."""
    columns(task)
    if task != "classify" and (labels is not None or label_set is not None):
        raise UsageError("--labels and --label-set are for --task classify.")
    if task != "classify" and (scoring is not None or label_score is not None):
        raise UsageError("--scoring and --label-score are for --task classify.")
    if scoring == "generate" and label_score is not None:
        raise UsageError("--label-score sets how likelihood scoring ranks labels; --scoring generate matches "
                         "generated text instead.")
    if labels is not None and label_set is not None:
        raise UsageError("Give --labels or --label-set, not both.")
    if task == "ask" and prompt:
        raise UsageError("--prompt is not used by --task ask: each row's question is the prompt.")
    if label_set is not None and prompt:
        raise UsageError("--prompt goes with --labels or the data's labels; built-in label sets use the "
                         "paper's prompt.")


def plan(task: str, items: Sequence[Item], model_label: str, *, labels: str | None = None,
         label_set: str | None = None, prompt: str | None = None, scoring: str | None = None,
         label_score: str | None = None, trained=None, **options) -> tuple[Job, list[Case]]:
    """The job (task defaults + `options`: fps, frames, memory, beams, max_tokens, min_tokens,
    concat, as engine.jobs.build_job takes them) and the checked cases. `trained`: a
    checkpoint's TrainedConfig (its label set and prompt are the defaults). Everything a user
    can get wrong in the data or options is found here, before a model loads."""
    from malmm_cli.engine.jobs import build_job

    check_options(task, labels=labels, label_set=label_set, prompt=prompt, scoring=scoring, label_score=label_score)
    cases = cases_for(items, task)
    if task == "caption":
        scorers()  # missing pycocoevalcap is found before hours of captioning
        return build_job("caption", model_label, prompt=prompt, **options), cases
    if task == "ask":
        check_questions(cases)
        return build_job("ask", model_label, questions=(), **options), cases
    chosen = choose_label_set(cases, labels=labels, label_set=label_set, prompt=prompt, trained=trained)
    cases = align_targets(cases, chosen)
    # build_job resolves sampling, memory and generation for classify; its label set is
    # replaced by the chosen one (labels and prompt are settled: nothing left for the
    # checkpoint to fill in), and every label is ranked so each record has the target's rank.
    job = build_job("classify", model_label, labels="-,+", prompt=chosen.prompt, scoring=scoring,
                    label_score=label_score, label_task=None, **options)
    if job.scoring == "generate" and "max_tokens" in job.trained_defaults:
        from malmm_cli.engine.tasks import classify_generation

        job = replace(job, generation=replace(job.generation, max_new_tokens=classify_generation(
            chosen.name).max_new_tokens))
    kept = tuple(d for d in job.trained_defaults if d not in ("labels", "prompt", "max_tokens"))
    return replace(job, label_set=chosen, top_k=len(chosen.labels), trained_defaults=kept), cases


def evaluate(model, items: Sequence[Item], task: str, *, labels: str | None = None, label_set: str | None = None,
             prompt: str | None = None, frames: int | None = None, fps: float | None = None,
             memory: int | None = None, beams: int | None = None, max_tokens: int | None = None,
             scoring: str | None = None, label_score: str | None = None, concat: bool = False,
             cache=None, model_id: str | None = None, batch: int = 1,
             on_record: Callable[[dict], None] | None = None) -> EvalReport:
    """Evaluate a loaded MALMM on data items (dataset.load_dataset) without the CLI.

    Options default to the task presets, and a finetuned checkpoint's own frame count, memory
    length, label set and prompt apply where none is given, as in the CLI. `cache` is an
    optional features.FeatureCache: the ViT then runs once per video across cases and runs. Its
    entries are keyed by `model_id`, which must change when the vision weights do (default:
    the model's name and overlaid checkpoint, right unless the ViT was changed in memory).
    `batch` > 1 reads that many videos at a time in lockstep (as `malmm eval --batch`).
    `on_record` is called with each case's record as it finishes.
    """
    from malmm_cli.engine.session import Session
    from malmm_cli.runs.command import CommonOptions, validate

    opts = CommonOptions(frames=frames, fps=fps, memory=memory, beams=beams, max_tokens=max_tokens, batch=batch,
                         concat=concat)
    validate(opts)
    session = Session.from_model(model, model_id=model_id, cache=cache)
    job, cases = plan(task, items, session.label, labels=labels, label_set=label_set, prompt=prompt, scoring=scoring,
                      label_score=label_score, trained=model.trained_config, **opts.job_options())
    job = session.resolve(job)  # the model is loaded: its tokenizer checks the labels (Session.resolve)
    records = []
    for _, record in run_cases(session, job, cases, opts.runner()):
        records.append(record)
        if on_record is not None:
            on_record(record)
    return report(task, records, labels=job.label_set.labels if job.label_set else (),
                  extra=job_summary(job))


def job_summary(job: Job) -> dict[str, Any]:
    """How the cases were run, for the final record: the prompt, sampling, memory (or the
    no-memory baseline), and for classify the label set and how labels were scored."""
    out: dict[str, Any] = {"prompt": job.prompt, "memory": job.memory}
    if job.concat:
        out["concat"] = True
    out["frames" if job.frames is not None else "fps"] = job.frames if job.frames is not None else job.fps
    if job.label_set is not None:
        out["label_set"] = job.label_set.name
        out["labels"] = len(job.label_set.labels)
        out["scoring"] = job.scoring
        if job.scoring == "likelihood":
            out["label_score"] = job.label_score
    return out
