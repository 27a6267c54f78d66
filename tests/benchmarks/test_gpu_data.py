"""benchmarks/gpu_data.py: a wrong data folder leaves the old copy in place."""

from __future__ import annotations


def test_gpu_data_keeps_its_old_copy_when_the_data_folder_is_wrong(tmp_path, capsys):
    from benchmarks import command, gpu_data

    (tmp_path / "old" / "train").mkdir(parents=True)
    assert command(lambda: gpu_data.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "old")])) == 2
    assert capsys.readouterr().err.startswith("error: no train/ folder")
    assert (tmp_path / "old" / "train").is_dir()
