"""What every study (python -m experiments.NAME) promises, tried on each: a data folder that is not
there, or holds no classes, or an --out that cannot be written, stops the study before it trains,
with one error: line and exit status 2, and the tables an earlier command wrote into --out are
left as they were."""

from __future__ import annotations

import importlib

import pytest

from tl.engine.command import command

STUDIES = {  # the study, its table in --out, and its arguments besides --data and --out
    "lr_table": ("lr_finder.csv", ["--recipes", "resnet_scratch", "--backbone", "tiny", "--weights", "none"]),
    "imbalance": ("imbalance.csv", ["--backbone", "tiny", "--weights", "none", "--seeds", "0"]),
    "data_efficiency": ("data_efficiency.csv", ["--backbone", "tiny"]),
    "compare_all": ("runs.csv", ["--quick", "--experiments", "resnet_scratch", "--backbone", "tiny"]),
}


@pytest.mark.parametrize("study", STUDIES)
@pytest.mark.parametrize("where", ["missing", "no classes"])
def test_a_data_folder_that_is_not_one_stops_the_study_and_keeps_its_table(study, where, tmp_path, capsys,
                                                                         tiny_backbone):
    table, extra = STUDIES[study]
    out = tmp_path / "results"
    out.mkdir()
    (out / table).write_text("kept,by,an,earlier,command\n")
    data = tmp_path / "photos"
    if where == "no classes":
        (data / "train").mkdir(parents=True)
        (data / "notes.txt").write_text("not a data folder")
    main = importlib.import_module(f"experiments.{study}").main
    code = command(lambda: main(["--data", str(data), "--out", str(out), *extra]))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == [table] and (out / table).read_text().startswith("kept"), study


@pytest.mark.parametrize("study", [*STUDIES, "tune"])
def test_a_data_folder_named_with_a_line_feed_and_an_escape_keeps_the_error_on_its_lines(study, tmp_path, capsys,
                                                                                      tiny_backbone):
    """The study's error about a missing folder named with a line feed and a colour escape: as many
    lines as about a plain name, the name escaped, no escape reaching the terminal."""
    extra = STUDIES[study][1] if study in STUDIES else ["--recipe", "modern_finetune", "--backbone", "tiny",
                                                         "--weights", "none", "--trials", "1"]
    main = importlib.import_module(f"experiments.{study}").main
    said = {}
    for name in ("plain", "no\nsuch\x1b[31m"):
        code = command(lambda name=name: main(["--data", str(tmp_path / name), "--out", str(tmp_path / "out"), *extra]))
        said[name] = capsys.readouterr().err
        assert code == 2, said[name]
    lines = said["no\nsuch\x1b[31m"].splitlines()
    assert len(lines) == len(said["plain"].splitlines()) and "no\\nsuch\\x1b[31m" in lines[0], lines
    assert "\x1b" not in said["no\nsuch\x1b[31m"], lines



WRITERS = {**{study: extra for study, (_, extra) in STUDIES.items()},
           "bn_policy": ["--quick", "--backbone", "tiny", "--seeds", "0", "--policies", "frozen_bn_train"],
           "tune": ["--recipe", "modern_finetune", "--backbone", "tiny", "--weights", "none", "--trials", "1"]}


@pytest.mark.parametrize("study", WRITERS)
def test_an_out_folder_that_cannot_be_written_stops_the_study_before_it_trains(study, unwritable, tiny_data, capsys,
                                                                               monkeypatch, tiny_backbone):
    """Hours of training for a table that cannot be saved: each study tries its --out first
    (tl.engine.files.writable_folder), on a folder under a file and on a read-only disk."""
    import tl.engine.lr_finder
    import tl.engine.run

    for module, name in ((tl.engine.run, "run"), (tl.engine.lr_finder, "find_lr")):  # the loop's two doors
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail(f"{study} trained first"))
    main = importlib.import_module(f"experiments.{study}").main
    code = command(lambda: main(["--data", str(tiny_data), "--out", str(unwritable), *WRITERS[study]]))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and str(unwritable.parent) in err, err
