"""Issue 21: `malmm serve` against the engine, side by side in one run.

    python benchmarks/bench_serve.py [--rounds 5] [--requests 24] [--video PATH]

A server (`malmm serve --model tiny-random --no-cache`, a subprocess) and the engine in this
process (Session.load("tiny-random", cache=False)), both with MALMM_THREADS=1, answer `ask`
with its defaults (20 frames, M=10, 5 beams) about copies of bigbuckbunny.mp4 (1280x720, so
that a read, decoding included, costs something even with tiny weights); each round reads a
fresh copy (a new file is a new video). Rounds interleave serve and engine.

- first question vs a follow-up on the same video, through serve (the openai client) and
  through the engine (Session.read + VideoState.ask, then VideoState.ask);
- serve's overhead over the engine for one request: the difference of the two walls;
- throughput: `--requests` distinct questions about a kept video, from 1 client and from 4
  clients at once (the model answers one at a time either way).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["MALMM_THREADS"] = "1"  # before torch loads: this process's engine, as the server's

from common import ROOT, report  # noqa: E402


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "malmm_cli", "serve", "--model", "tiny-random", "--port", "0", "--no-cache",
               "-q", "--allow-dir", str(folder), "--max-queue", "1000"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found = threading.Event()
    url: list[str] = []

    def read():
        for line in proc.stderr:
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            if match:
                url.append(match.group(1))
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(300) or not url:
        proc.kill()
        raise SystemExit("the server did not start")
    return proc, url[0]


OVERHEAD: list[float] = []  # per request: the client's wall less the engine's own total in the record
IN_REQUEST: list[float] = []  # OVERHEAD of the one-client throughput requests


def chat(client, video: Path, question: str) -> float:
    t0 = time.perf_counter()
    reply = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video.as_uri()}}, {"type": "text", "text": question}]}])
    wall = time.perf_counter() - t0
    OVERHEAD.append(wall - reply.model_extra["malmm"]["timings"]["total"])
    return wall


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def first_and_follow_up(client, session, folder: Path, video: Path, rounds: int) -> dict:
    walls = {k: [] for k in ("serve_first", "serve_follow_up", "engine_first", "engine_follow_up",
                             "serve_follow_up_overhead")}
    for i in range(rounds):
        mine = folder / f"serve-{i}.mp4"
        shutil.copy(video, mine)
        walls["serve_first"].append(chat(client, mine, "what is the rabbit doing?"))
        walls["serve_follow_up"].append(chat(client, mine, "where does this take place?"))
        walls["serve_follow_up_overhead"].append(OVERHEAD[-1])
        theirs = folder / f"engine-{i}.mp4"
        shutil.copy(video, theirs)
        wall, state = timed(lambda: session.read(str(theirs)))
        wall += timed(lambda: state.ask("what is the rabbit doing?"))[0]
        walls["engine_first"].append(wall)
        walls["engine_follow_up"].append(timed(lambda: state.ask("where does this take place?"))[0])
        state.close()
        print({k: round(v[-1], 3) for k, v in walls.items()}, flush=True)
    return walls


def throughput(client, video: Path, requests: int, rounds: int) -> dict:
    chat(client, video, "warm?")  # kept from here on
    rates = {1: [], 4: []}
    for r in range(rounds):
        for clients in (1, 4):
            questions = [f"round {r} clients {clients} question {i}?" for i in range(requests)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda q: chat(client, video, q), questions))
            rates[clients].append(requests / (time.perf_counter() - t0))
            if clients == 1:
                IN_REQUEST.extend(OVERHEAD[-requests:])
        print({k: round(v[-1], 2) for k, v in rates.items()}, flush=True)
    return rates


def main() -> None:
    import openai

    from malmm_cli.engine.session import Session
    from tests.media import bigbuckbunny_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--video", type=Path, default=None)
    args = parser.parse_args()
    video = args.video or bigbuckbunny_path()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        proc, url = start_server(folder)
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
            session = Session.load("tiny-random", cache=False)
            warm = folder / "warm.mp4"
            shutil.copy(video, warm)
            chat(client, warm, "warm?")
            with session.read(str(warm)) as state:
                state.ask("warm?")
            walls = first_and_follow_up(client, session, folder, video, args.rounds)
            rates = throughput(client, warm, args.requests, args.rounds)
        finally:
            proc.terminate()
            proc.wait(60)
    med = {k: round(statistics.median(v), 3) for k, v in walls.items()}
    results = {
        "video": video.name, "rounds": args.rounds, "walls_s": {k: [round(x, 3) for x in v] for k, v in walls.items()},
        "median_s": med,
        "follow_up_speedup": {"serve": round(med["serve_first"] / med["serve_follow_up"], 1),
                              "engine": round(med["engine_first"] / med["engine_follow_up"], 1)},
        "serve_overhead_s": {"first_vs_engine": round(med["serve_first"] - med["engine_first"], 3),
                             "follow_up_vs_engine": round(med["serve_follow_up"] - med["engine_follow_up"], 3),
                             "follow_up_in_request": med["serve_follow_up_overhead"]},
        "requests_per_s": {f"{k}_clients": [round(x, 2) for x in v] for k, v in rates.items()},
        "overhead_one_client_s": {"median": round(statistics.median(IN_REQUEST), 4),
                                  "p90": round(statistics.quantiles(IN_REQUEST, n=10)[-1], 4), "n": len(IN_REQUEST)},
        "median_requests_per_s": {f"{k}_clients": round(statistics.median(v), 2) for k, v in rates.items()},
    }
    report("serve", results, f"python benchmarks/bench_serve.py --rounds {args.rounds} --requests {args.requests}")


if __name__ == "__main__":
    main()
