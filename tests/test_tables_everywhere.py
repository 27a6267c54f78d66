"""Every CSV table of the project goes through tl/engine/tables.py: no other module of tl/,
experiments/, benchmarks/, main.py or commands.py writes or reads CSV on its own (pandas'
to_csv/read_csv, the csv module, numpy's text files, or text written to a .csv path by hand),
so one writer neutralises every cell and one reader restores every name. Read with `ast`:
docstrings and comments may name these freely."""

from __future__ import annotations

import ast
import csv
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THE_MODULE = ROOT / "tl" / "engine" / "tables.py"
CSV_CALLS = {"to_csv", "read_csv", "savetxt", "loadtxt", "genfromtxt"}
TEXT_WRITES = {"write_text", "atomic_write_text", "write_bytes", "atomic_write_bytes", "atomic_write"}


def _files() -> list[Path]:
    files = [ROOT / "main.py", ROOT / "commands.py"]
    for folder in ("tl", "experiments", "benchmarks"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if f.is_file() and f != THE_MODULE]


def _names_csv(node: ast.AST) -> bool:
    """Whether an expression holds a string that names a .csv file."""
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and ".csv" in n.value for n in ast.walk(node))


def _is_table_text(node: ast.AST) -> bool:
    func = getattr(node, "func", None)
    return getattr(func, "id", getattr(func, "attr", None)) in ("table_text", "csv_text")


def offences(source: str) -> list[str]:
    """Each place in `source` that writes or reads CSV without tl/engine/tables.py."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.Import) and any(a.name == "csv" for a in node.names):
            found.append(f"line {line}: import csv")
        elif isinstance(node, ast.ImportFrom) and node.module == "csv":
            found.append(f"line {line}: from csv import ...")
        elif isinstance(node, ast.Attribute) and node.attr in CSV_CALLS:
            found.append(f"line {line}: .{node.attr}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = getattr(func, "attr", getattr(func, "id", None))
            if name in TEXT_WRITES:
                target = func.value if name == "write_text" and isinstance(func, ast.Attribute) else (
                    node.args[0] if node.args else None)
                text = node.args[0] if name == "write_text" and node.args else (
                    node.args[1] if len(node.args) > 1 else None)
                if target is not None and _names_csv(target) and not (text is not None and _is_table_text(text)):
                    found.append(f"line {line}: {name} of a .csv path")
        elif isinstance(node, ast.Dict):  # benchmarks.write_files({path: text, ...})
            found += [f"line {line}: a .csv path's text made by hand" for k, v in zip(node.keys, node.values)
                      if k is not None and _names_csv(k) and not _is_table_text(v)]
    return found


def test_no_module_writes_or_reads_csv_beside_the_one_module():
    found = {str(f.relative_to(ROOT)): o for f in _files() if (o := offences(f.read_text()))}
    assert not found, f"CSV written or read outside tl/engine/tables.py: {found}"


def test_the_scan_sees_each_way_round_it():
    """The scan is not vacuous: each way of writing or reading CSV alone is found."""
    cases = {
        "import csv": 1, "from csv import writer": 1, "df.to_csv(p, index=False)": 1,
        "pd.read_csv(p)": 1, "np.savetxt('x.csv', a)": 1, "(out / 'a.csv').write_text(text)": 1,
        "atomic_write_text(out / 'a.csv', 'a,b\\n')": 1, "write_files({out / 'a.csv': df.to_string()})": 1,
        "atomic_write_text(out / f'{name}.csv', text)": 1,
        "write_files({out / 'a.csv': table_text(rows), out / 'a.md': page})": 0,
        "atomic_write_text(out / 'a.md', page)": 0, "write_table(out / 'a.csv', rows)": 0,
        "read_table(out / 'a.csv')": 0,
    }
    for source, count in cases.items():
        assert len(offences(source)) == count, source


def test_a_run_with_hostile_names_finishes_and_its_tables_read_back(tmp_path, tiny_backbone, capsys):
    """A training run, through main.py, on classes named "=NA" and "NA" with photos named with a
    carriage return, a line feed, a formula and a number: it ends with exit 0, and its tables
    (per-image predictions, history, classification report, confused pairs, class names) hold
    one row per record and read back with every name as it is on disk."""
    import main
    from tests.conftest import write_image_folder
    from tl.engine.tables import read_table

    data = write_image_folder(tmp_path / "data", train=6, val=4)
    for phase in ("train", "val"):
        for k, name in enumerate(["=NA", "NA"]):
            (data / phase / f"class_{k}").rename(data / phase / name)
    hostile = ["a\rb.png", "c\nd.png", "=1+1.png", "-1.png"]
    for old, new in zip(sorted((data / "val" / "NA").iterdir()), hostile):
        old.rename(old.parent / new)
    code = main.main(["-e", "resnet_scratch", "-b", tiny_backbone, "--data", str(data), "--epochs", "2",
                      "--image-size", "32", "--workers", "0", "--out", str(tmp_path / "runs"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    (run,) = (tmp_path / "runs").iterdir()

    predictions = read_table(run / "headline_predictions.csv")
    on_disk = sorted(f"val/{p.parent.name}/{p.name}" for p in (data / "val").glob("*/*"))
    assert sorted(predictions.path) == on_disk and len(predictions) == 8
    assert sorted(set(predictions.label)) == ["=NA", "NA"]
    assert set(predictions.prediction) <= {"=NA", "NA"}
    with open(run / "headline_predictions.csv", newline="") as f:
        raw = list(csv.reader(f))
    assert len(raw) == 9 and all(not cell.startswith(("=", "-", "\r", "\n")) for row in raw for cell in row)

    report = read_table(run / "classification_report.csv").set_index("class")
    right = (predictions.label == predictions.prediction).mean()
    assert report.loc["accuracy", "f1"] == pytest.approx(right)  # NA counted as the class, not as missing
    assert report.loc[["=NA", "NA"], "support"].tolist() == [4, 4]
    assert list(read_table(run / "classes.csv")["class"]) == ["=NA", "NA"]
    pairs = read_table(run / "confused_pairs.csv")
    assert set(pairs.true) | set(pairs.predicted) <= {"=NA", "NA"}
    history = read_table(run / "history.csv")
    assert history.epoch.tolist() == [0, 1, 1, 2, 2] and history.loss.dtype == float


HOSTILE_CLASSES = ["a|b\rc", "x\ny`z<b>*k*"]  # a pipe, a carriage return, a line feed, a backtick, markup


def _table_rows_hold(page: Path) -> None:
    """Every line of `page` is whole: no raw control character, and each table row has as many
    cells (unescaped |) as its table's header."""
    import re

    text = page.read_text()
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", text), f"{page}: a raw control character"
    cells = None
    for line in text.split("\n"):
        if not line.startswith("|"):
            cells = None
            continue
        n = len(re.findall(r"(?<!\\)\|", line))
        cells = n if cells is None else cells
        assert n == cells, f"{page}: {line!r} has {n - 1} cells, its header {cells - 1}"


def test_every_page_shows_hostile_names_on_their_own_line_and_cell(tmp_path, tiny_backbone, capsys):
    """A comparison (compare_all, its pages and its runs' reports) on a data folder and classes
    whose names hold |, a carriage return, a line feed and a backtick, and photos named so too:
    every Markdown page written keeps each name on its line and in its table cell."""
    from experiments import compare_all
    from tests.conftest import write_image_folder
    from tl.engine.command import command

    data = write_image_folder(tmp_path / "da\nta|set", train=6, val=4)
    for phase in ("train", "val"):
        for k, name in enumerate(HOSTILE_CLASSES):
            (data / phase / f"class_{k}").rename(data / phase / name)
    for old, new in zip(sorted((data / "val" / HOSTILE_CLASSES[0]).iterdir()), ["p|q\r.png", "`x`\n.png"]):
        old.rename(old.parent / new)
    out = tmp_path / "results"
    code = command(lambda: compare_all.main(["--quick", "--data", str(data), "--experiments", "resnet_scratch",
                                             "--backbone", "tiny", "--out", str(out), "--workers", "0", "--seeds", "0",
                                             "--runs-dir", str(tmp_path / "runs")]))
    assert code == 0, capsys.readouterr().err
    pages = [*out.rglob("*.md"), *(tmp_path / "runs").rglob("*.md")]
    assert {p.name for p in pages} == {"README.md", "classification_report.md"}, pages
    for page in pages:
        _table_rows_hold(page)
        assert not re.search(r"(?<!\\)<b>|(?<!\\)\*k", page.read_text()), page  # markup shown, not obeyed
        lines = page.read_text().split("\n")  # no line starts with what follows a line feed in a name
        assert not [line for line in lines if line.startswith(("ta|set", "ta\\|set", "y`z", "y\\`z", ".png"))], page
