"""The whitespace-insensitive n-gram index (router/lookahead/ngrams.py) on a made-up vocabulary: a
quote whose lines the model re-wrapped is still found, and its continuation starts with the token
the model would write after the break it already made; a line break in a draft also comes as
the model may re-wrap it; a passage being copied keeps its place after a departure; drafts
follow how the sequence has been writing the text's whitespace."""

from __future__ import annotations

from router.lookahead.ngrams import NgramIndex, TokenKeys

TEXTS = ["\n", " ", "the", " the", "first", " first", "function", " function", " call", "call",
         " in", "in", " <", "<", "a", " statement", "\ufffd", " \ufffd", "\n  ",
         "\n\n"]  # fmt: skip
ID = {t: i for i, t in enumerate(TEXTS)}


def _ids(*texts: str) -> list[int]:
    return [ID[t] for t in texts]


def test_keys_strip_whitespace_and_map_spaced_tokens_to_their_bare_form():
    keys = TokenKeys(TEXTS)
    assert keys.key[ID["\n"]] == keys.key[ID[" "]] == -1
    assert keys.key[ID["first"]] == keys.key[ID[" first"]]
    assert keys.key[ID["first"]] != keys.key[ID["function"]]
    assert keys.unspaced[ID[" <"]] == ID["<"] and keys.unspaced[ID["a"]] == ID["a"]
    # partial UTF-8 pieces decode alike but are different bytes: never equal keys
    assert keys.key[ID["\ufffd"]] != keys.key[ID[" \ufffd"]]


def test_a_rewrapped_quote_is_found_where_raw_tokens_lose_it():
    doc = _ids("the", " first", "\n", "function", " call", "\n", "in", " <", "a", " statement")
    answer = _ids(" the", " first", " function", " call", " in", "\n")
    raw = NgramIndex(max_ngram=4)
    raw.extend(doc + answer)
    words = NgramIndex(max_ngram=4, keys=TokenKeys(TEXTS))
    words.extend(doc + answer)
    # raw: only "\n" matches, whose latest earlier occurrence is followed by "in"
    assert raw.continuations(depth=3, limit=1) == [_ids("in", " <", "a")]
    # words: "first function call in" matches; the answer already broke the line, so the
    # quote's " <" comes back as "<"
    assert words.continuations(depth=3, limit=1) == [_ids("<", "a", " statement")]
    assert words.continuations(depth=3, limit=2) == [
        _ids("<", "a", " statement"),
        _ids("in", " <", "a"),
    ]


def test_a_strong_raw_match_leads():
    keys = TokenKeys(TEXTS)
    idx = NgramIndex(max_ngram=4, keys=keys)
    idx.extend(_ids("the", " first", "function", " call", "a") + _ids("the", " first", "function"))
    assert idx.continuations(depth=2, limit=2)[0] == _ids(" call", "a")


def test_a_line_break_in_a_draft_also_comes_joined_and_unindented():
    keys = TokenKeys(TEXTS)
    assert keys.spaced[ID["function"]] == ID[" function"] and keys.spaced[ID["\n"]] == -1
    plain = NgramIndex(max_ngram=4, keys=keys)
    plain.extend(_ids("the", " first", "\n", "function", " call") + _ids("the", " first"))
    assert plain.continuations(depth=3, limit=2) == [
        _ids("\n", "function", " call"),
        _ids(" function", " call"),  # re-wrapped: the break became a space
    ]
    indented = NgramIndex(max_ngram=4, keys=keys)
    indented.extend(_ids("the", " first", "\n  ", " function", " call") + _ids("the", " first"))
    assert indented.continuations(depth=3, limit=2) == [
        _ids("\n  ", " function", " call"),
        _ids(" function", " call"),
        _ids("\n", "function", " call"),  # the indentation dropped
    ]
    # a single chain (limit 1) stays the passage itself
    assert indented.continuations(depth=3, limit=1) == [_ids("\n  ", " function", " call")]


DOC = _ids("the", " first", "function", " call", " in", " statement", " in")
DOC += _ids("a") * 40 + _ids(" statement", "<")
DEPARTED = _ids(" call", " statement")  # the model copies " call", then skips " in"


def _copying() -> NgramIndex:
    idx = NgramIndex(max_ngram=4, keys=TokenKeys(TEXTS))
    idx.extend(DOC + _ids("the", " first", "function"))
    assert idx.continuations(depth=2, limit=1) == [_ids(" call", " in")]
    idx.extend(DEPARTED)
    return idx


def test_a_copied_passage_keeps_its_place_after_the_model_departs_from_it():
    fresh = NgramIndex(max_ngram=4, keys=TokenKeys(TEXTS))
    fresh.extend(DOC + _ids("the", " first", "function") + DEPARTED)
    # only " statement" matches, twice: alone, the latest occurrence leads; while copying,
    # the one where the copy has got to
    assert fresh.continuations(depth=2, limit=1) == [_ids("<", "the")]
    copying = _copying()
    assert copying.continuations(depth=2, limit=1) == [_ids(" in", "a")]
    # a draft whose first token the model did not take does not move the copy's place; one
    # whose first token it took does
    refused, taken = copying, _copying()
    taken.continuations(depth=2, limit=1)
    refused.extend(_ids("<"))
    taken.extend(_ids(" in"))
    refused.continuations(depth=2, limit=1)
    taken.continuations(depth=2, limit=1)
    assert refused.copy_at == 3 and taken.copy_at == 6


def test_keys_know_bare_breaks_and_the_bare_form_of_an_indented_one():
    keys = TokenKeys(TEXTS)
    assert keys.bare_breaks[ID["\n"]] and keys.bare_breaks[ID["\n\n"]]
    assert not keys.bare_breaks[ID["\n  "]] and not keys.bare_breaks[ID[" "]]
    assert keys.dedented[ID["\n  "]] == ID["\n"]
    assert keys.dedented[ID["\n"]] == keys.dedented[ID[" "]] == keys.dedented[ID["in"]] == -1


# Two indented lines, then the model starting to quote them
INDENTED = _ids("the", " first", "\n  ", " function", " call", "\n  ", " in", " statement", "a")


def test_drafts_drop_the_indentation_once_the_model_has_dropped_it():
    idx = NgramIndex(max_ngram=4, keys=TokenKeys(TEXTS))
    idx.extend(INDENTED + _ids("the", " first"))
    assert idx.continuations(depth=3, limit=1) == [_ids("\n  ", " function", " call")]
    idx.extend(_ids("\n", "function", " call"))  # the break bare, the word without its space
    # every indented break of the text now comes bare, and the word after it unspaced
    assert idx.continuations(depth=3, limit=1) == [_ids("\n", "in", " statement")]
    assert idx.style.dedent
    idx.extend(_ids("\n  ", " in"))  # ... until the model keeps an indentation after all
    idx.continuations(depth=3, limit=1)
    assert not idx.style.dedent
    assert idx.style.apply(INDENTED) == INDENTED


def test_a_break_the_model_writes_as_another_is_drafted_its_way():
    idx = NgramIndex(max_ngram=4, keys=TokenKeys(TEXTS))
    text = _ids("the", " first", "\n", "function", " call", "\n", "in", " statement", "a")
    idx.extend(text + _ids("the", " first"))
    assert idx.continuations(depth=2, limit=1) == [_ids("\n", "function")]
    idx.extend(_ids("\n\n", "function", " call"))  # double-spaced
    assert idx.continuations(depth=2, limit=1) == [_ids("\n\n", "in")]
    # a difference between words teaches nothing
    idx.extend(_ids("\n\n", "a"))
    idx.continuations(depth=2, limit=1)
    assert idx.style.respell == {ID["\n"]: ID["\n\n"]} and not idx.style.dedent
