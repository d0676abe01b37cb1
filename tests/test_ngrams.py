"""The whitespace-insensitive n-gram index (router/ngrams.py) on a made-up vocabulary: a quote
whose lines the model re-wrapped is still found, and its continuation starts with the token
the model would write after the break it already made."""

from __future__ import annotations

from router.ngrams import NgramIndex, TokenKeys

TEXTS = ["\n", " ", "the", " the", "first", " first", "function", " function", " call", "call",
         " in", "in", " <", "<", "a", " statement", "\ufffd", " \ufffd"]  # fmt: skip
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
