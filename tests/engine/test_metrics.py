"""tl/engine/metrics.py: the classification report's figures against a confusion matrix worked
by hand, and the files it writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tl.engine import metrics


def test_report_figures_match_a_confusion_matrix_worked_by_hand(tmp_path):
    # true a: 3 called a, 1 called b;  true b: 2 called a, 2 called b;  true c: 1 called b, 1 called c
    pairs = [("a", "a")] * 3 + [("a", "b")] + [("b", "a")] * 2 + [("b", "b")] * 2 + [("c", "b"), ("c", "c")]
    labels, predicted = zip(*pairs)
    paths = [f"val/{t}/{i}.jpg" for i, (t, _) in enumerate(pairs)]
    report = metrics.classification_report(labels, predicted, paths, ["a", "b", "c", "d"])  # d: never seen
    assert report["support"].tolist() == [4, 4, 2, 0]
    assert report["precision"][:3] == pytest.approx([3 / 5, 2 / 4, 1 / 1])  # column sums 5, 4, 1
    assert report["recall"][:3] == pytest.approx([3 / 4, 2 / 4, 1 / 2])  # row sums 4, 4, 2
    assert report["f1"][:3] == pytest.approx([2 / 3, 1 / 2, 2 / 3])  # 2PR / (P + R)
    assert report["accuracy"] == pytest.approx(6 / 10)
    assert report["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)  # d has no support
    assert report["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)  # d neither true nor predicted
    assert [(p["true"], p["predicted"], p["count"]) for p in report["pairs"]] == \
        [("b", "a", 2), ("a", "b", 1), ("c", "b", 1)]
    assert report["pairs"][0]["files"] == ["val/b/4.jpg", "val/b/5.jpg"]
    # a class that is predicted but never true counts in macro-F1 (F1 0), not in balanced accuracy
    lopsided = metrics.scores(np.array([[2, 2], [0, 0]]))
    assert lopsided["macro_f1"] == pytest.approx((2 * 1 * 0.5 / 1.5 + 0) / 2)
    assert lopsided["balanced_accuracy"] == pytest.approx(0.5)

    page = metrics.write_report(tmp_path, report, "by hand")
    table = pd.read_csv(tmp_path / "classification_report.csv").set_index("class")
    assert table.loc["a", "precision"] == pytest.approx(0.6) and table.loc["c", "support"] == 2
    assert table.loc["macro average", "f1"] == pytest.approx(report["macro_f1"])
    assert table.loc["balanced accuracy", "recall"] == pytest.approx(report["balanced_accuracy"])
    assert table.loc["accuracy", "f1"] == pytest.approx(0.6)
    text = page.read_text()
    assert "| a | 0.6000 | 0.7500 | 0.6667 | 4 |" in text
    assert "- b -> a: 2 image(s): `val/b/4.jpg`, `val/b/5.jpg`" in text
    confused = pd.read_csv(tmp_path / "confused_pairs.csv")
    assert confused.iloc[0].tolist() == ["b", "a", 2, '["val/b/4.jpg", "val/b/5.jpg"]']


def test_classes_named_like_the_summary_rows_are_told_apart_by_kind(tmp_path):
    """classification_report.csv: a class may be named "accuracy" or "macro average"; `kind` says
    which rows are classes and which the summary."""
    from tl.engine.tables import read_table

    report = metrics.classification_report(["accuracy", "accuracy", "macro average"],
                                           ["accuracy", "macro average", "macro average"],
                                           ["1.jpg", "2.jpg", "3.jpg"], ["accuracy", "macro average"])
    metrics.write_report(tmp_path, report, "names like the summary's")
    table = read_table(tmp_path / "classification_report.csv")
    classes = table[table.kind == "class"].set_index("class")
    summary = table[table.kind == "summary"].set_index("class")
    assert list(classes.index) == ["accuracy", "macro average"] and classes.loc["accuracy", "support"] == 2
    assert summary.loc["accuracy", "f1"] == pytest.approx(2 / 3) and len(summary) == 3


def test_confused_files_with_separators_in_their_names_read_back_as_themselves(tmp_path):
    """confused_pairs.csv lists the files as JSON: a name holding "; ", a comma or a quote is one file."""
    import json

    from tl.engine.tables import read_table

    files = ["val/a/p; q0.png", 'val/a/x, "y".png', "val/a/plain.png"]
    report = metrics.classification_report(["a"] * 3, ["b"] * 3, files, ["a", "b"])
    metrics.write_report(tmp_path, report, "separators")
    pairs = read_table(tmp_path / "confused_pairs.csv")
    assert sorted(json.loads(pairs.files.iloc[0])) == sorted(files) and pairs["count"].iloc[0] == 3
