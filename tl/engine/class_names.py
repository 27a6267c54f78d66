"""Names that print alike but differ: one name in two Unicode forms.

A folder called "café" can be spelt with the one character é (U+00E9, the NFC form most
systems write) or with e followed by a combining accent (U+0065 U+0301, the NFD form macOS
file systems have long used). Both print as café, so a message that shows two lists of
class names, one from a folder copied from a Mac, shows two identical lists. `how_names_differ`
says which names differ and how: the normalisation form and the code points of each.
"""

from __future__ import annotations

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
