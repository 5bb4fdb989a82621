"""The visual memory bank of one video, recorded frame by frame: what a second question about
the same video can replay instead of computing again.

In MA-LMM the visual bank depends on the frames alone (method.md): the instruction enters
only the query banks, the queries and the LLM. So everything the visual bank does over a
video is the same for every question read with the same bank length M and the same temporal
positions (the video's total frame count): per frame, the keys and values of every
cross-attention layer for the frame's tokens, and the merges MBC then makes. A
:class:`VisualTrack` holds exactly that: per frame, the frame's projected keys/values
``[2 * cross layers, 1, P, H]`` and the merge plans of its settle (one ``[1, P]`` long tensor
per merge, a single merge per frame at steady state).

A stream that replays it (``model.new_stream(..., visual_track=track)``) pushes the kept
keys/values into a bank without features and merges as recorded: no key/value projection
of the frame, no similarity, no merge of the 1,408-wide features. The values in the bank,
their physical slots and hence every attention are the same bits as when it was recorded.

Its size is what it costs: at InstructBLIP size, 6 cross layers x 2 x 257 x 768 values per
frame, 4.7 MB in bf16 and 9.5 MB in fp32, about 6.5 times the frame's bf16 features.
"""

from __future__ import annotations

import torch

__all__ = ["VisualTrack"]


class VisualTrack:
    """The visual bank of one video at one M and one total frame count, frame by frame.

    Made empty; a stream given an empty track records into it, frame by frame; once the video
    has been read whole, :meth:`seal` it, and streams given it replay it. A track belongs to
    the model that recorded it (its projection weights) and to the video's features.
    """

    def __init__(self, capacity: int, total_frames: int | None):
        self.capacity = capacity  # M of the banks it recorded
        self.total_frames = total_frames  # the temporal positions depend on it
        self._keys_values: list[torch.Tensor] = []  # per frame [E, 1, P, H]: E = 2 * cross layers
        self._plans: list[tuple[torch.Tensor, ...]] = []  # per frame: the merge plans of its settle
        self.sealed = False
        self.nbytes = 0

    @property
    def frames(self) -> int:
        return len(self._keys_values)

    def record(self, keys_values: torch.Tensor) -> None:
        """One more frame: its projected keys/values, kept as given (not copied: the caller
        must not change them). Its merges follow (:meth:`record_merges`)."""
        if self.sealed:
            raise RuntimeError("a sealed track takes no more frames")
        if len(self._plans) != len(self._keys_values):
            raise RuntimeError("the previous frame's merges were not recorded")
        self._keys_values.append(keys_values)
        self.nbytes += keys_values.nbytes

    def record_merges(self, plans) -> None:
        """The merge plans the bank made after the frame last recorded (MemoryBank.settle's)."""
        if len(self._plans) != len(self._keys_values) - 1:
            raise RuntimeError("merges recorded without their frame")
        self._plans.append(tuple(plans))
        self.nbytes += sum(p.nbytes for p in plans)

    def frame(self, t: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(keys/values [E, 1, P, H], merge plans) of frame t (0-based), from a sealed track."""
        if not self.sealed:
            raise RuntimeError("a track is replayed only once sealed (its video read whole)")
        if t >= self.frames:
            raise ValueError(f"the track holds {self.frames} frames; frame {t + 1} was not recorded")
        return self._keys_values[t], self._plans[t]

    def seal(self) -> None:
        """The video has been read whole: the track may be replayed."""
        if len(self._plans) != len(self._keys_values):
            raise RuntimeError("the last frame's merges were not recorded")
        self.sealed = True

    @staticmethod
    def frame_bytes(model, tokens: int) -> int:
        """What one frame of a track costs for `model` (a MALMM), `tokens` visual tokens a frame."""
        qformer = model.qformer
        hidden = qformer.config.hidden_size
        itemsize = torch.empty((), dtype=model.qformer_dtype).element_size()
        return 2 * len(qformer.cross_layers) * tokens * hidden * itemsize + tokens * 8  # + one long plan
