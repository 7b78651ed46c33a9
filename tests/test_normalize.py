"""eval.normalize: numbers: a number written in words (the references, num2words) and the way a model writes it
(digits, ordinal markers, digit groups) compare equal; different numbers, or an ordinal and a cardinal, do not."""

import pytest

from prune_cli.data.normalize import number_form
from prune_cli.data.synth import number_text

# (number, num2words form, how a model may write it): the reference is num2words' text, as the corpus writes it.
EQUAL = {
    "en": [(1953, "year", "1953"), (1905, "year", "1905."), (2005, "year", "2005"), (2023, "year", "2023"),
           (1100, "year", "1100"), (2050, "year", "2050"), (23, "ordinal", "23rd"), (1, "ordinal", "1st"),
           (101, "ordinal", "101st"), (999, "ordinal", "999th"), (12, "ordinal", "12th"), (7316, "cardinal", "7,316"),
           (7316, "cardinal", "7316."), (1000, "cardinal", "1,000"), (0, "cardinal", "0"), (153, "cardinal", "153"),
           (802, "cardinal", "800 and 2"), (741, "ordinal", "700 and 41st"), (7009, "cardinal", "7,000 and 9")],
    "de": [(1953, "year", "1953"), (1100, "year", "1100"), (2005, "year", "2005"), (23, "ordinal", "23."),
           (1, "ordinal", "1."), (101, "ordinal", "101."), (999, "ordinal", "999."), (23, "cardinal", "23."),
           (7316, "cardinal", "7.316"), (7316, "cardinal", "7316"), (5000, "cardinal", "5 000"), (0, "cardinal", "0"),
           (1000, "cardinal", "1000"), (21, "cardinal", "21"), (17, "cardinal", "17")],
    "fr": [(1953, "year", "1953"), (2005, "year", "2005"), (23, "ordinal", "23e"), (23, "ordinal", "23ème"),
           (1, "ordinal", "1er"), (1, "ordinal", "1re"), (999, "ordinal", "999e"), (7316, "cardinal", "7 316"),
           (7316, "cardinal", "7\u202f316"), (21, "cardinal", "21"), (71, "cardinal", "71"), (99, "cardinal", "99"),
           (80, "cardinal", "80"), (0, "cardinal", "0"), (1000, "cardinal", "1000")],
    "es": [(1953, "year", "1953"), (2005, "year", "2005"), (23, "ordinal", "23º"), (23, "ordinal", "23.º"),
           (23, "ordinal", "23°"), (1, "ordinal", "1.º"), (15, "ordinal", "15ª"), (999, "ordinal", "999º"),
           (7316, "cardinal", "7.316"), (7316, "cardinal", "7316"), (21, "cardinal", "21"), (16, "cardinal", "16"),
           (500, "cardinal", "500"), (0, "cardinal", "0"), (1000, "cardinal", "1000")],
    "it": [(1953, "year", "1953"), (1100, "year", "1100"), (2005, "year", "2005"), (23, "ordinal", "23º"),
           (23, "ordinal", "23°"), (1, "ordinal", "1°"), (3, "ordinal", "3ª"), (999, "ordinal", "999º"),
           (7316, "cardinal", "7.316"), (7316, "cardinal", "7316"), (21, "cardinal", "21"), (23, "cardinal", "23"),
           (118, "cardinal", "118"), (0, "cardinal", "0"), (1000, "cardinal", "1000")],
}

# Pairs that must stay apart: another number, or an ordinal against a cardinal where the language marks it.
DIFFERENT = {
    "en": [("twenty-third", "23"), ("nineteen fifty-three", "1935"), ("seven thousand three hundred", "7,316"),
           ("first", "1"), ("eight hundred and two", "800 and 20")],
    "de": [("dreiundzwanzig", "32"), ("am dreiundzwanzigsten mai", "am 23 mai"), ("siebentausend", "7.316")],
    "fr": [("vingt-troisième", "23"), ("soixante et onze", "61"), ("premier", "1")],
    "es": [("vigésimo tercero", "23"), ("dieciséis", "6")],
    "it": [("ventitreesimo", "23"), ("centodiciotto", "180")],
}


@pytest.mark.parametrize("lang", sorted(EQUAL))
def test_each_language_has_a_table_of_at_least_15_cases(lang):
    assert len(EQUAL[lang]) >= 15


@pytest.mark.parametrize("lang,number,form,written", [(lang, *row) for lang, rows in EQUAL.items() for row in rows])
def test_a_number_in_words_equals_the_digits_a_model_writes(lang, number, form, written):
    ref = number_text(number, lang, form)
    assert number_form(ref, lang) == number_form(written, lang), (ref, written)


@pytest.mark.parametrize("lang,ref,written", [(lang, *row) for lang, rows in DIFFERENT.items() for row in rows])
def test_a_different_number_stays_different(lang, ref, written):
    assert number_form(ref, lang) != number_form(written, lang)


def test_words_around_numbers_are_normalized_too():
    assert number_form("In Nineteen Fifty-Three, we won!", "en") == "in 1953 we won"
    assert number_form("Am 23. Mai.", "de") == "am 23º mai"
    assert number_form("Between 800 and 900.", "en") == "between 800 and 900"  # 900 is no tail of 800


def test_a_language_text2num_does_not_know_keeps_its_words():
    assert number_form("Dvadtsat' Tri", "ru") == "dvadtsat' tri"
