"""tl/engine/command.py, the wrapper every command runs in, through the benchmarks: bad input or a
table that cannot be written is one `error:` line and exit status 2, never a traceback."""

from __future__ import annotations


def test_a_benchmark_given_bad_input_says_one_error_line_and_exits_2(tiny_data, tmp_path, capsys):
    """Every benchmark runs through benchmarks.command: a missing data folder, or a data set
    that is not the one a check needs, is an `error:` line and status 2, not a traceback."""
    from benchmarks import command, feature_batch, imagenet_heads

    assert command(lambda: feature_batch.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])) == 2
    assert capsys.readouterr().err.startswith("error: data folder not found")
    assert command(lambda: imagenet_heads.main(["--data", str(tiny_data), "--backbones", "efficientnet_lite0",
                                                "--out", str(tmp_path)])) == 2
    assert "needs hymenoptera's ants and bees" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.md"))  # nothing written


def test_a_benchmark_that_cannot_write_its_table_says_so_in_one_line(tiny_backbone, tiny_data, tmp_path, capsys):
    from benchmarks import command, feature_batch

    (tmp_path / "a-file").write_text("")
    assert command(lambda: feature_batch.main(["--data", str(tiny_data), "--backbone", tiny_backbone, "--weights",
                                               "none", "--batch-sizes", "2", "--repeats", "1",
                                               "--out", str(tmp_path / "a-file" / "out")])) == 2
    assert capsys.readouterr().err.startswith("error: Not a directory")
