"""Names that print alike but differ: one name in two Unicode forms.

A folder called "café" can be spelt with the one character é (U+00E9, the NFC form most
systems write) or with e followed by a combining accent (U+0065 U+0301, the NFD form macOS
file systems have long used). Both print as café, so a message that shows two lists of
class names, one from a folder copied from a Mac, shows two identical lists. `how_names_differ`
says which names differ and how: the normalisation form and the code points of each.

A name can also hold what no one sees: a line feed, a carriage return, a terminal's colour
escape, a bidi override. `one_line` shows each as its escape (\\n, \\x1b, \\u202e), so a name
stays on its line: every terminal line and page that shows a user's name goes through it
(tl/engine/tables.py for pages, tl/engine/command.py for error: lines).
"""

from __future__ import annotations

import re
import unicodedata


def _form(name: str) -> str:
    for form in ("NFC", "NFD"):
        if unicodedata.normalize(form, name) == name:
            return form
    return "neither NFC nor NFD"


def _points(name: str) -> str:
    return " ".join(f"U+{ord(c):04X}" for c in name)


def how_names_differ(a: list[str], b: list[str], a_is: str, b_is: str) -> str:
    """For each name of `a` missing from `b` that is a name of `b` in another Unicode form:
    an indented line saying so (forms and code points); "" where no such pair exists.
    `a_is`, `b_is` say whose names they are ("train", "the checkpoint")."""
    lines = []
    for x in (n for n in a if n not in b):
        for y in (n for n in b if n not in a and unicodedata.normalize("NFC", n) == unicodedata.normalize("NFC", x)):
            lines.append(f"\n  {x!r} differs only in its Unicode form: {a_is} spells it {_form(x)} ({_points(x)}), "
                         f"{b_is} {_form(y)} ({_points(y)}); rename one so both use the same form (NFC is usual)")
    return "".join(lines)


# ----------------------------------------------------------------------------- a name on one line
# control characters (C0, DEL, C1) and the marks that move or reorder text (line and paragraph
# separators, bidi embeddings, overrides and isolates): a name holding one would split a line,
# drive a terminal (\x1b[31m) or show its text reversed (U+202E)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def shown_char(match: re.Match) -> str:
    """A control character as its escape: \\r, \\n, \\t, \\x07, \\u202e."""
    return repr(match.group())[1:-1]


def one_line(value) -> str:
    """`value` as text with each control character shown as its escape (\\r, \\n): for a line
    where nothing is markup (a terminal line, a code block, a code span)."""
    return CONTROL.sub(shown_char, str(value))
