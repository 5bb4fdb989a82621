"""The engine's one API, under every front end: a session is a loaded model plus resolved
options; it reads a source once and keeps it, and answers as the command line does.

    from malmm_cli.engine import Session
    from malmm_cli.runs import Lockstep

    session = Session.load("tiny-random", device="cpu")      # model, checkpoint, device, quant, cache
    job = session.job("ask", questions=["what is cooking?"], frames=20)
    result = session.analyze("talk.mp4", job)                 # one pass: the Result `malmm ask` writes
    video = session.read("talk.mp4", frames=20)               # decode + ViT once; features kept
    video.ask(["what is cooking?"]); video.caption(); video.summarize(every=60)   # no decode, no ViT
    for spec, outcome in session.run(["a.mp4", "b.mp4"], job, runner=Lockstep(8)):
        ...                                                   # Result or ErrorResult; the caller writes

The batch commands, eval, train's vision pass and the Ray workers all go through it (a Ray
worker builds its session from the picklable SessionOptions). Importing this module loads
neither torch nor the model: the model loads on first use, or at once with Session.load.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from malmm_cli.errors import MalmmError, UsageError
from malmm_cli.interrupts import reraise_interrupt
from malmm_cli.messages import log
from malmm_cli.results.events import Events
from malmm_cli.results.records import ErrorResult, Result
from malmm_cli.sources.inputs import VideoSource, cache_root, open_source

from .jobs import build_job, check_options, sampling_job
from .presets import ModelChoice, resolve_model
from .tasks import Job, label_set_name, trained_prompt_note, with_trained_defaults


@dataclass(frozen=True)
class SessionOptions:
    """What a session is made of, picklable: a Ray worker builds the same session from it."""

    model: str | None = None  # preset, local folder in the HF layout, or hub id; None: $MALMM_MODEL, else the default
    checkpoint: Path | None = None  # MA-LMM finetuned weights (.pth) overlaid on the model
    device: str = "auto"  # auto | cpu | cuda
    quant: str = "auto"  # auto | none | 8bit | 4bit: the LLM's precision
    cache: bool = True  # read and write the vision feature cache (under $MALMM_CACHE_DIR)
    quiet: bool = True  # no loading messages on stderr
    precision: str | None = None  # auto | fp32 | bf16 (presets.PRECISIONS); None: $MALMM_PRECISION, else auto
    confirm_download: bool = False  # a model not downloaded yet: ask first on a terminal, else refuse (the CLI)


@dataclass(frozen=True)
class Unit:
    """One piece of work for a runner (runs/): an input as the user spelled it, and its job."""

    input: str
    job: Job


_FROM_OPTIONS = object()  # a session's feature cache follows options.cache


def input_errors() -> tuple[type[BaseException], ...]:
    """What a failing input may raise: reported as its error record, and the batch goes on."""
    from models import ModelError

    return (MalmmError, ModelError, RuntimeError, ValueError, OSError)


def failure(err: BaseException) -> str:
    """The sentence for a failed input."""
    import traceback

    from models import ModelError

    if isinstance(err, (MalmmError, ModelError)):
        return str(err)
    log.debug("%s", traceback.format_exc())  # a bug or a resource problem: reported, the batch goes on
    return f"unexpected {type(err).__name__}: {err}"


def _opened(source: str | Path | VideoSource) -> VideoSource:
    """A path, URL or VideoSource as a VideoSource (a URL is downloaded once, into the cache)."""
    return source if isinstance(source, VideoSource) else open_source(str(source))


class Session:
    """A model with its options resolved once, and the feature cache and progress listener
    that go with it. Nothing loads until it is needed (:meth:`load` loads at once)."""

    def __init__(self, options: SessionOptions | None = None, *, events: Events | None = None,
                 choice: ModelChoice | None = None):
        self.options = options or SessionOptions()
        # What options.model names (a UsageError for an unknown name), unless the caller knows.
        self.choice: ModelChoice = choice or resolve_model(self.options.model)
        self._events = events or Events()
        self._model = None
        self._analyzer = None
        self._model_id: str | None = None  # None: from the model and options (loader.model_id)
        self._cache: Any = _FROM_OPTIONS  # from_model: the caller's FeatureCache or None
        self._labels_checked: set[tuple[str, ...]] = set()  # label sets within this model's token limit
        self._noted: set[str] = set()  # warnings already given (once per session, not per video)
        self._read_config = None  # the checkpoint's TrainedConfig, read before the model loads

    @classmethod
    def load(cls, model: str | None = None, *, checkpoint: str | Path | None = None, device: str = "auto",
             quant: str = "auto", cache: bool = True, quiet: bool = True, events: Events | None = None,
             precision: str | None = None) -> Session:
        """A session with its model loaded: `model` a preset (tiny-random, instructblip-vicuna-7b),
        a local folder or a hub id (default: $MALMM_MODEL, else instructblip-vicuna-7b);
        `precision` auto, fp32 or bf16 (default: $MALMM_PRECISION, else auto)."""
        options = SessionOptions(model, None if checkpoint is None else Path(checkpoint), device, quant, cache, quiet,
                                 precision)
        session = cls(options, events=events)
        session.model  # noqa: B018 - loads it now
        return session

    @classmethod
    def from_model(cls, model, *, model_id: str | None = None, cache=None, events: Events | None = None,
                   label: str | None = None) -> Session:
        """A session around a MALMM loaded in Python (MALMM.from_pretrained, learn.train).
        `cache` is a features.FeatureCache or None; its entries are keyed by `model_id`, which
        must change when the vision weights do (default: the model's name and overlaid
        checkpoint, right unless the ViT was changed in memory)."""
        checkpoint = model.overlay_report.path if model.overlay_report is not None else None
        options = SessionOptions(model.name, None if checkpoint is None else Path(checkpoint), str(model.device.type),
                                 str(model.quantization or "none"), cache is not None)
        session = cls(options, events=events, choice=ModelChoice(label or model.name or "python", model.name, None))
        session._model, session._model_id, session._cache = model, model_id, cache
        return session

    # ---- what it holds ----------------------------------------------------------------------

    @property
    def model(self):
        """The MALMM, loaded on first use (models.MALMM)."""
        if self._model is None:
            from .loader import load_model

            self._model = load_model(self.choice, self.options)
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def label(self) -> str:
        """How records name the model (the preset's name, the folder, the hub id)."""
        return self.choice.label

    @property
    def events(self) -> Events:
        """The progress listener (results.events.Events): the terminal view, a log, a front end."""
        return self._events

    @events.setter
    def events(self, listener: Events | None) -> None:
        self._events = listener or Events()
        if self._analyzer is not None:
            self._analyzer.events = self._events

    @property
    def analyzer(self):
        """The one-pass loop underneath (engine/analyze.py), made with the model on first use."""
        if self._analyzer is None:
            from .analyze import Analyzer
            from .loader import model_id

            model = self.model
            ident = self._model_id or model_id(self.choice, self.options, model)
            self._analyzer = Analyzer(model, ident, cache=self._feature_cache(), events=self._events)
        return self._analyzer

    def _feature_cache(self):
        if self._cache is not _FROM_OPTIONS:
            return self._cache
        if not self.options.cache:
            return None
        from .features import FeatureCache

        return FeatureCache(cache_root() / "features")

    # ---- jobs --------------------------------------------------------------------------------

    def job(self, task: str, **options) -> Job:
        """What `task` does with each video: its defaults (presets.py), the options given (fps,
        frames, start, end, memory, beams, max_tokens, and the task's own: questions, prompt,
        labels or label_task, top_k, every, scenes), and the checkpoint's trained frames and
        memory where those are not given."""
        check_options(**{k: options.get(k) for k in ("fps", "frames", "start", "end", "memory", "beams",
                                                      "max_tokens", "min_tokens") if options.get(k) is not None},
                      concat=bool(options.get("concat")))
        options.setdefault("checkpoint", self.options.checkpoint is not None or bool(
            self.loaded and self.model.overlay_report is not None))
        return self.resolve(build_job(task, self.label, **options))

    def resolve(self, job: Job) -> Job:
        """`job` with the checkpoint's trained frames and memory where it leaves them to the
        defaults. Before the model loads, the checkpoint's config is read alone (no weights).
        Once it has loaded, a classify job's labels are checked against its tokenizer too
        (check_labels): a UsageError, before the job reads any video."""
        if job.trained_defaults:
            job = with_trained_defaults(job, self.trained_config())
        note = trained_prompt_note(job, self.trained_config()) if job.task == "classify" else None
        if note is not None and note not in self._noted:
            self._noted.add(note)
            log.warning("%s", note)
        if job.label_set is not None and self.loaded:
            self.check_labels(job.label_set.labels, label_set_name(job.label_set))
        return job

    def check_labels(self, labels: Iterable[str], where: str) -> None:
        """Every label at most MAX_LABEL_TOKENS of this model's tokens (sources/textfiles.py),
        or a UsageError naming `where`: each label is scored whole, through the LLM. Their
        length in characters is checked before any model loads (tasks.check_labels); this
        needs the tokenizer, so it loads the model. Each label set is checked once."""
        labels = tuple(labels)
        if labels in self._labels_checked:
            return
        from malmm_cli.sources.textfiles import check_label_tokens

        check_label_tokens(self.model.tokenizer, labels, where)
        self._labels_checked.add(labels)

    def trained_config(self):
        """What the checkpoint says of its training (models.overlay.TrainedConfig), or None."""
        if self.loaded:
            return self.model.trained_config
        if self.options.checkpoint is None:
            return None
        if self._read_config is None:  # read once: every job's resolve asks
            from models.overlay import read_trained_config

            if not Path(self.options.checkpoint).is_file():
                raise UsageError(f"--checkpoint '{self.options.checkpoint}' does not exist.")
            self._read_config = read_trained_config(self.options.checkpoint)
        return self._read_config

    # ---- one input ---------------------------------------------------------------------------

    def analyze(self, source: str | Path | VideoSource, job: Job) -> Result:
        """One pass over `source` (a path, URL or VideoSource): decode + ViT, or the feature
        cache, then the memory streams and the LLM. Raises what the input raises."""
        source = _opened(source)
        return self.analyzer.run(source, self.resolve(job))

    def attempt(self, spec: str, job: Job, *, name: str | None = None) -> Result | ErrorResult:
        """analyze(spec, job), with a failing input as its ErrorResult (one sentence) instead of
        an exception. `name`: how records and sentences name the input when `spec` is where to
        find it (a Ray worker gets an absolute path)."""
        self.model  # noqa: B018 - a model that cannot load fails the run, not this input
        name = spec if name is None else name
        try:
            source = open_source(spec)
            return self.analyze(source if name == spec else replace(source, input=name), job)
        except input_errors() as err:
            return self._error(name, err, spec)

    def lockstep(self, units: Sequence[Unit]) -> Iterator[tuple[int, Result | ErrorResult]]:
        """The units read in lockstep (one batched Q-Former step per frame for all of them; their
        jobs may differ in their questions only). Yields (i, Result or ErrorResult) for units[i]
        as each comes, exactly once per unit: an error of the whole batch's step fails those it
        left without one."""
        self.model  # noqa: B018
        opened = []  # positions in units of the inputs that open, and their sources
        for i, unit in enumerate(units):  # downloads and missing files fail here, each on its own
            try:
                opened.append((i, open_source(unit.input)))
            except input_errors() as err:
                yield i, self._error(unit.input, err)
        given: set[int] = set()
        jobs = [self.resolve(units[i].job) for i, _ in opened]
        try:
            for k, outcome in self.analyzer.run_batch([source for _, source in opened], jobs, input_errors()):
                i = opened[k][0]
                given.add(i)
                yield i, self._error(units[i].input, outcome) if isinstance(outcome, BaseException) else outcome
        except input_errors() as err:
            for i, _ in opened:
                if i not in given:
                    yield i, self._error(units[i].input, err)

    def _error(self, name: str, err: BaseException, spec: str | None = None) -> ErrorResult:
        reraise_interrupt(err)
        self._events.close()
        message = failure(err)
        return ErrorResult(name, message.replace(spec, name) if spec and spec != name else message)

    # ---- many inputs -------------------------------------------------------------------------

    def run(self, specs: Sequence[str], job: Job | Sequence[Job], runner=None) -> Iterator[tuple[str, Any]]:
        """(spec, Result or ErrorResult) for every input, in the order they finish. `job`: one
        for all inputs, or one per input. `runner`: runs.OneByOne() (the default), runs.Lockstep(n)
        or runs.OnRay(...)."""
        jobs = [job] * len(specs) if isinstance(job, Job) else list(job)
        if len(jobs) != len(specs):
            raise ValueError(f"{len(jobs)} jobs for {len(specs)} inputs")
        if self.loaded:  # a job this model cannot take (check_labels) fails before any input
            for each in jobs:
                self.resolve(each)
        units = [Unit(spec, each) for spec, each in zip(specs, jobs)]
        if runner is None:
            outcomes: Iterable = ((i, self.attempt(unit.input, unit.job)) for i, unit in enumerate(units))
        else:
            outcomes = runner.run(self, units)
        for i, outcome in outcomes:
            yield specs[i], outcome

    # ---- a source read once, answered many times ---------------------------------------------

    def read(self, source: str | Path | VideoSource, *, task: str = "ask", fps: float | None = None,
             frames: int | None = None, start: float | None = None, end: float | None = None) -> VideoState:
        """Decode `source` and run the ViT once (or take the features from the cache), sampled at
        `fps` or as `frames` spread evenly (neither: `task`'s default sampling), and keep the
        features for any number of questions. Close the VideoState when done (or use `with`)."""
        from .features import FrameStore

        check_options(fps=fps, frames=frames, start=start, end=end)
        source = _opened(source)
        job = self.resolve(sampling_job(task, self.label, fps=fps, frames=frames, start=start, end=end))
        cache = self.analyzer.cache
        store = FrameStore(cache.scratch_dir() if cache is not None else None)
        try:
            kept = self.analyzer.read(source, job, store)
        except BaseException:
            store.close()
            raise
        return VideoState(self, source, kept, job)

    def watch(self, source, job: Job, *, every: float, cumulative: bool = False, duration: float | None = None,
              retries: float = 30.0, events=None, queue_frames: int | None = None):
        """A live source (a stream URL, a camera, a growing file, "-"; sources/live.py), read as
        its frames arrive: iterate the returned engine.live.LiveWatch for one record per `every`
        seconds of stream time. `job`: caption, ask or classify, sampled at job.fps."""
        from malmm_cli.sources.live import LiveSpec, live_spec

        from .live import LiveWatch

        spec = source if isinstance(source, LiveSpec) else live_spec(str(source))
        return LiveWatch(self, spec, self.resolve(job), every=every, cumulative=cumulative, duration=duration,
                         retries=retries, events=events, queue_frames=queue_frames)

    def features(self, source: str | Path | VideoSource, *, task: str = "caption", fps: float | None = None,
                 frames: int | None = None, start: float | None = None, end: float | None = None,
                 indices=None, augment=None, pre_norm: bool = False):
        """The vision features [T, P, C] of `source` (on the CPU), from the cache or through the
        ViT and into the cache: what training needs of a clip. Sampling as in :meth:`read`, or
        a training view: `indices` (the frames), `augment` (engine/augment.Augment) and
        `pre_norm` (before ln_vision), each cached apart (Analyzer.features_of)."""
        import torch

        source = _opened(source)
        job = sampling_job(task, self.label, fps=fps, frames=frames if indices is None else 1, start=start, end=end)
        chunks = self.analyzer.features_of(source, job, indices=indices, augment=augment, pre_norm=pre_norm)
        return torch.cat([feats.cpu() for _, feats in chunks])


class VideoState:
    """A video read once (:meth:`Session.read`): its kept vision features, replayed for every
    question. Each answer is the Result the command line writes for the same options with
    this sampling given explicitly (timings aside); none decodes a frame or runs the ViT."""

    def __init__(self, session: Session, source: VideoSource, kept, job: Job):
        self.session = session
        self.source = source
        self.kept = kept  # engine.kept.KeptFeatures
        self.sampling = dict(fps=job.fps if job.frames is None else None, frames=job.frames, start=job.start,
                             end=job.end)  # how it was read: every answer samples so

    @property
    def info(self):
        """sources.video.VideoInfo: duration, fps, size."""
        return self.kept.info

    @property
    def frames(self) -> int:
        """Frames kept (those the read decoded)."""
        return self.kept.count

    @property
    def timings(self) -> dict[str, float]:
        """What the read cost, in seconds: decode, vision, total (the answers cost none of it)."""
        return dict(self.kept.timings)

    @property
    def nbytes(self) -> int:
        """What keeping it costs, in bytes: its features (in a temporary file) and the visual
        banks kept in memory for follow-up answers (kept.py, on the model's device). What a
        budget of kept videos counts (malmm serve's --keep)."""
        return self.kept.store.nbytes + self.kept.nbytes

    @property
    def kv_budget(self) -> int:
        """Bytes the kept visual banks may take (default kept.KV_BUDGET_BYTES); 0 keeps none
        (every answer then runs the whole Q-Former: the same answers, slower)."""
        return self.kept.kv_budget

    @kv_budget.setter
    def kv_budget(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"kv_budget must be 0 or more bytes, not {value}")
        self.kept.set_budget(int(value))

    def caption(self, *, prompt: str | None = None, memory: int | None = None, beams: int | None = None,
                max_tokens: int | None = None) -> Result:
        return self.answer(self._job("caption", prompt=prompt, memory=memory, beams=beams, max_tokens=max_tokens))

    def ask(self, questions: str | Sequence[str], *, memory: int | None = None, beams: int | None = None,
            max_tokens: int | None = None) -> Result:
        questions = [questions] if isinstance(questions, str) else list(questions)
        return self.answer(self._job("ask", questions=questions, memory=memory, beams=beams, max_tokens=max_tokens))

    def classify(self, *, labels: str | Sequence[str] | None = None, label_set: str | None = None,
                 prompt: str | None = None, top_k: int | None = None, memory: int | None = None,
                 label_score: str | None = None) -> Result:
        """Rank `labels` ("a,b,c", a file, or a list) or a built-in `label_set` (lvu_genre, coin, ...);
        `label_score` "sum" (default) or "mean" of each label's token log-probabilities."""
        if labels is not None and not isinstance(labels, str):
            labels = ",".join(labels)
        return self.answer(self._job("classify", labels=labels, label_task=label_set, prompt=prompt, top_k=top_k,
                                     memory=memory, label_score=label_score))

    def summarize(self, *, every: float | None = None, scenes: bool = False, prompt: str | None = None,
                  memory: int | None = None, beams: int | None = None, max_tokens: int | None = None,
                  labels: str | Sequence[str] | None = None, label_set: str | None = None) -> Result:
        """Segments with a caption each and a summary; with `labels` or a built-in `label_set`,
        each segment's top labels too (the frames are not read again for them)."""
        if labels is not None and not isinstance(labels, str):
            labels = ",".join(labels)
        return self.answer(self._job("summarize", every=every, scenes=scenes, prompt=prompt, memory=memory,
                                     beams=beams, max_tokens=max_tokens, labels=labels, label_task=label_set))

    def _job(self, task: str, **options) -> Job:
        return self.session.job(task, **self.sampling, **options)

    def answer(self, job: Job) -> Result:
        """Any job whose sampling is the read's (fps or frames, start, end)."""
        fps = job.fps if job.frames is None else None
        if (fps, job.frames, job.start, job.end) != tuple(self.sampling.values()):
            raise ValueError(f"this video was read with {self.sampling}; a job sampled otherwise needs another read")
        return self.session.analyzer.run(self.source, self.session.resolve(job), self.kept)

    def close(self) -> None:
        """Drop the kept features (their temporary file)."""
        self.kept.close()

    def __enter__(self) -> VideoState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
