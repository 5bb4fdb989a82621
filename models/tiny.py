"""A deterministic tiny random InstructBLIP checkpoint in the Hugging Face layout.

It has the real model's structure at toy sizes (ViT with 224x224 input and 14x14 patches, so
257 tokens per frame; a Q-Former with cross-attention every other layer and 32 query tokens;
a LLaMA language model) and both tokenizers, and it loads through exactly the same
``MALMM.from_pretrained`` path as ``Salesforce/instructblip-vicuna-7b``. Its weights are
random: text it produces is meaningless by design. Tests, ``malmm doctor`` and the
``tiny-random`` preset use it to exercise every code path in seconds.

The tokenizers have the special-token layout of the hub checkpoint (transformers'
``convert_instructblip_original_to_pytorch.py``): the LLM tokenizer keeps LLaMA's ``<unk>``,
``<s>``, ``</s>`` at ids 0-2, uses ``</s>`` as BOS, EOS and UNK, and has ``[PAD]`` appended
after the vocabulary; it is a SentencePiece-style metaspace vocabulary where printable ASCII
round-trips. The Q-Former tokenizer is an uncased BERT WordPiece vocabulary with ``[DEC]``
appended as BOS, truncating from the left.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .constants import CLIP_MEAN, CLIP_STD

__all__ = ["TINY_RANDOM", "TINY_VERSION", "write_tiny_checkpoint", "tiny_random_dir"]

TINY_RANDOM = "tiny-random"
TINY_VERSION = 3  # bump when the layout or sizes change, so cached copies are rebuilt
_MARKER = "malmm_tiny.json"


# Words the tiny vocabularies know whole (everything else falls back to characters).
_WORDS = (
    "what does the video describe is of movie type breakfast shown in activity question short answer "
    "a an and to on with person man woman people cooking cook food make making making egg coffee tea "
    "juice milk cereal pancake sandwich salad fried scrambled comedy action romance thriller office "
    "airport school hotel prison restaurant friend husband wife boyfriend girlfriend explain confront "
    "discuss teach threaten who wins where when how why are there this that it he she they walking "
    "running playing sitting standing car dog cat ball water"
).split()


def tiny_random_dir() -> Path:
    """Where the ``tiny-random`` preset lives: under MALMM_CACHE_DIR or the user cache dir."""
    import platformdirs

    root = os.environ.get("MALMM_CACHE_DIR") or platformdirs.user_cache_dir("malmm")
    return Path(root) / "models" / f"{TINY_RANDOM}-v{TINY_VERSION}"


def _is_complete(path: Path) -> bool:
    try:
        return json.loads((path / _MARKER).read_text()).get("version") == TINY_VERSION
    except (OSError, ValueError):
        return False


def ensure_tiny_checkpoint(path: Path | None = None) -> Path:
    """Return a directory holding the tiny checkpoint, writing it first if missing or stale.

    Several processes may start at once on a fresh cache (a batch, the test suite): a lock
    file makes one of them write while the others wait and then find it complete. The
    marker is written last, so a directory that has it is whole.
    """
    from filelock import FileLock

    path = Path(path) if path is not None else tiny_random_dir()
    if _is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if not _is_complete(path):
            write_tiny_checkpoint(path)
    return path


def _llm_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]  # LLaMA's ids 0, 1, 2
    chars = [chr(c) for c in range(33, 127)]
    pieces = specials + ["\u2581"] + chars + ["\u2581" + c for c in chars]
    pieces += ["\u2581" + w for w in dict.fromkeys(_WORDS)]
    # Unigram scores: longer pieces are preferred, so known words encode as one token.
    vocab = [(p, 0.0) for p in specials] + [(p, -10.0 + 0.5 * len(p)) for p in pieces[3:]]
    vocab.append(("[PAD]", 0.0))  # appended after the vocabulary, as on the hub (id 32000 there)
    # No byte fallback: characters outside printable ASCII become <unk>, so whatever the
    # random model generates decodes to printable text.
    tok = Tokenizer(models.Unigram(vocab, unk_id=0))
    tok.add_special_tokens(specials + ["[PAD]"])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    # Like InstructBLIP-Vicuna: "</s>" (id 2) starts every prompt and ends every answer.
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="[PAD]",
        truncation_side="left",
    )


def _qformer_tokenizer():
    from transformers import BertTokenizer

    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    pieces += list(dict.fromkeys(_WORDS))
    tok = BertTokenizer(vocab={p: i for i, p in enumerate(pieces)}, do_lower_case=True, truncation_side="left")
    tok.add_special_tokens({"bos_token": "[DEC]"})  # as InstructBLIP's Q-Former tokenizer
    return tok


def _config(vocab_size: int, qformer_vocab_size: int, image_token_index: int, pad_token_id: int, image_size: int):
    from transformers import InstructBlipConfig

    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, initializer_range=0.02,
    )
    qformer = dict(
        vocab_size=qformer_vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, cross_attention_frequency=2,
        encoder_hidden_size=32, pad_token_id=0,
    )
    text = dict(
        model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=2, eos_token_id=2, pad_token_id=pad_token_id, tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    return InstructBlipConfig(
        vision_config=vision, qformer_config=qformer, text_config=text,
        num_query_tokens=32, image_token_index=image_token_index,
    )


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a seeded generator, independent of transformers' init."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "norm" in name.lower() and name.endswith("weight"):
            values = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("bias"):
            values = 0.02 * torch.randn(p.shape, generator=gen)
        elif p.dim() >= 2 and "embed" not in name and "query_tokens" not in name:
            fan_in = math.prod(p.shape[1:])
            values = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
        else:
            values = torch.randn(p.shape, generator=gen)
        p.copy_(values.to(p.dtype))


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or notices while writing (e.g. the torchvision fallback notice)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def write_tiny_checkpoint(path: Path | str, seed: int = 0, image_size: int = 224) -> Path:
    """Write the tiny checkpoint to ``path`` atomically (built in a temp dir, then renamed)."""
    with _quiet_transformers():
        return _write_tiny_checkpoint(Path(path), seed, image_size)


def _write_tiny_checkpoint(path: Path, seed: int, image_size: int) -> Path:
    from transformers import BlipImageProcessor, InstructBlipForConditionalGeneration, InstructBlipProcessor

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        tokenizer = _llm_tokenizer()
        qformer_tokenizer = _qformer_tokenizer()
        image_processor = BlipImageProcessor(
            size={"height": image_size, "width": image_size}, resample=3, image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD), do_convert_rgb=True,
        )
        processor = InstructBlipProcessor(image_processor, tokenizer, qformer_tokenizer, num_query_tokens=32)
        image_token_index = tokenizer.convert_tokens_to_ids("<image>")  # added by the processor
        config = _config(len(tokenizer), len(qformer_tokenizer), image_token_index, tokenizer.pad_token_id, image_size)
        model = InstructBlipForConditionalGeneration(config).eval()
        _randomize(model, seed)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"version": TINY_VERSION, "seed": seed}))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
