"""The Python API: read a video frame by frame into MA-LMM's memory, then ask about it.

    python examples/python_api.py [VIDEO] [--model tiny-random|instructblip-vicuna-7b|DIR]

With the default tiny-random model this runs in seconds anywhere; its text is meaningless
by design. With the real model the same code gives real answers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from malmm_cli.sources.decoding import stream_frames
from malmm_cli.sources.video import plan_sampling, preprocess, probe
from models import MALMM

SAMPLE = Path(__file__).resolve().parents[1] / "malmm_cli" / "data" / "sample.mp4"
SOURCES = {"tiny-random": "tiny-random", "instructblip-vicuna-7b": "Salesforce/instructblip-vicuna-7b"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("video", nargs="?", default=str(SAMPLE))
    parser.add_argument("--model", default="tiny-random")
    args = parser.parse_args()

    model = MALMM.from_pretrained(SOURCES.get(args.model, args.model), memory_bank_length=10)

    info = probe(args.video)  # duration, fps, size: known before decoding
    sampling = plan_sampling(info, fps=2.0)  # every sampled frame carries its timestamp
    questions = ["Question: what is happening? Short answer:", "Question: where is this? Short answer:"]
    stream = model.new_stream(questions, total_frames=len(sampling.indices))  # one row per question

    with stream_frames(args.video, sampling) as frames:  # chunks, decoded in the background
        for chunk in frames:
            stream.add_frames(preprocess(chunk.frames, spec=model.image_spec))  # ViT on the chunk, then the memory, frame by frame
            m = stream.memory
            print(f"t={chunk.timestamps[-1]:5.1f}s  memory {m.length}/{m.capacity} slots, "
                  f"{m.compressions} compressions, frames per slot {[round(f, 1) for f in m.slot_frames]}")

    print("visual tokens for the LLM:", tuple(stream.visual_tokens().shape))
    for question, answer in zip(questions, model.generate(stream, max_new_tokens=10)):
        print(f"{question} {answer}")
    scores = model.score(stream, [questions[0]] * 2, ["cooking", "playing football", "a test pattern"])
    print("log-likelihood of each candidate answer:", scores[0].tolist())


if __name__ == "__main__":
    main()
