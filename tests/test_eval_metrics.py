"""Every task metric against hand-computed values, and captions against direct pycocoevalcap."""

import logging

import pytest

from vlds.eval import caption as caption_mod
from vlds.eval.accuracy import choice_accuracy, exact_match, nlvr_accuracy, nlvr_sentence
from vlds.eval.metrics import METRICS, vqa_legacy
from vlds.eval.vqa import normalize_answer, question_accuracy, vqa_accuracy

# ---- VQA ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("yes.", "yes"),  # a period not followed by a digit goes
        ("5.", "5"),
        ("1.5", "1.5"),  # ... one followed by a digit stays
        ("1,000", "1000"),  # digit,digit: every listed mark is deleted, not spaced
        ("it's", "it's"),  # the apostrophe is not in the punctuation list
        ("two", "2"),
        ("Ten", "10"),
        ("none", "0"),
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("Isnt", "isn't"),  # lower-cased before the contraction table
        ("red-white", "red white"),  # a mark touching no space becomes a space
        ("hi, there!", "hi there"),  # ", " touches a space: deleted; "!" spaced, then split
        ("yes/no", "yes no"),
        ("  two  dogs\t", "2 dogs"),
    ],
)
def test_vqa_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize(
    "pred, answers, acc",
    [
        # Unanimous answers: the 2021 script normalises nothing, not even the case, so a
        # capitalised or punctuated prediction scores 0 against 10 x "yes".
        ("Yes", ["yes"] * 10, 0.0),
        ("yes.", ["yes"] * 10, 0.0),
        ("two", ["2"] * 10, 0.0),
        ("yes", ["yes"] * 10, 1.0),
        (" yes\n", ["yes"] * 10, 1.0),  # whitespace is always stripped
        # Not unanimous: both sides normalised.
        ("Yes", ["yes"] * 9 + ["no"], 1.0),
        ("Two", ["2"] * 3 + ["3"] * 7, 0.9),  # 3 matches: (3 x 2/3 + 7 x 1) / 10
        ("dog", ["the dog"] * 2 + ["cat"] * 8, 0.6),
        # Leave-one-out by number of matching answers m: 10 subsets, min(1, matches / 3) each.
        ("yes", ["yes"] * 2 + ["no"] * 8, 0.6),  # m=2: (8 x 2/3 + 2 x 1/3) / 10
        ("yes", ["yes"] + ["no"] * 9, 0.3),  # m=1: (9 x 1/3 + 1 x 0) / 10
        ("yes", ["yes"] * 4 + ["no"] * 6, 1.0),  # m=4: every subset keeps >= 3
        ("maybe", ["yes"] * 5 + ["no"] * 5, 0.0),
    ],
)
def test_vqa_question_accuracy(pred, answers, acc):
    assert question_accuracy(pred, answers) == pytest.approx(acc, abs=1e-12)


@pytest.mark.parametrize(
    "pred, answers, acc",
    [
        # The older script always normalises the prediction ...
        ("Yes", ["yes"] * 10, 1.0),
        ("yes.", ["yes"] * 10, 1.0),
        # ... but gives differing answers the punctuation rules only: no articles dropped.
        ("dog", ["the dog"] * 4 + ["cat"] * 6, 0.0),
        ("dog", ["dog."] * 4 + ["cat"] * 6, 1.0),
    ],
)
def test_vqa_legacy_scorer(pred, answers, acc):
    assert question_accuracy(pred, answers, legacy=True) == pytest.approx(acc, abs=1e-12)
    assert vqa_legacy([pred], [answers])["score"] == pytest.approx(100 * acc)


def test_vqa_corpus_score_and_breakdowns():
    preds = ["yes", "yes", "2", "red"]
    answers = [["yes"] * 10, ["yes"] * 2 + ["no"] * 8, ["two"] * 10, ["blue"] * 10]
    meta = [
        {"answer_type": "yes/no", "question_type": "is the"},
        {"answer_type": "yes/no", "question_type": "is there"},
        {"answer_type": "number", "question_type": "how many"},
        {"answer_type": "other", "question_type": "what color is the"},
    ]
    # per question: 1.0, 0.6, 0.0 (unanimous "two" is not mapped to "2"), 0.0
    out = METRICS["vqa"](preds, answers, meta)
    assert out["score"] == pytest.approx(100 * 1.6 / 4)
    assert out["n"] == 4
    assert out["per_answer_type"] == pytest.approx({"number": 0.0, "other": 0.0, "yes/no": 80.0})
    assert out["per_question_type"]["is there"] == pytest.approx(60.0)
    assert "per_answer_type" not in vqa_accuracy(preds, answers)  # no meta, no breakdown


# ---- GQA, TVQA/How2QA, NLVR2 ----------------------------------------------------------------


def test_gqa_exact_match():
    out = exact_match(["red", "Red", "circle", "blue"], [["red"], ["red"], ["square"], ["blue"]])
    assert out == {"score": 50.0, "n": 4}  # "Red" != "red": GQA compares strings exactly
    assert METRICS["gqa"] is exact_match


@pytest.mark.parametrize("task", ["tvqa", "how2qa"])
def test_video_qa_choice_accuracy(task):
    preds, refs = ["a1", "a2", "a 3", "1", "a03"], [["a1"], ["a3"], ["a3"], ["a1"], ["a3"]]
    assert METRICS[task](preds, refs) == {"score": 20.0, "n": 5}
    assert METRICS[task] is choice_accuracy


def test_nlvr_groups_follow_the_official_rule():
    assert nlvr_sentence("dev-850-2-0") == "dev-850--0"
    assert nlvr_sentence("dev-850-2-1") == "dev-850--1"  # another sentence of the same set
    assert nlvr_sentence("val-7-1-0") == nlvr_sentence("val-7-0-0")  # synthetic: one statement


def test_nlvr_accuracy_and_consistency():
    ids = ["dev-1-0-0", "dev-1-1-0", "dev-1-2-0", "dev-1-0-1", "dev-2-0-0", "dev-2-1-0"]
    refs = [["true"], ["false"], ["true"], ["true"], ["false"], ["false"]]
    preds = ["true", "false", "true", "false", "False", "false"]  # one wrong (dev-1-0-1)
    out = nlvr_accuracy(preds, refs, [{"identifier": i} for i in ids])
    # sentences: dev-1--0 (3 right), dev-1--1 (wrong), dev-2--0 (2 right; "False" lower-cased)
    assert out["score"] == pytest.approx(100 * 5 / 6)
    assert out["consistency"] == pytest.approx(100 * 2 / 3)
    assert out["sentences"] == 3
    assert "consistency" not in nlvr_accuracy(preds, refs)


# ---- captions ---------------------------------------------------------------------------------

CAPTION_REFS = [
    ["A red circle is left of a blue square.", "a red circle and a blue square"],
    ["Two green triangles.", "there are two green triangles", "two triangles, both green"],
    ["a yellow square on a white background"],
]
CAPTION_PREDS = ["a red circle and a blue square", "Two green triangles!", ""]


def test_captions_equal_direct_pycocoevalcap_calls(monkeypatch):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor import meteor as meteor_module
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One METEOR Java process serves both sides (each start loads its paraphrase table, ~5 s);
    # an EVAL line is scored from its own statistics, so sharing it changes no number.
    meteor = meteor_module.Meteor()
    monkeypatch.setattr(meteor_module, "Meteor", lambda: meteor)
    out = METRICS["caption"](CAPTION_PREDS, CAPTION_REFS)
    # what COCOEvalCap.evaluate does: PTB-tokenise both sides separately, then each scorer
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(CAPTION_REFS)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(CAPTION_PREDS)})
    assert gts[1][0] == "two green triangles" and res[1] == ["two green triangles"]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {f"Bleu_{i + 1}": b for i, b in enumerate(bleu)}
    expected["METEOR"] = meteor.compute_score(gts, res)[0]
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    for k, v in expected.items():
        assert out[k] == float(v), k
    assert out["score"] == 100.0 * float(expected["CIDEr"])
    assert out["n"] == 3 and out["tokenizer"] == "ptb"
    assert ("SPICE" in out) == caption_mod.spice_available()
    assert METRICS["tvc"] is METRICS["yc2c"] is METRICS["caption"]


def test_caption_fallback_without_java_and_spice_skip_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(caption_mod, "have_java", lambda: False)
    monkeypatch.setattr(caption_mod, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="vlds.eval.caption"):
        a = METRICS["caption"](["a red circle"], [["a red circle", "one red circle"]])
        b = METRICS["caption"](["a red circle"], [["a red circle", "one red circle"]])
    assert a == b and a["tokenizer"] == "basic"
    assert "METEOR" not in a and "SPICE" not in a
    assert a["Bleu_1"] == pytest.approx(1.0) and a["ROUGE_L"] == pytest.approx(1.0)
    spice_lines = [r for r in caplog.records if "SPICE skipped" in r.getMessage()]
    assert len(spice_lines) == 1  # one clear line per process, never a download
    assert METRICS["caption"]([], []) == {"score": 0.0, "n": 0}


# The JVMs (PTBTokenizer, then METEOR) each get the SIGTERM of the whole process group, as from
# `scancel`, while they run; the scorer's own process only records it (as the trainer does).
GROUP_SIGNAL = r"""
import os, signal, sys, threading, time
import psutil
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
from vlds.eval.caption import caption_scores

def signal_each_jvm():
    seen = set()
    while True:
        for c in psutil.Process().children(recursive=True):
            if "java" in c.name() and c.pid not in seen:
                seen.add(c.pid)
                os.killpg(os.getpgid(0), signal.SIGTERM)
        time.sleep(0.005)

threading.Thread(target=signal_each_jvm, daemon=True).start()
refs = {i: ["a red circle", "one red circle left of a square"] for i in range(3)}
out = caption_scores(refs, {i: ["a red circle"] for i in range(3)})
print(len(got), out["tokenizer"], round(out["METEOR"], 6), round(out["CIDEr"], 6))
"""


def test_caption_scoring_survives_a_signal_to_the_whole_process_group(tmp_path):
    import subprocess
    import sys

    from vlds.eval.caption import caption_scores

    p = subprocess.run(
        [sys.executable, "-c", GROUP_SIGNAL],
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # its own process group: the signal reaches nothing else
    )
    assert p.returncode == 0, p.stderr[-3000:]
    refs = {i: ["a red circle", "one red circle left of a square"] for i in range(3)}
    quiet = caption_scores(refs, {i: ["a red circle"] for i in range(3)})
    signals, tokenizer, meteor, cider = p.stdout.split()
    assert int(signals) == 2 and tokenizer == "ptb"  # one signal while each JVM ran
    assert (float(meteor), float(cider)) == (round(quiet["METEOR"], 6), round(quiet["CIDEr"], 6))
