"""IncrementalDetokenizer with no model: token ids from the embedded SmolLM2 byte-level BPE (and
two toy decoders that make token boundaries explicit), fed in every chunking; the reference is
one `decode` of all ids, or the text cut before the stop string."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from launcher.embedded import ensure_embedded_model
from router.http.detokenize import IncrementalDetokenizer

FFFD = "\ufffd"

# Pieces that stress byte-level BPE: multi-byte characters, combining marks, emoji built from
# several code points (skin tones, ZWJ families, flags), and whitespace runs the pre-tokenizer
# splits on.
_PIECES = [
    "hello",
    " world",
    "The end.",
    "café",
    "naïve",
    "e\u0301",
    "Ünïcödé",
    "straße",
    "Ωμέγα",
    "世界",
    "你好，",
    "日本語のテキスト",
    "한국어",
    "😀",
    "👍🏽",
    "👨\u200d👩\u200d👧\u200d👦",
    "🏳\ufe0f\u200d🌈",
    "🇯🇵",
    "→",
    "…",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    " \n  ",
    "12345",
    " don't",
    "!?",
]
# SmolLM2's vocabulary lacks a few control bytes and the lead bytes of U+40000..U+BFFFF, which it
# cannot encode at all; leave those out so that every text round-trips through the tokenizer.
_CHARS = st.characters(
    max_codepoint=0x3FFFF,
    blacklist_categories=("Cs",),
    blacklist_characters=FFFD + "\x04\x06\x13\x14\x16\x1d",
)
TEXTS = st.lists(
    st.one_of(st.sampled_from(_PIECES), st.text(_CHARS, min_size=1, max_size=4)),
    min_size=1,
    max_size=16,
).map("".join)
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ensure_embedded_model())


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _chunks(ids: list[int], sizes: list[int]) -> list[list[int]]:
    """Split ids into consecutive groups of the given sizes (cycled); a 0 feeds an empty list."""
    if not any(sizes):
        sizes = [1]
    out, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        out.append(ids[i : i + n])
        i += n
        k += 1
    return out


def _feed(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> tuple[list[str], str]:
    """Pieces returned by each add_tokens call, and what flush returns."""
    pieces = [detok.add_tokens(c) for c in chunks]
    return pieces, detok.flush()


CHUNK_SIZES = st.lists(st.integers(0, 7), max_size=6)


def _occurrences(text: str, stops: list[str]) -> list[tuple[int, int]]:
    """(start, end) of every occurrence of every stop string in text."""
    out = []
    for s in stops:
        i = text.find(s)
        while i != -1:
            out.append((i, i + len(s)))
            i = text.find(s, i + 1)
    return out


# -- no stop strings -------------------------------------------------------------------------


@SETTINGS
@given(text=TEXTS, sizes=CHUNK_SIZES)
def test_output_equals_one_decode_of_all_ids(tok, text, sizes):
    ids = _encode(tok, text)
    assert tok.decode(ids) == text  # the strategy only draws texts the tokenizer round-trips
    pieces, tail = _feed(IncrementalDetokenizer(tok, []), _chunks(ids, sizes))
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=True)


@SETTINGS
@given(text=TEXTS)
def test_one_token_at_a_time_equals_one_decode(tok, text):
    ids = _encode(tok, text)
    pieces, tail = _feed(IncrementalDetokenizer(tok, []), [[i] for i in ids])
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=True)


@SETTINGS
@given(prompt=TEXTS, text=TEXTS, sizes=CHUNK_SIZES)
def test_prompt_context_does_not_leak_into_output(tok, prompt, text, sizes):
    prompt_ids, ids = _encode(tok, prompt), _encode(tok, text)
    pieces, tail = _feed(IncrementalDetokenizer(tok, prompt_ids), _chunks(ids, sizes))
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=True)


@SETTINGS
@given(text=TEXTS, sizes=CHUNK_SIZES)
def test_no_piece_holds_a_replacement_character(tok, text, sizes):
    ids = _encode(tok, text)
    assume(FFFD not in tok.decode(ids))
    pieces, tail = _feed(IncrementalDetokenizer(tok, []), _chunks(ids, sizes))
    assert all(FFFD not in p for p in [*pieces, tail])


@SETTINGS
@given(text=TEXTS)
def test_text_is_released_as_soon_as_its_tokens_end_on_a_whole_character(tok, text):
    # Without stop strings only tokens ending inside a UTF-8 character may wait for later ones.
    ids = _encode(tok, text)
    detok = IncrementalDetokenizer(tok, [])
    emitted, whole = "", ""
    for k, token in enumerate(ids, start=1):
        emitted += detok.add_tokens([token])
        decoded = tok.decode(ids[:k])
        if not decoded.endswith(FFFD):
            whole = decoded
        assert emitted == whole


# -- stop strings ----------------------------------------------------------------------------


@st.composite
def _text_and_stop(draw):
    text = draw(TEXTS)
    i = draw(st.integers(0, len(text) - 1))
    j = draw(st.integers(i + 1, min(len(text), i + 12)))
    return text, text[i:j]


@SETTINGS
@given(case=_text_and_stop(), sizes=CHUNK_SIZES)
def test_output_ends_before_first_occurrence_of_stop(tok, case, sizes):
    text, stop = case
    ids = _encode(tok, text)
    full = tok.decode(ids)
    assume(stop in full)
    detok = IncrementalDetokenizer(tok, [], stop=(stop,))
    pieces, tail = _feed(detok, _chunks(ids, sizes))
    out = "".join(pieces) + tail
    assert out == full[: full.find(stop)]
    assert detok.stopped_on == stop
    assert tail == ""  # the stop was acted on inside add_tokens, not left for flush


@SETTINGS
@given(text=TEXTS, stop=st.text(_CHARS, min_size=1, max_size=6), sizes=CHUNK_SIZES)
def test_absent_stop_gives_the_full_text(tok, text, stop, sizes):
    ids = _encode(tok, text)
    full = tok.decode(ids)
    assume(stop not in full)
    detok = IncrementalDetokenizer(tok, [], stop=(stop,))
    pieces, tail = _feed(detok, _chunks(ids, sizes))
    assert "".join(pieces) + tail == full
    assert detok.stopped_on is None


@st.composite
def _text_and_stops(draw):
    text = draw(TEXTS)
    stops = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            i = draw(st.integers(0, len(text) - 1))
            stops.append(text[i : draw(st.integers(i + 1, min(len(text), i + 8)))])
        else:
            stops.append(draw(st.text(_CHARS, min_size=1, max_size=3)))
    return text, stops


@SETTINGS
@given(case=_text_and_stops(), sizes=CHUNK_SIZES)
def test_many_stops_end_output_at_the_first_completed_stop(tok, case, sizes):
    text, stops = case
    ids = _encode(tok, text)
    full = tok.decode(ids)
    detok = IncrementalDetokenizer(tok, [], stop=tuple(stops))
    pieces, tail = _feed(detok, _chunks(ids, sizes))
    out = "".join(pieces) + tail
    occ = _occurrences(full, stops)
    if not occ:
        assert out == full and detok.stopped_on is None
        return
    assert detok.stopped_on in stops
    assert full.startswith(out) and full[len(out) :].startswith(detok.stopped_on)
    assert not any(s in out for s in stops)
    first_start, first_end = min(occ)
    if first_end == min(end for _, end in occ):
        # The earliest-starting stop is also complete first: nothing else can win.
        assert out == full[:first_start]
    else:
        # A stop nested inside a longer one completes first; it wins if its token came first.
        assert (len(out), len(out) + len(detok.stopped_on)) in occ


@SETTINGS
@given(case=_text_and_stops(), sizes=CHUNK_SIZES)
def test_no_stop_string_is_ever_emitted(tok, case, sizes):
    text, stops = case
    ids = _encode(tok, text)
    detok = IncrementalDetokenizer(tok, [], stop=tuple(stops))
    emitted = ""
    for chunk in _chunks(ids, sizes):
        emitted += detok.add_tokens(chunk)
        assert not any(s in emitted for s in stops)
    emitted += detok.flush()
    assert not any(s in emitted for s in stops)


@SETTINGS
@given(case=_text_and_stop(), sizes_a=CHUNK_SIZES, sizes_b=CHUNK_SIZES)
def test_output_does_not_depend_on_chunking(tok, case, sizes_a, sizes_b):
    text, stop = case
    ids = _encode(tok, text)
    outs = []
    for sizes in (sizes_a, sizes_b):
        detok = IncrementalDetokenizer(tok, [], stop=(stop,))
        pieces, tail = _feed(detok, _chunks(ids, sizes))
        outs.append(("".join(pieces) + tail, detok.stopped_on))
    assert outs[0] == outs[1]


# -- explicit examples, real tokenizer --------------------------------------------------------

ALL_CHUNKINGS = [[1], [2], [3], [1, 4], [100]]


@pytest.mark.parametrize("sizes", ALL_CHUNKINGS)
def test_multi_token_stop_string(tok, sizes):
    text = "The answer is 42. The end of the story, and more text."
    stop = "The end of the story"
    assert len(_encode(tok, stop)) >= 4
    detok = IncrementalDetokenizer(tok, [], stop=(stop,))
    pieces, tail = _feed(detok, _chunks(_encode(tok, text), sizes))
    assert "".join(pieces) + tail == "The answer is 42. "
    assert detok.stopped_on == stop


@pytest.mark.parametrize("sizes", ALL_CHUNKINGS)
def test_stop_at_the_very_start_emits_nothing(tok, sizes):
    detok = IncrementalDetokenizer(tok, [], stop=("世界",))
    pieces, tail = _feed(detok, _chunks(_encode(tok, "世界 hello world"), sizes))
    assert pieces == [""] * len(pieces) and tail == ""
    assert detok.stopped_on == "世界"


@pytest.mark.parametrize("sizes", ALL_CHUNKINGS)
def test_stop_spanning_many_tokens_with_emoji_and_cjk(tok, sizes):
    stop = "👨\u200d👩\u200d👧\u200d👦 家族 café 🏳\ufe0f\u200d🌈"
    text = f"before {stop} after"
    assert len(_encode(tok, stop)) >= 15
    detok = IncrementalDetokenizer(tok, [], stop=(stop,))
    pieces, tail = _feed(detok, _chunks(_encode(tok, text), sizes))
    assert "".join(pieces) + tail == "before "
    assert all(FFFD not in p for p in pieces)


@pytest.mark.parametrize("stops", [("aa", "aab"), ("aab", "aa")])
@pytest.mark.parametrize("sizes", ALL_CHUNKINGS)
def test_overlapping_stops_cut_at_the_shared_start(tok, stops, sizes):
    detok = IncrementalDetokenizer(tok, [], stop=stops)
    pieces, tail = _feed(detok, _chunks(_encode(tok, "xyz aab tail"), sizes))
    assert "".join(pieces) + tail == "xyz "
    assert detok.stopped_on in stops


@pytest.mark.parametrize("sizes", ALL_CHUNKINGS)
def test_stop_text_is_held_back_until_ruled_out(tok, sizes):
    # "The end" keeps "The" back until " story" shows it is not the stop.
    detok = IncrementalDetokenizer(tok, [], stop=("The end",))
    pieces, tail = _feed(detok, _chunks(_encode(tok, "Once upon a time. The story"), sizes))
    assert "".join(pieces) + tail == "Once upon a time. The story"
    assert detok.stopped_on is None


def test_special_tokens_are_skipped(tok):
    ids = _encode(tok, "hi there") + [tok.convert_tokens_to_ids("<|im_end|>")]
    pieces, tail = _feed(IncrementalDetokenizer(tok, []), [[i] for i in ids])
    assert "".join(pieces) + tail == "hi there"


def test_empty_add_tokens_returns_empty(tok):
    detok = IncrementalDetokenizer(tok, _encode(tok, "prompt"))
    assert detok.add_tokens([]) == ""
    assert detok.flush() == ""
