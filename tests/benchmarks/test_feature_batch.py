"""benchmarks/feature_batch.py: it times the run's own feature pass at each batch size, and
checks its --out folder before measuring."""

from __future__ import annotations

import pytest


def test_feature_batch_times_the_runs_feature_pass_at_each_batch_size(tiny_backbone, tiny_data, tmp_path,
                                                                        monkeypatch):
    """benchmarks/feature_batch.py times tl's own feature pass, once per batch size asked for
    (after one warm-up), and writes a table that names its command."""
    import pandas as pd

    import tl.engine.feature_store as feature_store
    from benchmarks import feature_batch

    asked = []
    real = feature_store.compute_features
    monkeypatch.setattr(feature_store, "compute_features",
                        lambda *a, **kw: asked.append(a[3].batch_size) or real(*a, **kw))
    feature_batch.main(["--data", str(tiny_data), "--backbone", tiny_backbone, "--weights", "none",
                        "--batch-sizes", "2", "5", "--repeats", "2", "--out", str(tmp_path)])
    assert asked == [8, 2, 2, 5, 5]
    table = pd.read_csv(tmp_path / "benchmark_feature_batch.csv")
    assert list(table.batch_size) == [2, 5] and (table.img_s_median > 0).all()
    assert "--batch-sizes 2 5" in (tmp_path / "benchmark_feature_batch.md").read_text()


def test_a_benchmark_checks_its_out_folder_before_measuring(tiny_data, tmp_path, capsys, monkeypatch):
    import tl.engine.feature_store as feature_store
    from benchmarks import command, feature_batch

    monkeypatch.setattr(feature_store, "compute_features", lambda *a, **kw: pytest.fail("measured first"))
    (tmp_path / "a-file").write_text("")
    assert command(lambda: feature_batch.main(["--data", str(tiny_data), "--out", str(tmp_path / "a-file")])) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_the_command_on_a_benchmark_page_is_the_one_that_ran():
    """benchmarks.invocation_of, the command every benchmark page records: split as a shell would,
    it gives back the arguments, whatever they hold."""
    import shlex

    from benchmarks import invocation_of

    argv = ["--data", "my data;x", "--out", "r$(rm)", "--sizes", "8", "16", "--title", "it's"]
    shown = invocation_of("benchmarks.feature_batch", argv)
    assert shlex.split(shown) == ["python", "-m", "benchmarks.feature_batch", *argv]
