"""VQA accuracy as the official evaluation computes it (github GT-Vision-Lab/VQA, vqaEval.py).

Per question, with the (usually 10) human answers:

1. replace newlines/tabs by spaces and strip, the prediction and every answer;
2. only when the answers are not all equal, normalise the prediction and every answer:
   punctuation rules, then lower-case, number words -> digits, drop the articles a/an/the,
   restore contractions ("dont" -> "don't");
3. accuracy = mean over the leave-one-out subsets (each answer left out once) of
   min(1, #answers in the subset equal to the prediction / 3).

Step 2 follows the 2021 version of the script. Two consequences users meet: when the answers are
unanimous nothing is normalised, not even the case, so "Yes" against 10 x "yes" scores 0; and
"two" against a unanimous "2" scores 0 too. `legacy=True` gives the older script the reference
(VL-T5 / VL-Adapter) scored with: the prediction is always normalised, and the answers, only
when they differ, get the punctuation rules but not the rest.

    python -c "from vlds.eval.vqa import normalize_answer as n; print(n('Two dogs.'))"   # 2 dogs
"""

from __future__ import annotations

import re
from collections import defaultdict

# The official tables, spelled as in vqaEval.py. Quirks are kept on purpose: a few keys are
# capitalised and can never match a lower-cased word ("Im", "Ive", "Id've"), and "somebody'd"
# maps to "somebodyd". Changing them would change scores.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
# Neither "." (handled by PERIOD_STRIP), "'" (kept for contractions) nor ":" is in this list.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
# The official pattern, typo included: "(?!<=\d)" is a negative *lookahead* for the text "<="
# plus a digit, always true in front of ".", so this removes every period not followed by a digit
# ("5." -> "5", "1.5" kept). The script also passes re.UNICODE as the positional `count`
# argument of sub(), so at most 32 periods go: kept for bit-exact scores.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PERIOD_COUNT = re.UNICODE.value  # 32


def process_punctuation(text: str) -> str:
    """Each listed mark is deleted when it touches a space somewhere in the text (or the text
    has a digit,digit like "1,000"), otherwise replaced by a space; then periods go."""
    out = text
    digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lower-case, number words -> digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The full normalisation the official script applies to non-unanimous questions."""
    return process_digit_article(process_punctuation(_clean(text)))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(pred: str, answers: list[str], legacy: bool = False) -> float:
    """Accuracy of one prediction against its human answers, in [0, 1]."""
    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    pred = _clean(pred)
    if legacy:  # the older script: answers neither cleaned nor fully normalised
        pred = process_digit_article(process_punctuation(pred))
        if len(set(answers)) > 1:
            answers = [process_punctuation(a) for a in answers]
    else:
        answers = [_clean(a) for a in answers]
        if len(set(answers)) > 1:
            answers = [process_digit_article(process_punctuation(a)) for a in answers]
            pred = process_digit_article(process_punctuation(pred))
    # Leaving answer i out removes one match exactly when answers[i] matches.
    matches = [a == pred for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(answers)


def vqa_accuracy(
    preds: list[str], answers: list[list[str]], meta: list[dict] | None = None, legacy=False
) -> dict:
    """{"score": 0-100 accuracy, "n", and, when `meta` carries answer_type / question_type,
    "per_answer_type" / "per_question_type" (0-100 each)}."""
    accs = [question_accuracy(p, a, legacy) for p, a in zip(preds, answers, strict=True)]
    out = {"score": _pct(accs), "n": len(accs)}
    if meta is not None:
        for key in ("answer_type", "question_type"):
            groups = defaultdict(list)
            for acc, m in zip(accs, meta, strict=True):
                if key in m:
                    groups[m[key]].append(acc)
            if groups:
                out[f"per_{key}"] = {k: _pct(v) for k, v in sorted(groups.items())}
    return out


def _pct(xs: list[float]) -> float:
    return 100.0 * sum(xs) / max(1, len(xs))
