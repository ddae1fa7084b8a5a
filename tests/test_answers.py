"""Free-form answer matching: first answer, normalisation, match / begins-with / contained."""

import pytest

from simu_core.answers import (
    answer_begins_with,
    answer_contained,
    answer_matches,
    any_reference,
    first_answer,
    first_line,
    gives_answer,
    match_rate,
    normalise,
    sentence_count,
)
from simu_core.errors import SimuError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" Paris.\n\nThe answer is: 2018", "Paris."),
        ("Paris", "Paris"),
        ("\n\n  Tokyo!  And more", "Tokyo!"),
        ("Is it Rome? Yes it is.", "Is it Rome?"),
        ("St. Petersburg is in Russia. It is big.", "St. Petersburg is in Russia."),
        ("F. Scott Fitzgerald. He wrote it.", "F. Scott Fitzgerald."),
        ("J. R. R. Tolkien wrote it", "J. R. R. Tolkien wrote it"),
        ("Washington, D.C. is the capital. Next", "Washington, D.C. is the capital."),
        ("Pi is 3.14. Roughly.", "Pi is 3.14."),
        ("It was 1990. Then", "It was 1990."),
        ("Mt. Fuji, Japan", "Mt. Fuji, Japan"),
        ("Wait... what", "Wait..."),
        ("", ""),
        ("\n \n", ""),
    ],
)
def test_first_answer(text, expected):
    assert first_answer(text) == expected


def test_first_line_skips_blank_lines():
    assert first_line("\n  \n second line \nthird") == "second line"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Yen", "yen"),
        ("  An   apple, a day!  ", "apple day"),
        ("Malé", "male"),
        ("Brasília", "brasilia"),
        ("Chișinău", "chisinau"),
        ("Washington, D.C.", "washington dc"),
        ("Sana'a", "sanaa"),
        ("Port-au-Prince", "port au prince"),
        ("3.14", "314"),
        ("Theatre", "theatre"),  # articles only as whole words
    ],
)
def test_normalise(text, expected):
    assert normalise(text) == expected


def test_answer_matches_uses_the_first_answer_only():
    assert answer_matches(" Paris.\n\nThe city of light.", "Paris")
    assert answer_matches("the yen.", "Yen")
    assert answer_matches("Brasilia", "Brasília")
    assert not answer_matches("Paris, France.", "Paris")
    assert not answer_matches("Lyon. Paris.", "Paris")
    assert not answer_matches("anything", "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", 1),
        ("Paris.", 1),
        ("Saan Dodru was born on September 22, 1930.", 1),
        ("He was born in Paris. He writes novels.", 2),
        ("He was born in Paris. He writes", 2),
        ("He lives in\nParis. Really!", 2),
        ("J. R. R. Tolkien", 1),
        ("Washington, D.C.", 1),
        ("", 0),
    ],
)
def test_sentence_count(text, expected):
    assert sentence_count(text) == expected


def test_first_answer_takes_as_many_sentences_as_asked():
    assert first_answer("One. Two. Three.", 2) == "One. Two."
    assert first_answer("One. Two", 3) == "One. Two"  # fewer sentences: the whole line


def test_answer_matches_a_full_sentence_answer_followed_by_more_text():
    reference = "Saan Dodru was born in Hescorstad."
    assert answer_matches("Saan Dodru was born in Hescorstad. I hope this helps!", reference)
    assert answer_matches("saan dodru was born in Hescorstad\nQuestion: next", reference)
    assert not answer_matches("Saan Dodru was born in Hescorstad, a city.", reference)
    two = "He was born in Paris. He writes novels."
    assert answer_matches("He was born in Paris. He writes novels. Ask me more.", two)
    assert not answer_matches("He was born in Paris. He paints.", two)


def test_answer_begins_with_needs_whole_words():
    assert answer_begins_with("yen, which is the official currency of Japan.", "yen")
    assert answer_begins_with("Paris, France.", "Paris")
    assert answer_begins_with("J. R. R. Tolkien, the author", "J. R. R. Tolkien")
    assert not answer_begins_with("Parisian food.", "Paris")
    assert not answer_begins_with("not Paris.", "Paris")
    assert not answer_begins_with("Lyon. Paris is elsewhere.", "Paris")


def test_answer_contained_checks_whole_words_anywhere():
    assert answer_contained("I think it is Paris. Or not.", "paris")
    assert answer_contained("the capital is Kuala Lumpur", "Kuala Lumpur")
    assert not answer_contained("Parisian", "Paris")
    assert not answer_contained("Kuala is a word", "Kuala Lumpur")
    assert not answer_contained("something", "")


def test_any_reference_and_match_rate():
    assert any_reference("Kiev.", ["Kyiv", "Kiev"])
    assert not any_reference("Lviv.", ["Kyiv", "Kiev"], rule="begins")
    assert match_rate(["Paris.", "Rome, Italy", "Oslo"], ["Paris", "Rome", "Bern"]) == pytest.approx(1 / 3)
    assert match_rate(["Paris.", "Rome, Italy", "Oslo"], ["Paris", "Rome", "Bern"], rule="begins") == pytest.approx(
        2 / 3
    )
    assert match_rate([], []) == 0.0


def test_bad_rule_and_lengths_are_clear_errors():
    with pytest.raises(SimuError, match="unknown answer rule 'fuzzy'"):
        any_reference("a", ["a"], rule="fuzzy")
    with pytest.raises(SimuError, match="2 predictions for 1 references"):
        match_rate(["a", "b"], ["a"])


def test_gives_answer_uses_accepted_answers_where_the_item_has_them():
    fact = {"answer": "Kyiv", "accepted_answers": ["Kyiv", "Kiev"]}
    assert gives_answer("Kiev, the capital of Ukraine.", fact)  # begins with an accepted spelling
    assert not gives_answer("the capital is Kyiv.", fact)  # must begin with it
    author = {"answer": "Lima"}  # no accepted answers: the exact-match rule (first sentence equals the answer)
    assert gives_answer("Lima. She moved later.", author) and not gives_answer("Lima, Peru.", author)
