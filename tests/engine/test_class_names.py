"""tl/engine/class_names.py: class folder names that differ between splits only in their Unicode
form are shown how they differ."""

from __future__ import annotations

import unicodedata

import pytest

from tests.conftest import write_image_folder
from tests.helpers import cli
from tl.engine import class_names


def test_a_class_named_in_two_unicode_forms_is_shown_how_it_differs(tmp_path, tiny_backbone, capsys):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    root = write_image_folder(tmp_path / "d")
    (root / "train" / "class_1").rename(root / "train" / nfc)
    (root / "val" / "class_1").rename(root / "val" / nfd)  # as a folder copied from a Mac may be
    if {p.name for p in (root / "val").iterdir()} != {"class_0", nfd}:
        pytest.skip("this file system normalises names")
    code, _, err = cli(capsys, "-e", "resnet_scratch", "-b", "tiny", "--data", root, "--out", tmp_path / "runs",
                       "--no-progress")
    assert code == 2 and "class folders differ between phases" in err
    assert "'café' differs only in its Unicode form: train spells it NFC (U+0063 U+0061 U+0066 U+00E9), " \
           "val NFD (U+0063 U+0061 U+0066 U+0065 U+0301)" in err
    assert "class_0" not in err.split("\n", 1)[1]  # only the names that differ are explained
    assert class_names.how_names_differ(["a", "b"], ["a", "c"], "x", "y") == ""  # names that differ visibly: no note
