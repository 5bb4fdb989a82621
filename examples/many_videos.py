"""Several videos at once from Python: one batched memory step per frame for all of them.

    python examples/many_videos.py [VIDEO ...] [--model tiny-random|instructblip-vicuna-7b|DIR]

What `malmm caption videos/ --batch N` does, written out: each video is decoded in its own
background stream, its frames go through the ViT a chunk at a time, and every step feeds one
frame of each video to `MALMM.new_batch`'s lockstep Q-Former. A video that runs out of
frames sits out the following steps (`active=`) and keeps its memory as of its last frame.
With the default tiny-random model this runs in seconds; its text is meaningless by design.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack, closing
from pathlib import Path

import torch

from malmm_cli.sources.decoding import stream_frames
from malmm_cli.sources.video import plan_sampling, preprocess, probe
from models import MALMM

SAMPLE = Path(__file__).resolve().parents[1] / "malmm_cli" / "data" / "sample.mp4"
SOURCES = {"tiny-random": "tiny-random", "instructblip-vicuna-7b": "Salesforce/instructblip-vicuna-7b"}


def frames_of(model: MALMM, path: str, sampling):
    """Vision features [P, C] of the video's sampled frames, one at a time (the ViT runs per chunk)."""
    with stream_frames(path, sampling, workers=1, prefetch=1) as chunks:
        for chunk in chunks:
            yield from model.encode_frames(preprocess(chunk.frames, spec=model.image_spec))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("videos", nargs="*", default=[str(SAMPLE)])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--fps", type=float, default=2.0)
    args = parser.parse_args()
    videos = args.videos if len(args.videos) > 1 else args.videos * 2  # one video: read it twice, to compare

    model = MALMM.from_pretrained(SOURCES.get(args.model, args.model), memory_bank_length=10)
    samplings = [plan_sampling(probe(v), fps=args.fps) for v in videos]
    # Each video its own instruction (here the same) and its own length for the temporal positions.
    batch = model.new_batch(["what does the video describe?"] * len(videos),
                            total_frames=[len(s.indices) for s in samplings])
    with ExitStack() as stack, torch.inference_mode():
        streams = [stack.enter_context(closing(frames_of(model, v, s))) for v, s in zip(videos, samplings)]
        going = [True] * len(videos)
        while True:
            step = [next(s, None) if g else None for s, g in zip(streams, going)]
            going = [f is not None for f in step]
            if not any(going):
                break
            example = next(f for f in step if f is not None)
            frames = torch.stack([f if f is not None else torch.zeros_like(example) for f in step])
            batch.add_features(frames, active=going)  # [videos, P, C]: one frame of each
    for video, memory in zip(videos, batch.memory):
        print(f"{video}: {memory.frames_seen} frames, memory {memory.length}/{memory.capacity} slots, "
              f"{memory.compressions} compressions")
    for video, text in zip(videos, model.generate(batch, max_new_tokens=12, num_beams=1)):
        print(f"{video}: {text}")


if __name__ == "__main__":
    main()
