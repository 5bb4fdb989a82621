"""Read a video once, ask it many things: the engine's session (malmm_cli/engine/session.py),
what `malmm chat` and `malmm serve` build on.

    python examples/read_once.py [VIDEO] [--model tiny-random|instructblip-vicuna-7b|DIR]

The read decodes the frames and runs the vision encoder once; every answer after it replays
the kept features through the memory Q-Former and the LLM only. With the default tiny-random
model this runs in seconds; its text is meaningless by design.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from malmm_cli.engine import Session

SAMPLE = Path(__file__).resolve().parents[1] / "malmm_cli" / "data" / "sample.mp4"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("video", nargs="?", default=str(SAMPLE))
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--frames", type=int, default=20)
    args = parser.parse_args()

    session = Session.load(args.model, cache=False)  # quiet; cache=True keeps features across runs too
    with session.read(args.video, frames=args.frames) as video:
        t = video.timings
        print(f"read {video.frames} frames of {video.info.duration:.1f} s once: "
              f"decode {t['decode']:.2f} s, vision {t['vision']:.2f} s")
        for question in ("what is happening?", "where is this?", "what colour is it?"):
            result = video.ask(question, max_tokens=8)
            print(f"Q: {question}\nA: {result.answers[0].answer}   "
                  f"(vision {result.timings['vision']:.2f} s, llm {result.timings['llm']:.2f} s)")
        print("caption:", video.caption(max_tokens=12).text)
        top = video.classify(labels=["a test pattern", "a cooking show", "a football match"]).labels[0]
        print(f"most likely: {top.label} ({top.score:.0%})")
        for segment in video.summarize(every=2.0, max_tokens=8).segments:
            print(f"[{segment.start:.0f}-{segment.end:.0f} s] {segment.text}")


if __name__ == "__main__":
    main()
