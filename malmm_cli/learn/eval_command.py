"""`malmm eval DATA --task classify|ask|caption`, from its options to the exit code: score the
model on a labelled data file (the command's options: cli/eval.py).

Per-case predictions go to `-o FILE` (JSON Lines) as each case finishes, under the same rules
as the batch commands' results (results/outputs.py: never clobbered, one writer,
--resume/--overwrite, Ctrl-C keeps everything); the final record goes to stdout (a table, or
one JSON line with --json) and, with -o, to FILE's name with the suffix .summary.json. The
scoring itself is evaluate.py's. The cases run through the batch commands' runners
(runs/runners.py: one by one, --batch lockstep, --ray workers); this process writes every
record and computes the metrics.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from malmm_cli.errors import MalmmError, UsageError
from malmm_cli.messages import plural

from malmm_cli.results.records import to_json
from malmm_cli.terminal import shown

SUMMARY_SUFFIX = ".summary.json"  # where the final record goes, beside the predictions file
SHOWN_CLASSES = 20  # the per-class table on a terminal; --json and the summary file hold all
SHOWN_MATRIX = 12  # the confusion matrix is printed whole up to this many columns, else its largest cells


# ---- the run ----------------------------------------------------------------------------------


def with_preset(opts, task: str, preset: str | None):
    """--preset NAME (caption): a data set's official decoding where --max-tokens and
    --min-tokens leave it (learn/recipe.py's CAPTION_PRESETS)."""
    if preset is None:
        return opts
    from dataclasses import replace

    from .recipe import CAPTION_PRESETS

    if task != "caption" or preset not in CAPTION_PRESETS:
        raise UsageError(f"--preset is for --task caption: one of {', '.join(CAPTION_PRESETS)}.")
    generation = CAPTION_PRESETS[preset].generation
    return replace(opts, max_tokens=opts.max_tokens or generation.max_new_tokens,
                   min_tokens=generation.min_new_tokens if opts.min_tokens is None else opts.min_tokens)


def run_eval(data: Path, task: str, opts, *, labels=None, label_set=None, prompt=None, scoring=None,
             label_score=None, preset=None) -> int:
    """The command: exit code 0 (all scored), 1 (some cases failed, or the model did not load),
    2 (usage), 130/143 (interrupted; the predictions so far are kept)."""
    from malmm_cli.engine.presets import resolve_model
    from malmm_cli.interrupts import exit_code, sigterm_as_interrupt
    from malmm_cli.messages import error, setup_logging
    from malmm_cli.runs.command import check_environment, validate

    from .dataset import check_videos, load_dataset
    from .evaluate import check_options, plan

    setup_logging(opts.quiet)
    output = None
    try:
        opts = with_preset(opts, task, preset)
        validate(opts)
        if sys.stdout is None and opts.output is None:  # started with `>&-`: the final record would be lost
            raise UsageError("Standard output is closed, so results have nowhere to go; give -o FILE.")
        check_options(task, labels=labels, label_set=label_set, prompt=prompt, scoring=scoring,
                      label_score=label_score)
        choice = resolve_model(opts.model)
        items = load_dataset(data, task)
        check_videos(items)  # one policy with train: a missing video is a mistake in the data file
        trained = _trained(opts, choice)
        job, cases = plan(task, items, choice.label, labels=labels, label_set=label_set, prompt=prompt,
                          scoring=scoring, label_score=label_score, trained=trained, **opts.job_options())
        check_environment(opts)
        output = _output(task, data, cases, opts)
        summary = _claim_summary(opts.output, data, cases) if opts.output is not None else None
    except MalmmError as err:
        error(str(err))
        return err.exit_code
    except OSError as err:  # a path the system refuses (a name over 255 bytes, a loop of links)
        from malmm_cli.errors import os_error_sentence

        error(os_error_sentence(err))
        return 2
    with sigterm_as_interrupt() as fired:
        try:
            return _claim_and_run(choice, job, cases, data, output, summary, opts)
        except MalmmError as err:
            error(str(err))
            return err.exit_code
        except KeyboardInterrupt as stop:
            where = f" in {shown(str(output.path))}" if output is not None else ""
            kept = output.written if output is not None else 0
            sys.stderr.write(f"malmm: interrupted; {plural(kept, 'prediction')} kept{where}\n")
            return exit_code(stop, fired)
        finally:
            if output is not None:
                output.close()


def _trained(opts, choice):
    """The --checkpoint's TrainedConfig, read from its config alone (no weights), or None."""
    from models import ModelError

    from malmm_cli.engine.session import Session

    try:
        return Session(opts.session_options(), choice=choice).trained_config()
    except ModelError as err:  # not a readable checkpoint: the sentence loading it would give
        raise UsageError(str(err)) from None


def _output(task: str, data: Path, cases, opts):
    """The predictions file (outputs.py's rules), or None without -o: nothing may overwrite the
    data file or a video."""
    if opts.output is None:
        return None
    from malmm_cli.results.outputs import Output

    return Output(task, opts.output, "json", True, [str(data), *dict.fromkeys(c.video for c in cases)])


def summary_path(output: Path) -> Path:
    """preds.jsonl -> preds.summary.json."""
    return output.with_suffix(SUMMARY_SUFFIX)


def _claim_summary(output: Path, data: Path, cases) -> Path | None:
    """Where the final record goes, checked before the model loads: a file there must be the
    summary malmm wrote there, unchanged since (written.py), never the data or a video. One
    written before malmm kept records is recognised by its content (a JSON object naming its
    predictions file). None when the predictions go to a device (/dev/null)."""
    if output.exists() and not output.is_file():
        return None
    path = summary_path(output)
    if not path.exists():
        return path
    from malmm_cli.results.outputs import input_ids
    from malmm_cli.results.written import Record, file_content

    st = os.stat(path)
    ours = False
    if (st.st_dev, st.st_ino) not in input_ids([str(data), *(c.video for c in cases)]) and path.is_file():
        record = Record(path, "summary")
        if st.st_size == 0:
            ours = True
        elif record.exists:
            ours = record.holds(file_content(path))
        else:
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
                ours = isinstance(old, dict) and {"task", "n", "predictions"} <= old.keys()
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                ours = False
    if not ours:
        raise UsageError(f"{path} exists and is not an eval summary written by malmm; move it away or choose "
                         "another --output name.")
    return path


def eval_job_key(job, choice, opts) -> str:
    """The job key of an eval (jobkey.py), apart from a batch command's key for the same job:
    what each row asks (its question, its target) is checked record by record."""
    import hashlib

    from malmm_cli.results.jobkey import JOB_KEY_HEX, job_key

    base = job_key(job, choice, opts.checkpoint)
    return hashlib.sha256(f"eval|{base}".encode()).hexdigest()[:JOB_KEY_HEX]


def _kept(output, cases, task: str) -> dict[int, dict]:
    """--resume: the records of this job that are still the data's cases, by case index."""
    from .evaluate import record_matches

    by_index = {c.index: c for c in cases}
    kept = {}
    for record in output.kept_records():
        case = by_index.get(record.get("index"))
        if case is not None and record_matches(record, case, task):
            kept[case.index] = record
    return kept


def _claim_and_run(choice, job, cases, data: Path, output, summary: Path | None, opts) -> int:
    from .evaluate import report

    kept: dict[int, dict] = {}
    if output is not None:
        mode = "resume" if opts.resume else "overwrite" if opts.overwrite else "new"
        output.claim(mode, eval_job_key(job, choice, opts))
        if opts.resume:
            kept = _kept(output, cases, job.task)
    todo = [c for c in cases if c.index not in kept]
    if kept and not opts.quiet:
        sys.stderr.write(f"malmm: --resume: {plural(len(kept), 'case')} already done, {len(todo)} to go\n")
    records: dict[int, dict] = dict(kept)
    failures = 0
    if todo:
        from malmm_cli.runs.command import open_session

        session = open_session(opts, len(todo), job)
        if session is None:
            return 1
        failures = _run_cases(session, job, todo, output, records, opts.runner())
        job = session.resolve(job)  # the frames and memory the cases ran with, for the final record
    labels = job.label_set.labels if job.label_set is not None else ()
    final = report(job.task, [records[i] for i in sorted(records)], labels=labels,
                   extra=_extra(job, choice, data, opts))
    record = final.to_record()
    if summary is not None:
        _write_summary(summary, record)
    _print(record, opts, data)
    if output is not None and not opts.quiet:
        sys.stderr.write(f"malmm: {plural(final.n, 'prediction')} in {shown(str(output.path))}"
                         + (f"; {plural(failures, 'case')} failed" if failures else "")
                         + (f"; final record in {shown(str(summary))}" if summary else "") + "\n")
    return 1 if failures else 0


def _run_cases(session, job, todo, output, records: dict[int, dict], runner) -> int:
    """Run the cases through `runner`, each record written as it finishes; returns how many
    failed."""
    from .evaluate import run_cases

    failures = 0
    if output is not None:
        output.open()
    try:
        for case, record in run_cases(session, job, todo, runner):
            failures += _keep(case, record, output, records)
    except KeyboardInterrupt:
        session.events.close()
        raise
    return failures


def _keep(case, record: dict, output, records: dict[int, dict]) -> bool:
    """One case's record: said on stderr if it failed (and its warnings), written to the
    predictions file, kept for the metrics. True if the case failed."""
    from malmm_cli.messages import error, log

    if "error" in record:
        error(f"{case.row}: {record['error']}", about=case.video)
    for warning in record.get("warnings", ()):
        log.warning("%s: %s", case.video, warning)
    if output is not None:
        output.write_record(record)
    records[case.index] = record
    return "error" in record


def _extra(job, choice, data: Path, opts) -> dict:
    from .evaluate import job_summary

    extra = {"data": str(Path(data).expanduser().resolve()), "model": choice.label}
    if opts.checkpoint is not None:
        extra["checkpoint"] = str(opts.checkpoint)
    extra.update(job_summary(job))
    if opts.output is not None:
        extra["predictions"] = str(Path(opts.output).expanduser().resolve())
    return extra


def _write_summary(path: Path, record: dict) -> None:
    """Replaced whole (a temporary file renamed over it): a reader never sees half a record;
    its content recorded (written.py), so the next run may replace it."""
    from malmm_cli.results.written import replace_file

    try:
        replace_file(path, lambda tmp: tmp.write_text(to_json(record) + "\n", encoding="utf-8"), "summary")
    except OSError as e:
        sys.stderr.write(f"malmm: warning: the final record could not be written to {path} "
                         f"({(e.strerror or type(e).__name__).lower()}); it is printed above.\n")


# ---- the final record on stdout ------------------------------------------------------------------


def _print(record: dict, opts, data: Path) -> None:
    if sys.stdout is None:
        return  # stdout closed: the final record is in FILE.summary.json (checked before the run)
    if opts.json_:
        sys.stdout.write(to_json(record) + "\n")
        sys.stdout.flush()
        return
    from rich.console import Console

    from rich.text import Text

    console = Console(file=sys.stdout, highlight=False)
    # The data file as it was given (the record holds its absolute path).
    console.print(Text(shown(f"{record['task']}: {data} ({record['model']})"), style="bold"))
    for table in _tables(record):
        console.print(table)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _tables(record: dict) -> list:
    """The metrics table; for classify the per-class accuracy (the most frequent classes) and
    the confusion matrix; the notes (a caption score left out, and why)."""
    from rich.table import Table

    task = record["task"]
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0), pad_edge=False)
    table.add_column()
    table.add_column(justify="right")
    table.add_row("videos scored" if task == "caption" else "items scored", str(record["n"]))
    if record["errors"]:
        table.add_row("failed", str(record["errors"]))
    if task == "classify":
        table.add_row("top-1 accuracy", _pct(record["accuracy"]))
        table.add_row("top-5 accuracy", _pct(record["top5"]))
    elif task == "ask":
        table.add_row("exact match", _pct(record["accuracy"]))
        table.add_row("first-word match", _pct(record["first_word_accuracy"]))
    else:
        for key, name in (("cider", "CIDEr"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("bleu4", "BLEU-4"),
                          ("bleu1", "BLEU-1")):
            table.add_row(name, "-" if record.get(key) is None else f"{100 * record[key]:.1f}")
        if record.get("tokenizer"):
            table.add_row("tokenizer", "PTB (Java)" if record["tokenizer"] == "ptb" else "approximate (no Java)")
    tables = [table]
    if task == "classify":
        tables.append("labels scored by " + ("generating 5 beams (the official eval)" if record.get("scoring") ==
                                             "generate" else f"likelihood, {record.get('label_score', 'sum')} over "
                                                             "their tokens"))
    if task == "classify" and record["per_class"]:
        tables += ["", _per_class(record["per_class"]), *_confusion(record["confusion"])]
    for note in record.get("notes", ()):
        tables += [f"note: {note}"]
    return tables


def _per_class(per_class: dict):
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, padding=(0, 2, 0, 0), pad_edge=False)
    table.add_column("class")
    table.add_column("n", justify="right")
    table.add_column("accuracy", justify="right")
    ranked = sorted(per_class.items(), key=lambda kv: (-kv[1]["n"], kv[0]))
    for label, stats in ranked[:SHOWN_CLASSES]:
        # A Text, not a str: Rich would take "[...]" in a label for markup; escaped for the terminal.
        table.add_row(Text(shown(label)), str(stats["n"]), _pct(stats["accuracy"]))
    if len(ranked) > SHOWN_CLASSES:
        table.add_row(f"... {len(ranked) - SHOWN_CLASSES} more (--json)", "", "")
    return table


def _in_use(labels: list, columns: list, matrix: list) -> tuple[list[int], list[int]]:
    """The matrix's rows and columns worth printing: the true labels the data has, and the
    labels that are true or predicted for some item (a set of 48 labels on 5 test items
    would otherwise print 48 rows of zeros)."""
    rows = [i for i, row in enumerate(matrix) if sum(row)]
    true = {labels[i] for i in rows}
    cols = [j for j, column in enumerate(columns) if column in true or any(matrix[i][j] for i in rows)]
    return rows, cols


def _confusion(confusion: dict) -> list:
    """The confusion matrix (rows: true label, columns: predicted) for a small label set; for a
    large one, the pairs most often confused (the whole matrix is in --json and the summary)."""
    from rich.table import Table
    from rich.text import Text

    labels, columns, matrix = confusion["labels"], confusion.get("columns", confusion["labels"]), confusion["matrix"]
    rows, cols = _in_use(labels, columns, matrix)
    if len(cols) <= SHOWN_MATRIX:
        table = Table(box=None, padding=(0, 2, 0, 0), pad_edge=False)
        table.add_column("", no_wrap=True)
        for j in cols:
            table.add_column(Text(shown(columns[j])), justify="right")
        for i in rows:
            table.add_row(Text(shown(labels[i])), *(str(matrix[i][j]) for j in cols))
        shown_all = len(rows) == len(labels) and len(cols) == len(columns)
        return ["", "confusion (rows: true, columns: predicted" + ("" if shown_all else
                "; labels no item has or got left out") + ")", table]
    pairs = sorted(((v, labels[i], columns[j]) for i, row in enumerate(matrix) for j, v in enumerate(row)
                    if v and labels[i] != columns[j]), key=lambda x: (-x[0], x[1], x[2]))[:SHOWN_CLASSES]
    if not pairs:
        return ["", "confusion: none (every item right)"]
    table = Table(box=None, padding=(0, 2, 0, 0), pad_edge=False)
    for name, justify in (("true", "left"), ("predicted", "left"), ("n", "right")):
        table.add_column(name, justify=justify)
    for n, true, predicted in pairs:
        table.add_row(Text(shown(true)), Text(shown(predicted)), str(n))
    return ["", "most confused (the whole matrix: --json)", table]
