"""`python main.py --prepare dogs-vs-cats --src FLAT --dest DIR`: the source folder is never
touched, and a prepared subset trains and reports its test accuracy."""

from __future__ import annotations

import main
from tests.conftest import DOGS_VS_CATS, require_real_data
from tests.helpers import cli_exit, kaggle_folder


def test_prepare_never_touches_the_source(tmp_path, capsys):
    d = tmp_path / "D"
    src = kaggle_folder(d / "train")
    before = sorted(p.name for p in src.iterdir())
    for dest, extra in ((d, ["--force"]), (d, []), (src / "out", ["--force"]), (src, [])):
        code, _, err = cli_exit(capsys, "--prepare", "dogs-vs-cats", "--src", src, "--dest", dest, *extra)
        assert code == 2 and "overlap" in err
    assert sorted(p.name for p in src.iterdir()) == before  # nothing deleted, nothing added
    assert all(p.is_file() and not p.is_symlink() for p in src.iterdir())


def test_real_subset_prepares_trains_and_reports_test_accuracy(tmp_path, capsys):
    src = require_real_data(DOGS_VS_CATS) / "train"
    assert main.main(["--prepare", "dogs-vs-cats", "--src", str(src), "--dest", str(tmp_path / "dvc")]) == 0
    counts = {p: len(list((tmp_path / "dvc" / p / "cat").iterdir())) for p in ("train", "val", "test")}
    assert counts == {"train": 641, "val": 180, "test": 180}
    assert main.main(["-e", "resnet_frozen", "-b", "efficientnet_lite0", "--data", str(tmp_path / "dvc"), "--quick",
                      "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    capsys.readouterr()
    assert main.main(["--evaluate", str(run_dir / "best.pth"), "--data", str(tmp_path / "dvc"),
                      "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "(360 images)" in out and "cat" in out and "dog" in out


def test_prepare_on_a_full_disk_leaves_no_dest_and_names_dest(tmp_path, monkeypatch, capfd):
    """A --dest made by --prepare goes again when the split fails (an empty one given stays), and
    the message says to choose another --dest, not --out."""
    from tests.test_full_disk import FillingDisk, one_error_line

    src = kaggle_folder(tmp_path / "kaggle")
    (tmp_path / "given").mkdir()
    for dest, left in ((tmp_path / "new", tmp_path / "new"), (tmp_path / "a" / "b" / "new", tmp_path / "a"),
                       (tmp_path / "given", None)):
        with monkeypatch.context() as m:
            FillingDisk(m, room=0)
            code = main.main(["--prepare", "dogs-vs-cats", "--src", str(src), "--dest", str(dest)])
        err = capfd.readouterr().err
        one_error_line(code, err)
        assert err.rstrip().endswith("(--dest)"), err
        assert not left.exists() if left else list(dest.iterdir()) == [], dest
