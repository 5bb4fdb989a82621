"""MA-LMM network: usable without the CLI (``from models import MALMM``)."""

from .errors import CheckpointError, ModelError, ModelNotAvailableError
from .constants import DEFAULT_MODEL, TEMPORAL_SLOTS
from .malmm import MALMM
from .streams import VideoBatch, VideoStream
from .memory_bank import BankStatus, MemoryBank, compress
from .tiny import TINY_RANDOM
from .visual_track import VisualTrack

__all__ = [
    "MALMM", "VideoStream", "VideoBatch", "DEFAULT_MODEL", "TEMPORAL_SLOTS", "TINY_RANDOM",
    "MemoryBank", "BankStatus", "compress", "VisualTrack",
    "ModelError", "ModelNotAvailableError", "CheckpointError",
]
