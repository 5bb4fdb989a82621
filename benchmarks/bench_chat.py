"""Benchmark 24: `malmm chat`'s first question against its follow-ups, with and without keeping
the visual memory bank (engine/kept.py, models/visual_track.py).

    python benchmarks/bench_chat.py --size tiny|real [--frames 20] [--memory 10] [--rounds 3] [--threads N]

What the chat runs: a video read once (Session.read; the features from a warm feature cache,
so neither decoding nor the ViT is timed), then questions through VideoState.ask, as the
chat's answers go. Each round reads the video twice, one state with the default budget
(the kept bank: the first question records it, the follow-ups replay it) and one with
kv_budget=0 (every question runs the whole Q-Former, as before), and asks both the same
questions in turn, alternating, so that the load of the machine hits both alike. Per answer:
its wall time, the process's CPU time (steadier on a busy machine) and the Q-Former's wall
time (the record's timings); the answers must be equal (the benchmark stops otherwise).

--size tiny: tiny-random as the CLI loads it. --size real: InstructBLIP's real ViT-g and
Q-Former (random weights; the Q-Former in the dtype malmm picks for a bf16 model) with the
tiny LLM, as benchmarks/bench_reask.py builds it: the Q-Former is the work a question costs
beyond the LLM's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import report

QUESTIONS = ("what is the rabbit doing?", "where does this take place?", "is it day or night?", "who is there?")


def build_session(size: str, tmp: Path):
    from malmm_cli.engine.features import FeatureCache
    from malmm_cli.engine.session import Session

    cache = FeatureCache(tmp / "features")
    if size == "tiny":
        from malmm_cli.engine.loader import load_model
        from malmm_cli.engine.presets import resolve_model
        from malmm_cli.engine.session import SessionOptions

        choice = resolve_model("tiny-random")
        return Session.from_model(load_model(choice, SessionOptions("tiny-random", quiet=True)), model_id="bench",
                                  cache=cache)
    from bench_reask import model_qformer_dtype, real_vision_model

    return Session.from_model(real_vision_model(tmp, model_qformer_dtype()), model_id="bench", cache=cache)


def ask(state, question: str, memory: int) -> tuple[float, float, float, str]:
    """(wall s, CPU s, the Q-Former's wall s, answer) of one question."""
    c0, w0 = time.process_time(), time.perf_counter()
    result = state.ask(question, memory=memory)
    return (time.perf_counter() - w0, time.process_time() - c0, result.timings["qformer"],
            result.answers[0].answer)


def one_round(session, source, frames: int, memory: int) -> dict:
    """Both states asked the same questions in turn; per question, (wall, cpu) of each."""
    with session.read(source, frames=frames) as kept, session.read(source, frames=frames) as plain:
        plain.kv_budget = 0
        times = {"kept": [], "plain": []}
        for question in QUESTIONS:
            for name, state in (("kept", kept), ("plain", plain)) if len(times["kept"]) % 2 == 0 else \
                    (("plain", plain), ("kept", kept)):
                times[name].append(ask(state, question, memory))
            if times["kept"][-1][-1] != times["plain"][-1][-1]:
                raise SystemExit(f"answers differ for {question!r}: {times['kept'][-1][-1]!r} "
                                 f"vs {times['plain'][-1][-1]!r}")
        times["kept_mb"] = kept.nbytes / 2**20
    return times


def qformer_alone(model, frames: int, memory: int, rounds: int) -> dict:
    """The Q-Former over `frames` frames for one question, plain and replaying a recorded track,
    alternating, in process CPU time: the part of an answer the kept bank changes, measured
    without the rest (reading the features back, the LLM) and steadier than wall time."""
    from models import VisualTrack

    vision = model.vision_model.config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    feats = torch.randn(frames, tokens, vision.hidden_size, generator=torch.Generator().manual_seed(0))
    track = VisualTrack(memory, frames)
    model.new_stream(["what is it?"], total_frames=frames, memory_bank_length=memory,
                     visual_track=track).add_features(feats)
    track.seal()
    times = {"plain": [], "kept": []}
    for i in range(rounds):
        for name in (("plain", "kept") if i % 2 == 0 else ("kept", "plain")):
            stream = model.new_stream([QUESTIONS[i % len(QUESTIONS)]], total_frames=frames, memory_bank_length=memory,
                                      visual_track=track if name == "kept" else None)
            c0 = time.process_time()
            stream.add_features(feats)
            times[name].append(time.process_time() - c0)
    out = {f"{name}_cpu_s": round(statistics.median(t), 4) for name, t in times.items()}
    out["plain/kept"] = round(out["plain_cpu_s"] / out["kept_cpu_s"], 2)
    return out


def summarize(rounds: list[dict]) -> dict:
    """Medians over rounds: the first question and the follow-ups (the rest, pooled)."""
    out = {}
    keys = ("wall_s", "cpu_s", "qformer_s")
    for name in ("kept", "plain"):
        first = [r[name][0] for r in rounds]
        follow = [t for r in rounds for t in r[name][1:]]
        out[name] = {f"{when}_{key}": round(statistics.median(t[i] for t in times), 4)
                     for when, times in (("first", first), ("follow_up", follow)) for i, key in enumerate(keys)}
    for key in out["kept"]:
        out[f"plain/kept {key}"] = round(out["plain"][key] / out["kept"][key], 2)
    out["kept_mb"] = round(rounds[-1]["kept_mb"], 1)
    return out


def main() -> None:
    from malmm_cli.sources.inputs import open_source

    from tests.media import bigbuckbunny_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--frames", type=int, default=20, help="frames read (ask's default: 20)")
    parser.add_argument("--memory", type=int, default=10, help="bank length M (ask's default: 10)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: malmm's thread policy)")
    parser.add_argument("--qformer-rounds", type=int, default=6, help="rounds of the Q-Former alone (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        session = build_session(args.size, Path(tmp))
        source = open_source(str(bigbuckbunny_path()))
        t0 = time.perf_counter()
        session.read(source, frames=args.frames).close()  # fills the feature cache: every read after is warm
        cold = time.perf_counter() - t0
        if args.threads:
            torch.set_num_threads(args.threads)
            session.analyzer._plan_threads = lambda: None  # noqa: SLF001 - keep the benchmark's team
        rounds = []
        for i in range(args.rounds):
            rounds.append(one_round(session, source, args.frames, args.memory))
            print(f"round {i + 1}:", {k: [tuple(round(x, 3) for x in t[:3]) for t in v] if k != "kept_mb" else v
                                      for k, v in rounds[-1].items()}, flush=True)
        alone = qformer_alone(session.model, args.frames, args.memory, args.qformer_rounds) \
            if args.qformer_rounds else {}
    threads = f" --threads {args.threads}" if args.threads else ""
    report(f"chat_{args.size}", {"size": args.size, "frames": args.frames, "memory": args.memory,
                                 "questions_per_round": len(QUESTIONS), "rounds": args.rounds,
                                 "cold_read_s": round(cold, 2), **summarize(rounds), "qformer_alone": alone},
           f"python benchmarks/bench_chat.py --size {args.size} --frames {args.frames} --memory {args.memory} "
           f"--rounds {args.rounds}{threads} --qformer-rounds {args.qformer_rounds}")


if __name__ == "__main__":
    main()
