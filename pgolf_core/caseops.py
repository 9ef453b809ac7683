"""CaseOps: a lossless, bijective case transform applied to text before tokenization.

Why: "The", "the" and "THE" are three pieces to a plain tokenizer, so the model spends
capacity learning the same word three times. Factoring case out into operator
characters lets the vocabulary and the model share one spelling; the records measured
about 0.002-0.004 val_bpb from it (-0.0041 in the 04-18 record; TECHNIQUES.md §1.5). val_bpb stays honest because
bytes are always counted on the ORIGINAL text (`original_byte_counts`), never on the
encoded text: operators cost 0 bytes.

Format. A "word" is a maximal run of ASCII letters [A-Za-z]; every other character
passes through unchanged, except that a literal operator character becomes ESC + it and
a literal U+2581 becomes ESC + space. Why the second: SentencePiece reads U+2581 as its
own space marker, so a literal one would come back from the tokenizer as a space and be
counted as 1 byte of original text where it was 3 (the tokenize stage's sidecar check
refuses that); the records' transform leaves it, so their tokenizer loses it.
Operators (private use): TITLE U+E001, ALLCAPS U+E002, CAPNEXT U+E003, ESC U+E004.
- all lowercase                         "the"    -> the
- all uppercase, length >= 2            "NASA"   -> ALLCAPS nasa
- upper first letter, rest lowercase    "The"    -> TITLE the    (also "A" -> TITLE a)
- mixed otherwise: TITLE if the first letter is upper, then CAPNEXT before every later
  uppercase letter, all letters lowercased:
                                        "iPhone" -> i CAPNEXT phone
                                        "ABc"    -> TITLE a CAPNEXT b c
                                        "McDonald" -> TITLE mc CAPNEXT donald
- literal operator                      "\\ue001" -> ESC \\ue001
- literal SentencePiece space marker    "\\u2581" -> ESC " "
An escaped operator is a non-letter, so a word after it starts afresh:
"\\ue001Abc" -> ESC \\ue001 TITLE abc. Non-ASCII letters are not word characters and
keep their case: "naïVE" -> na ï ALLCAPS ve, "Été" -> Été. Encoded text never contains
an ASCII uppercase letter or a U+2581.

Guarantees. `decode(encode(x)) == x` for every str x. `decode` accepts exactly the
strings `encode` can produce and raises ValueError (naming the position and the
problem) on any other, so `encode(decode(s)) == s` for every s it accepts. In
particular it rejects: ESC not followed by an operator or a space; a U+2581;
TITLE/ALLCAPS/CAPNEXT not followed by a lowercase ASCII letter (or at the end);
CAPNEXT at a word start;
TITLE/ALLCAPS inside a word; CAPNEXT inside an ALLCAPS word; ALLCAPS on a one-letter
word; TITLE + CAPNEXT on every letter (an all-uppercase word is written with ALLCAPS);
any ASCII uppercase letter.
"""

from __future__ import annotations

import re

TITLE = "\ue001"
ALLCAPS = "\ue002"
CAPNEXT = "\ue003"
ESC = "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)

_NAMES = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
SPACE_MARK = "\u2581"  # SentencePiece's space marker: a literal one is written ESC + " "
_WORD_OR_OPERATOR = re.compile("[A-Za-z]+|[\ue001-\ue004\u2581]")


def encode(text: str) -> str:
    """Factor the case of every ASCII word into operators; escape literal operators and
    U+2581."""
    return _WORD_OR_OPERATOR.sub(_encode_match, text)


def _encode_match(match: re.Match) -> str:
    word = match.group()
    if word in OPERATORS:
        return ESC + word
    if word == SPACE_MARK:
        return ESC + " "
    lower = word.lower()
    if word == lower:
        return word
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    head = TITLE + lower[0] if word[0].isupper() else lower[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def decode(text: str) -> str:
    """Inverse of `encode`; raises ValueError on any string `encode` cannot produce."""
    decoder = _Decoder()
    out = decoder.feed(text)
    decoder.finish()
    return out


def original_byte_counts(surfaces: list[str]) -> list[int]:
    """UTF-8 bytes of the original text that each token of one encoded document stands for.

    `surfaces` are consecutive token surfaces whose concatenation is encode(doc); the
    decoder state carries across token boundaries, so the result sums to
    len(doc.encode("utf-8")) and count i is exactly what token i's characters decode to:
    operators and ESC cost 0, an escaped operator 3, an escaped space (a literal U+2581)
    3, a letter 1, any other character its UTF-8 length. Characters are counted as given:
    the caller substitutes a real space for SentencePiece's U+2581 marker first. Raises
    ValueError like `decode`.
    """
    decoder = _Decoder()
    counts = [len(decoder.feed(surface).encode("utf-8")) for surface in surfaces]
    decoder.finish()
    return counts


# A run of lowercase letters, a run of characters that are neither letters nor
# operators, or one uppercase letter / operator character.
_RUNS = re.compile("[a-z]+|[^A-Za-z\ue001-\ue004\u2581]+|.", re.DOTALL)


class _Decoder:
    """Streaming inverse transform: `feed` returns what the next characters decode to.

    No lookahead is needed (an operator always precedes the letters it acts on), so the
    output of each character is final when it is fed, wherever the text is cut; the
    checks that need the whole word (ALLCAPS length, TITLE + all CAPNEXT) run when the
    word closes. Runs of plain characters are handled at once for speed.
    """

    def __init__(self) -> None:
        self.pos = 0  # index in the encoded text of the character being decoded
        self.pending: str | None = None  # operator waiting for its operand
        self.pending_pos = 0
        self.word: str | None = None  # None outside a word, else "lower", TITLE or ALLCAPS
        self.word_pos = 0
        self.num_letters = 0
        self.all_upper = True  # every letter of the current word so far is uppercase

    def feed(self, text: str) -> str:
        start, out = self.pos, []
        for match in _RUNS.finditer(text):
            run, self.pos = match.group(), start + match.start()
            if self.pending is not None or len(run) == 1:
                out.append(self._step(run[0]))
                self.pos, run = self.pos + 1, run[1:]
            if run:
                out.append(self._run(run))
        self.pos = start + len(text)
        return "".join(out)

    def finish(self) -> None:
        """Check that the text ended cleanly (no operator waiting, last word well formed)."""
        if self.pending is not None:
            self._fail(self.pending_pos, f"{_NAMES[self.pending]} at the end of the text")
        self._close_word()

    def _run(self, run: str) -> str:
        """Lowercase letters or plain characters, with no operator pending."""
        if run[0] not in _LOWER:
            self._close_word()
            return run
        if self.word is None:
            self._open_word("lower")
        self.num_letters += len(run)
        if self.word == ALLCAPS:
            return run.upper()
        self.all_upper = False
        return run

    def _step(self, ch: str) -> str:
        if self.pending == ESC:
            if ch not in OPERATORS and ch != " ":
                self._fail(self.pending_pos, f"ESC followed by {ch!r}, not an operator character or a space")
            self.pending = None
            return SPACE_MARK if ch == " " else ch
        if self.pending is not None:
            if ch not in _LOWER:
                self._fail(self.pending_pos, f"{_NAMES[self.pending]} followed by {ch!r}, not a lowercase ASCII letter")
            self.pending = None
            self.num_letters += 1
            return ch.upper()
        if ch in _UPPER:
            self._fail(self.pos, f"uppercase ASCII letter {ch!r} (encode never emits one)")
        if ch == SPACE_MARK:
            self._fail(self.pos, "a U+2581 (encode writes ESC + space for a literal one)")
        if ch == TITLE or ch == ALLCAPS:
            if self.word is not None:
                self._fail(self.pos, f"{_NAMES[ch]} inside a word (words are separated by a non-letter)")
            self._open_word(ch)
        elif ch == CAPNEXT:
            if self.word is None:
                self._fail(self.pos, "CAPNEXT at a word start (an uppercase first letter takes TITLE or ALLCAPS)")
            if self.word == ALLCAPS:
                self._fail(self.pos, "CAPNEXT inside an ALLCAPS word")
        elif ch == ESC:
            self._close_word()
        else:
            return self._run(ch)
        self.pending, self.pending_pos = ch, self.pos
        return ""

    def _open_word(self, kind: str) -> None:
        self.word, self.word_pos, self.num_letters, self.all_upper = kind, self.pos, 0, True

    def _close_word(self) -> None:
        if self.word == ALLCAPS and self.num_letters < 2:
            self._fail(self.word_pos, "ALLCAPS on a one-letter word (encode writes TITLE)")
        if self.word == TITLE and self.num_letters >= 2 and self.all_upper:
            self._fail(self.word_pos, "TITLE with CAPNEXT on every letter (an all-uppercase word takes ALLCAPS)")
        self.word = None

    @staticmethod
    def _fail(pos: int, problem: str) -> None:
        raise ValueError(f"malformed CaseOps text at position {pos}: {problem}")
