"""Text normalization for scoring: the same text in one written form, so WER counts words, not spelling conventions.

`normalize` lowercases and drops punctuation. `number_form` also writes every number as digits, one form per
number, in the five languages the demo speaks (en, de, fr, es, it), so that a model writing "1953", "23rd" or "7,316"
and a reference saying "nineteen fifty-three", "twenty-third" or "seven thousand, three hundred and sixteen" agree:

- cardinals: words -> digits (text2num's alpha2digit); digit groups joined ("7,316", "7.316", "7 316" -> 7316);
- ordinals: every language's written markers ("23rd", "23.", "23e", "23ème", "23º", "23ª", "23°") -> "23º";
- English years said in pairs: "nineteen fifty-three" -> "19 53" -> "1953"; "nineteen oh five" -> "1905";
- English digits joined by the spoken "and" of hundreds and thousands: "800 and 2" -> "802", "700 and 41st" -> "741º"
  (how Whisper writes "eight hundred and two"; "between 800 and 900" stays apart, since 900 is no tail).

German writes an ordinal as "23.", which at the end of a text cannot be told from a full stop after a cardinal
("dreiundzwanzig." and "dreiundzwanzigste" both read "23."); there the number counts as the cardinal, for references
and hypotheses alike. Languages text2num does not know keep their number words.
"""

from __future__ import annotations

import re
import unicodedata

NORMALIZATION = "lowercase; punctuation except apostrophes and hyphens removed; whitespace collapsed"
NUMBERS_NORMALIZATION = ("; numbers as digits (text2num's alpha2digit; digit groups joined; ordinals as Nº in every "
                         "language; English paired years and 'N00 and M' joined; German N. at the end of a text is the cardinal)")
ORDINAL = "º"  # a letter to regex (\w), so punctuation removal keeps it

_PUNCT = re.compile(r"[^\w\s'\-]", re.UNICODE)
# 3,757  3.757  3 757 (also no-break and narrow no-break spaces)  3'757 -> 3757: a group of exactly three digits
_DIGIT_GROUP = re.compile(r"(?<=\d)[,.'\u2019 \u00a0\u202f](?=\d{3}(?!\d)(?![.,]\d))")
# Written ordinal markers after digits, per language (longest first); "." only where it is the language's marker.
ORDINAL_MARKERS = {
    "en": ("st", "nd", "rd", "th"),
    "de": (".",),
    "fr": ("ères", "ère", "ème", "emes", "eme", "ers", "er", "res", "re", "nde", "nd", "es", "e"),
    "es": (".º", ".ª", ".er", ".o", ".a", "º", "ª", "°", "er", "os", "as", "o", "a"),
    "it": (".º", ".ª", "º", "ª", "°", "esimo", "esima", "o", "a"),
}
_ORDINAL_RE = {lang: re.compile(r"(?<![\w.,])(\d+)(?:" + "|".join(re.escape(m) for m in marks) + r")(?![\w])")
               for lang, marks in ORDINAL_MARKERS.items()}
_EN_YEAR = re.compile(r"\b(1[0-9]|20) (?:(oh) ([1-9])|([1-9][0-9]))\b")
_EN_AND = re.compile(r"\b([1-9][0-9]*00) and ([1-9][0-9]?)(" + ORDINAL + r"?)\b")


def normalize(text: str) -> str:
    """Lowercase, punctuation (but apostrophes and hyphens) removed, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", unicodedata.normalize("NFC", text).lower()).split())


def _ordinals(text: str, lang: str) -> str:
    pattern = _ORDINAL_RE.get(lang)
    if pattern is None:
        return text
    if lang == "de":  # a final "23." is the full stop after a cardinal as often as an ordinal
        text = re.sub(r"(\d)\.\s*$", r"\1", text)
    return pattern.sub(lambda m: m.group(1) + ORDINAL, text)


def _en_years(text: str) -> str:
    text = _EN_AND.sub(lambda m: str(int(m.group(1)) + int(m.group(2))) + m.group(3), text)
    return _EN_YEAR.sub(lambda m: m.group(1) + ("0" + m.group(3) if m.group(2) else m.group(4)), text)


def number_form(text: str, lang: str) -> str:
    """`normalize` with every number as digits in one form (see the module docstring)."""
    from text_to_num import alpha2digit

    text = unicodedata.normalize("NFC", text).lower().strip()
    text = _ordinals(_DIGIT_GROUP.sub("", text), lang)  # written digits, before punctuation goes
    text = normalize(text)
    if lang == "en":  # "oh-five" is two words to alpha2digit: "oh" stays, "five" becomes 5
        text = re.sub(r"\boh-", "oh ", text)
    try:
        text = alpha2digit(text, lang, threshold=0)
    except ValueError:  # a language text2num does not know
        return text
    text = normalize(_ordinals(_DIGIT_GROUP.sub("", text), lang))  # the digits alpha2digit wrote
    return _en_years(text) if lang == "en" else text
