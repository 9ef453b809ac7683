import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf_core import caseops
from pgolf_core.caseops import ALLCAPS, CAPNEXT, ESC, OPERATORS, TITLE

PROPERTY = settings(max_examples=300, deadline=None)

# Original text: words of every case pattern are common (a 2-letter alphabet in both
# cases makes mixed, title and all-caps words likely), mixed with literal operators,
# digits, whitespace runs, other scripts and arbitrary Unicode (no lone surrogates).
_words = st.text(alphabet="aAbBzZ", min_size=1, max_size=6)
_known = st.sampled_from(["NASA", "iPhone", "ABc", "McDonald", "I", "A", "a", "the", "The", "eBay", "HTTPs"])
_other = st.sampled_from([*OPERATORS, " ", "  ", "\n", "\t", "0", "42", "-", "é", "ß", "Ω", "Ж", "中", "😀", "\u2581"])
_any_char = st.characters(exclude_categories=("Cs",))
originals = st.lists(st.one_of(_words, _known, _other, _any_char), max_size=30).map("".join)

# Candidate encoded text: random strings over the alphabet encode writes (plus an
# uppercase letter), and near misses: valid encodings with one character inserted,
# deleted or replaced.
_encoded_alphabet = [*OPERATORS, "a", "b", "A", " ", "é", "1", "\u2581"]


@st.composite
def _near_misses(draw):
    encoded = caseops.encode(draw(st.lists(st.one_of(_words, _other), max_size=6).map("".join)))
    i = draw(st.integers(0, len(encoded)))
    c = draw(st.sampled_from([*OPERATORS, *_encoded_alphabet]))  # operators twice as likely
    return draw(st.sampled_from([encoded[:i] + c + encoded[i:], encoded[:i] + encoded[i + 1 :], encoded[:i] + c + encoded[i + 1 :]]))


candidates = st.one_of(st.text(alphabet=_encoded_alphabet, max_size=12), _near_misses())


@PROPERTY
@given(originals)
def test_decode_inverts_encode(text):
    assert caseops.decode(caseops.encode(text)) == text


@PROPERTY
@given(originals)
def test_encoded_text_has_no_ascii_uppercase(text):
    assert not re.search("[A-Z]", caseops.encode(text))


@PROPERTY
@given(candidates)
def test_decode_accepts_exactly_what_encode_produces(encoded):
    """Accepted => re-encodes to itself; with the round trip above, accepted == image of encode."""
    try:
        decoded = caseops.decode(encoded)
    except ValueError:
        with pytest.raises(ValueError):  # the byte counter runs the same state machine
            caseops.original_byte_counts([encoded])
        return
    assert caseops.encode(decoded) == encoded


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("The NASA Launch", f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"),
        ("iPhone", f"i{CAPNEXT}phone"),
        ("ABc", f"{TITLE}a{CAPNEXT}bc"),
        ("AbC", f"{TITLE}ab{CAPNEXT}c"),
        ("McDonald", f"{TITLE}mc{CAPNEXT}donald"),
        ("A I a", f"{TITLE}a {TITLE}i a"),
        ("OK2GO", f"{ALLCAPS}ok2{ALLCAPS}go"),
        ("café Été", "café Été"),  # non-ASCII letters are not part of words: "t" is a word
        ("naïVE", f"naï{ALLCAPS}ve"),
        (f"x{TITLE}Abc", f"x{ESC}{TITLE}{TITLE}abc"),
        (f"{ESC}{ESC}", f"{ESC}{ESC}{ESC}{ESC}"),
        ("a\u2581b \u2581Cd", f"a{ESC} b {ESC} {TITLE}cd"),  # SentencePiece's space marker, literal
        ("", ""),
    ],
)
def test_examples(text, encoded):
    assert caseops.encode(text) == encoded
    assert caseops.decode(encoded) == text


@pytest.mark.parametrize(
    ("encoded", "problem"),
    [
        (ESC, "position 0: ESC at the end"),
        (f"ab{ESC}c", "position 2: ESC followed by 'c'"),
        (TITLE, "TITLE at the end"),
        (f"{TITLE} a", "TITLE followed by ' '"),
        (f"{TITLE}{CAPNEXT}a", "TITLE followed by '\\ue003'"),
        (f"{ALLCAPS}{ALLCAPS}ab", "ALLCAPS followed by"),
        (f"ab{CAPNEXT}", "position 2: CAPNEXT at the end"),
        (f"ab{CAPNEXT}1", "CAPNEXT followed by '1'"),
        (f"ab{CAPNEXT}{CAPNEXT}c", "CAPNEXT followed by"),
        (f"{CAPNEXT}abc", "position 0: CAPNEXT at a word start"),
        (f"xy {CAPNEXT}a", "position 3: CAPNEXT at a word start"),
        (f"{ESC}{TITLE}{CAPNEXT}a", "CAPNEXT at a word start"),
        (f"{ALLCAPS}ab{CAPNEXT}c", "CAPNEXT inside an ALLCAPS word"),
        (f"ab{TITLE}cd", "position 2: TITLE inside a word"),
        (f"{ALLCAPS}ab{ALLCAPS}cd", "ALLCAPS inside a word"),
        (f"{ALLCAPS}a b", "position 0: ALLCAPS on a one-letter word"),
        (f"x {ALLCAPS}a", "position 2: ALLCAPS on a one-letter word"),
        (f"{TITLE}a{CAPNEXT}b", "TITLE with CAPNEXT on every letter"),
        (f"{TITLE}a{CAPNEXT}b{CAPNEXT}c!", "TITLE with CAPNEXT on every letter"),
        ("the Cat", "position 4: uppercase ASCII letter 'C'"),
        ("a\u2581b", "position 1: a U+2581 (encode writes ESC + space"),
        (f"{ESC}\u2581", "position 0: ESC followed by '\u2581', not an operator character or a space"),
    ],
)
def test_decode_rejects_malformed_text(encoded, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        caseops.decode(encoded)
    with pytest.raises(ValueError, match=re.escape(problem)):
        caseops.original_byte_counts(list(encoded))


@st.composite
def split_encodings(draw):
    """(original, surfaces): encode(original) cut at random points, empty surfaces allowed."""
    text = draw(originals)
    encoded = caseops.encode(text)
    cuts = sorted(draw(st.lists(st.integers(0, len(encoded)), max_size=12)))
    bounds = [0, *cuts, len(encoded)]
    return text, [encoded[a:b] for a, b in zip(bounds, bounds[1:])]


def _content_bytes(encoded: str) -> list[int]:
    """Independent oracle: original bytes charged to each encoded character.

    Case never changes a byte length, so a character costs its own UTF-8 length unless
    it is an operator acting on the text (0); an escaped operator is charged to itself,
    and an escaped space stands for a literal U+2581 (3 bytes), charged to the space.
    """
    costs = [0] * len(encoded)
    for match in re.finditer(f"{ESC}[{''.join(OPERATORS)} ]|[{''.join(OPERATORS)}]|.", encoded, re.DOTALL):
        if match.group() == ESC + " ":
            costs[match.start() + 1] = 3  # U+2581 in UTF-8: E2 96 81
        elif len(match.group()) == 2:
            costs[match.start() + 1] = len(match.group()[1].encode("utf-8"))
        elif match.group() not in OPERATORS:
            costs[match.start()] = len(match.group().encode("utf-8"))
    return costs


@PROPERTY
@given(split_encodings())
def test_original_byte_counts_per_token(case):
    text, surfaces = case
    counts = caseops.original_byte_counts(surfaces)
    assert len(counts) == len(surfaces)
    assert sum(counts) == len(text.encode("utf-8"))
    costs, start = _content_bytes("".join(surfaces)), 0
    for surface, count in zip(surfaces, counts):
        assert count == sum(costs[start : start + len(surface)])
        start += len(surface)


@PROPERTY
@given(split_encodings())
def test_original_byte_counts_match_decoded_prefixes(case):
    """At every cut where the encoded prefix is itself decodable, the counts so far equal
    the bytes of the decoded prefix, and that prefix begins the original text."""
    text, surfaces = case
    counts = caseops.original_byte_counts(surfaces)
    prefix, total = "", 0
    for surface, count in zip(surfaces, counts):
        prefix, total = prefix + surface, total + count
        try:
            decoded = caseops.decode(prefix)
        except ValueError:
            continue  # cut inside an operator pair or an unfinished ALLCAPS / all-caps TITLE word
        assert text.startswith(decoded)
        assert total == len(decoded.encode("utf-8"))


def test_original_byte_counts_examples():
    surfaces = [TITLE, "the ", ALLCAPS + "na", "sa", " ", TITLE, "launch"]
    assert caseops.original_byte_counts(surfaces) == [0, 4, 2, 2, 1, 0, 6]
    assert caseops.original_byte_counts(["x", ESC, TITLE + "é", "😀"]) == [1, 0, 5, 4]
    assert caseops.original_byte_counts(["a", ESC, " b"]) == [1, 0, 4]  # a literal U+2581: 3 bytes
    assert caseops.original_byte_counts([]) == []
