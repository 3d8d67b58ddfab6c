"""Caption metrics (COCO, TVC, YC2C) exactly as pycocoevalcap's COCOEvalCap computes them.

Predictions and references go through the Stanford PTBTokenizer (Java; lower-cases and drops
punctuation tokens), then BLEU-1..4, METEOR (Java), ROUGE-L and CIDEr; SPICE runs only when its
Stanford CoreNLP jars are already in pycocoevalcap/spice/lib, because pycocoevalcap would
otherwise start a download (which hangs offline). It is skipped with one log line per process.
The headline "score" is CIDEr x 100, the paper's scale; the other values keep pycocoevalcap's
0-1 scale and names (Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE).

Without `java` on PATH the Java parts cannot run: tokenisation falls back to lower-cased
alphanumeric words, METEOR and SPICE are skipped, and the result says so ("tokenizer": "basic").

The JVMs run in their own session (`_own_session`): pycocoevalcap starts them with a plain
subprocess.Popen, in the trainer's process group, where the group-wide SIGTERM of `scancel`
would kill them mid-scoring; its METEOR wrapper then never releases its lock (no try/finally),
and the trainer hangs in `Meteor.__del__` instead of saving and exiting (found by
bench/preemption.py). Started in a new session, they finish the scoring and the trainer acts on
the signal at its next poll; they exit by themselves at the end of their input.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import types
from pathlib import Path

log = logging.getLogger(__name__)
_warned: set[str] = set()

SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


def have_java() -> bool:
    return shutil.which("java") is not None


class _SessionPopen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("start_new_session", True)
        super().__init__(*args, **kwargs)


def _own_session(module) -> types.ModuleType:
    """`module` with its `subprocess` replaced by one whose processes start in a new session
    (a signal to the trainer's process group does not reach them). Idempotent."""
    if getattr(module.subprocess, "vlds_own_session", False):
        return module
    proxy = types.ModuleType("subprocess")
    proxy.__dict__.update(vars(subprocess))
    proxy.Popen, proxy.vlds_own_session = _SessionPopen, True
    proxy.check_call = lambda *a, **kw: subprocess.check_call(*a, start_new_session=True, **kw)
    module.subprocess = proxy
    return module


def spice_available() -> bool:
    """True when SPICE can run without downloading anything."""
    from importlib.util import find_spec

    # pycocoevalcap is a namespace package (no __file__); find spice.py without running it.
    lib = Path(find_spec("pycocoevalcap.spice.spice").origin).parent / "lib"
    return have_java() and all((lib / j).is_file() for j in SPICE_JARS)


def ptb_tokenize(gts: dict, res: dict) -> tuple[dict, dict]:
    """{key: [str]} dicts -> the same, PTB-tokenised. One Java call for both: the tokenizer works
    line by line, so this equals COCOEvalCap's two separate calls."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    PTBTokenizer = _own_session(ptbtokenizer).PTBTokenizer
    both = {("g", k): [{"caption": c} for c in v] for k, v in gts.items()}
    both |= {("r", k): [{"caption": c} for c in v] for k, v in res.items()}
    out = PTBTokenizer().tokenize(both)
    return {k: out[("g", k)] for k in gts}, {k: out[("r", k)] for k in res}


def _basic_tokenize(d: dict) -> dict:
    return {k: [" ".join(re.findall(r"[a-z0-9]+", c.lower())) for c in v] for k, v in d.items()}


def caption_scores(gts: dict, res: dict, java: bool = True) -> dict:
    """pycocoevalcap scores of raw {key: [refs]} against {key: [one prediction]}, 0-1 scale.

    java=False skips the Java parts (PTBTokenizer, METEOR, SPICE) even where java is installed.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if java and not have_java():
        _warn_once("java", "java not found: captions tokenised without PTBTokenizer, no METEOR")
        java = False
    out: dict = {"tokenizer": "ptb" if java else "basic"}
    if java:
        gts, res = ptb_tokenize(gts, res)
    else:
        gts, res = _basic_tokenize(gts), _basic_tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{i + 1}": float(b) for i, b in enumerate(bleu)})
    if java:
        from pycocoevalcap.meteor import meteor as meteor_module

        meteor = _own_session(meteor_module).Meteor()
        out["METEOR"] = float(meteor.compute_score(gts, res)[0])
        del meteor  # its __del__ stops the Java process now rather than at exit
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if java and spice_available():
        from pycocoevalcap.spice import spice

        try:
            out["SPICE"] = float(_own_session(spice).Spice().compute_score(gts, res)[0])
        except Exception as e:  # an old JVM or a broken cache must not lose the other scores
            _warn_once("spice-failed", f"SPICE failed ({e!r}); reporting the other metrics")
    else:
        _warn_once(
            "spice",
            "SPICE skipped: pycocoevalcap/spice/lib lacks the Stanford CoreNLP 3.6.0 jars "
            "(run `python -m pycocoevalcap.spice.get_stanford_models` once, online, to enable it)",
        )
    return out


def caption_metrics(
    preds: list[str], refs: list[list[str]], meta: list[dict] | None = None, java: bool = True
):
    """{"score": CIDEr x 100, "n", Bleu_1..4, METEOR, ROUGE_L, CIDEr[, SPICE], "tokenizer"}."""
    if not preds:
        return {"score": 0.0, "n": 0}
    keys = range(len(preds))
    gts = {i: list(refs[i]) for i in keys}
    res = {i: [preds[i]] for i in keys}
    scores = caption_scores(gts, res, java=java)
    return {"score": 100.0 * scores["CIDEr"], "n": len(preds), **scores}
