"""Caption scores as the official evaluation computes them (``captioning.py``): pycocoevalcap's
``COCOEvalCap`` tokenizes every caption with the Stanford PTB tokenizer (Java), then scores
BLEU-1..4, METEOR (Java), ROUGE-L and CIDEr(-D). The paper reports METEOR and CIDEr.

Where Java runs, the same code does: pycocoevalcap's own PTBTokenizer and Meteor. Without it,
captions are tokenized in Python the way the PTB tokenizer leaves them (the result says
``"tokenizer": "approximate"``) and METEOR, which only exists in Java, is left out with a
note. SPICE, which COCOEvalCap also computes, is not: the paper does not report it, and it
needs Stanford CoreNLP's models on top.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from malmm_cli.errors import UsageError

CAPTION_EXTRA = "eval"  # pip install 'malmm[eval]' brings pycocoevalcap
NO_JAVA_NOTE = "METEOR needs Java (the official scorer is a Java program); install a Java runtime to get it"

# The PTB tokenizer's brackets, as it writes them with -lowerCase; pycocoevalcap's punctuation
# list holds them in capitals (-LRB-), so the lowercased ones stay in the captions it scores.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# What pycocoevalcap's PTBTokenizer removes after tokenizing (its PUNCTUATIONS, as they appear).
_PUNCTUATION = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'])
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"\S+@\S+\.\w+"  # e-mail addresses stay whole
                    r"|(?:[a-z]\.){2,}"  # abbreviations: u.s.
                    r"|\d+(?::\d+)+"  # times: 10:30
                    r"|n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.'/]\w+)*|\.\.\.|--|\S")


def caption_tokens(text: str) -> str:
    """The caption as pycocoevalcap's PTB tokenizer leaves it, without Java: lowercased, clitics
    split off ("don't" -> "do n't", "man's" -> "man 's"), brackets written -lrb- -rrb- -lsb-
    -rsb- -lcb- -rcb- (and kept, as the Java path keeps them), other punctuation dropped,
    tokens joined by spaces. For plain English captions this is the Stanford tokenizer's output
    (tested against it)."""
    text = _CLITIC.sub(r" \1", text.lower().replace("\n", " "))
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text))
    return " ".join(t for t in tokens if t not in _PUNCTUATION)


def scorers():
    """pycocoevalcap's scorer classes, or a usage error saying how to install it."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise UsageError("Caption scores (CIDEr, BLEU, METEOR, ROUGE-L) need pycocoevalcap: "
                         f"pip install 'malmm[{CAPTION_EXTRA}]' (or pip install pycocoevalcap).") from None
    return Bleu, Rouge, Cider


def available() -> bool:
    try:
        scorers()
    except UsageError:
        return False
    return True


def java_available() -> bool:
    """Whether a Java runtime answers here (pycocoevalcap calls `java` from the PATH)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@contextlib.contextmanager
def _quiet_stderr():
    """pycocoevalcap's PTBTokenizer lets the Java tokenizer print its token count on our stderr."""
    try:
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _ptb(references: dict, predictions: dict) -> tuple[dict, dict]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with _quiet_stderr():
        return PTBTokenizer().tokenize(references), PTBTokenizer().tokenize(predictions)


def _meteor(refs: dict, hyps: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        return float(meteor.compute_score(refs, hyps)[0])
    finally:
        del meteor  # its __del__ stops the Java process


def caption_scores(records: Sequence[dict], *, java: bool | None = None) -> dict[str, Any]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of `records` ({"references": [...],
    "prediction": ...}), on pycocoevalcap's scales (CIDEr in COCO's, x10), with the tokenizer
    used and notes. `java`: use the Java tokenizer and METEOR (default: where Java runs)."""
    Bleu, Rouge, Cider = scorers()
    empty = {"bleu1": None, "bleu2": None, "bleu3": None, "bleu4": None, "meteor": None, "rouge_l": None,
             "cider": None}
    if not records:
        return {**empty, "tokenizer": None}
    java = java_available() if java is None else java
    notes = []
    refs = {i: [{"caption": t} for t in r["references"]] for i, r in enumerate(records)}
    hyps = {i: [{"caption": r["prediction"]}] for i, r in enumerate(records)}
    if java:
        try:
            refs_t, hyps_t = _ptb(refs, hyps)
        except (OSError, subprocess.SubprocessError) as err:
            java = False
            notes.append(f"the Java PTB tokenizer could not run ({err}); captions were tokenized in Python")
    if not java:
        refs_t = {i: [caption_tokens(c["caption"]) for c in v] for i, v in refs.items()}
        hyps_t = {i: [caption_tokens(c["caption"]) for c in v] for i, v in hyps.items()}
    bleu, _ = Bleu(4).compute_score(refs_t, hyps_t, verbose=0)
    scores = {f"bleu{n + 1}": round(float(b), 6) for n, b in enumerate(bleu)}
    scores["meteor"] = round(_meteor(refs_t, hyps_t), 6) if java else None
    scores["rouge_l"] = round(float(Rouge().compute_score(refs_t, hyps_t)[0]), 6)
    scores["cider"] = round(float(Cider().compute_score(refs_t, hyps_t)[0]), 6)
    if not java and not any(n.startswith("the Java") for n in notes):
        notes.append(NO_JAVA_NOTE)
    out = {**scores, "tokenizer": "ptb" if java else "approximate"}
    if notes:
        out["notes"] = notes
    return out
