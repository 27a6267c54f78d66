"""The classification report a practitioner reads: more than one accuracy.

On unbalanced classes accuracy hides the class that matters: 95% of the photos are dogs,
a model that answers "dog" every time is 95% accurate and has never found a cat. So per
class, from the confusion matrix C (rows: true class, columns: predicted class):

    precision_k = C[k, k] / sum_i C[i, k]     of the images called k, the share that are k
    recall_k    = C[k, k] / sum_j C[k, j]     of the images that are k, the share found
    F1_k        = 2 P_k R_k / (P_k + R_k)     their harmonic mean (0 where both are 0)
    support_k   = sum_j C[k, j]               how many images are k

and over the classes:

    accuracy           = trace(C) / sum(C)                 (images weighted equally)
    balanced accuracy  = mean of recall_k over the classes with support (classes weighted equally)
    macro-F1           = mean of F1_k over the classes that occur, as true or predicted class

A share of nothing (no image called k, or none is k) counts as 0, as scikit-learn's
`zero_division=0` does; a class neither present nor predicted is left out of the means.
The most-confused pairs (true class, predicted class) say which mistake is made, how
often, and on which files: the files to look at first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tl.engine.files import atomic_write_text
from tl.engine.tables import page_code, page_text, read_table, write_table

SHOWN_FILES = 10  # file names per confused pair in the Markdown (the CSV has all)


def confusion(labels: Sequence[int], predicted: Sequence[int], n_classes: int) -> np.ndarray:
    """(n, n) counts; row = true class, column = predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=int), np.asarray(predicted, dtype=int)), 1)
    return matrix


def _share(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    return np.divide(part, whole, out=np.zeros(len(part)), where=whole > 0)


def scores(matrix: np.ndarray) -> dict:
    """Per class precision, recall, F1, support; accuracy, balanced accuracy, macro-F1 (module docstring)."""
    matrix = np.asarray(matrix)
    hits, support, called = np.diag(matrix).astype(float), matrix.sum(1), matrix.sum(0)
    precision, recall = _share(hits, called), _share(hits, support)
    f1 = _share(2 * precision * recall, precision + recall)
    occurs = (support > 0) | (called > 0)
    total = int(matrix.sum())
    return {"precision": precision, "recall": recall, "f1": f1, "support": support, "n": total,
            "accuracy": float(hits.sum() / total) if total else float("nan"),
            "balanced_accuracy": float(recall[support > 0].mean()) if total else float("nan"),
            "macro_f1": float(f1[occurs].mean()) if total else float("nan"),
            "macro_precision": float(precision[occurs].mean()) if total else float("nan"),
            "macro_recall": float(recall[occurs].mean()) if total else float("nan")}


def confused_pairs(labels: Sequence[int], predicted: Sequence[int], paths: Sequence[str],
                   classes: Sequence[str]) -> list[dict]:
    """Every (true, predicted) pair of different classes that occurs, most frequent first, with its files."""
    files: dict[tuple[int, int], list[str]] = {}
    for t, p, path in zip(labels, predicted, paths):
        if t != p:
            files.setdefault((int(t), int(p)), []).append(str(path))
    order = sorted(files, key=lambda pair: (-len(files[pair]), pair))
    return [{"true": classes[t], "predicted": classes[p], "count": len(files[(t, p)]), "files": files[(t, p)]}
            for t, p in order]


def classification_report(labels: Sequence[str], predicted: Sequence[str], paths: Sequence[str],
                          classes: Sequence[str]) -> dict:
    """The report of one model on one split, from its per-image class names and files."""
    index = {name: i for i, name in enumerate(classes)}
    t, p = [index[x] for x in labels], [index[x] for x in predicted]
    return scores(confusion(t, p, len(classes))) | {"classes": list(classes),
                                                     "pairs": confused_pairs(t, p, paths, classes)}


def report_of_predictions(path: str | Path, classes: Sequence[str] | None = None) -> dict:
    """The report of a per-image table with the columns path, label, prediction (a run's
    headline_predictions.csv, results/predictions/...). Without `classes`, the class names
    that occur in it, sorted. Its names are read as text, as written (tl/engine/tables.py)."""
    rows = read_table(path, text=("path", "label", "prediction"))
    labels, predicted = list(rows["label"]), list(rows["prediction"])
    classes = list(classes) if classes is not None else sorted(set(labels) | set(predicted))
    return classification_report(labels, predicted, list(rows["path"]), classes)


def report_markdown(report: dict, title: str) -> str:
    """The report as a page: the three figures, the per-class table, the most-confused pairs."""
    lines = [f"# Classification report: {page_text(title)}", "",
             f"{report['n']} images. Accuracy **{report['accuracy']:.4f}**, balanced accuracy (mean recall "
             f"over classes) **{report['balanced_accuracy']:.4f}**, macro-F1 **{report['macro_f1']:.4f}**.", "",
             "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for i, name in enumerate(report["classes"]):
        lines.append(f"| {page_text(name)} | {report['precision'][i]:.4f} | {report['recall'][i]:.4f} "
                     f"| {report['f1'][i]:.4f} | {int(report['support'][i])} |")
    lines += ["", "## Most confused (true class -> predicted class)", ""]
    if not report["pairs"]:
        lines.append("No image was misclassified.")
    for pair in report["pairs"]:
        shown = ", ".join(page_code(f) for f in pair["files"][:SHOWN_FILES])
        more = f" and {pair['count'] - SHOWN_FILES} more (confused_pairs.csv)" if pair["count"] > SHOWN_FILES else ""
        lines.append(f"- {page_text(pair['true'])} -> {page_text(pair['predicted'])}: {pair['count']} image(s): "
                     f"{shown}{more}")
    return "\n".join(lines) + "\n"


def write_report(folder: str | Path, report: dict, title: str) -> Path:
    """classification_report.csv, classification_report.md and confused_pairs.csv in `folder`
    (atomically, like every file of a run folder); returns the Markdown file."""
    folder = Path(folder)
    rows = [[name, report["precision"][i], report["recall"][i], report["f1"][i], int(report["support"][i]), "class"]
            for i, name in enumerate(report["classes"])]
    # the summary rows say so in `kind`: a class may itself be named "accuracy"
    rows += [["macro average", report["macro_precision"], report["macro_recall"], report["macro_f1"], report["n"],
              "summary"],
             ["balanced accuracy", "", report["balanced_accuracy"], "", report["n"], "summary"],
             ["accuracy", report["accuracy"], report["accuracy"], report["accuracy"], report["n"], "summary"]]
    write_table(folder / "classification_report.csv", rows, ["class", "precision", "recall", "f1", "support", "kind"])
    # the files as a JSON list: a file name may itself hold "; " or a comma (json.loads gives the list back)
    write_table(folder / "confused_pairs.csv", [[p["true"], p["predicted"], p["count"],
                                                 json.dumps(p["files"], ensure_ascii=False)] for p in report["pairs"]],
                ["true", "predicted", "count", "files"])
    return atomic_write_text(folder / "classification_report.md", report_markdown(report, title))
