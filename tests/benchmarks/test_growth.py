"""benchmarks/growth.py's bookkeeping (the measurements themselves are benchmarks, not tests):
its section replaces its previous section of results/benchmark.md and nothing else, and the
straight-line fit recovers a line."""

from __future__ import annotations

import pytest

from benchmarks.growth import MARK_END, MARK_START, fit, make_images, merge_section


def test_growth_section_is_merged_without_touching_the_rest(tmp_path):
    md = tmp_path / "benchmark.md"
    md.write_text("# Benchmark\n\n| a | b |\n")
    merge_section(md, f"{MARK_START}\nfirst\n{MARK_END}\n")
    merge_section(md, f"{MARK_START}\nsecond\n{MARK_END}\n")
    text = md.read_text()
    assert text.startswith("# Benchmark\n\n| a | b |\n")
    assert "second" in text and "first" not in text and text.count(MARK_START) == 1


def test_fit_of_a_line_has_no_deviation():
    f = fit([1000, 5000, 25000], [2 + 0.01 * n for n in (1000, 5000, 25000)])
    assert f["slope"] == pytest.approx(0.01) and f["intercept"] == pytest.approx(2)
    assert f["max_deviation_pct"] == pytest.approx(0, abs=1e-9)


def test_generated_images_are_split_80_20(tmp_path):
    root = make_images(tmp_path / "g", 20, size=16)
    assert len(list((root / "train").rglob("*.jpg"))) == 16 and len(list((root / "val").rglob("*.jpg"))) == 4
    assert {p.name for p in (root / "val").iterdir()} == {"red", "blue"}


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
    assert capsys.readouterr().err.startswith("error: [Errno 20] Not a directory")


def test_growth_measures_the_feature_pass_in_its_child_process(tmp_path, monkeypatch):
    """The feature-pass child of benchmarks/growth.py runs (it names tl's modules as they are)."""
    import json

    from benchmarks.growth import FEATURE_CODE, _child

    data = make_images(tmp_path / "images", 10, size=32)
    result = _child(FEATURE_CODE, str(data), "0", "1.0", env={"TL_CACHE_DIR": str(tmp_path / "cache")})
    assert result["images"] == 10 and result["seconds"] > 0, json.dumps(result)


def test_gpu_data_keeps_its_old_copy_when_the_data_folder_is_wrong(tmp_path, capsys):
    from benchmarks import command, gpu_data

    (tmp_path / "old" / "train").mkdir(parents=True)
    assert command(lambda: gpu_data.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "old")])) == 2
    assert capsys.readouterr().err.startswith("error: no train/ folder")
    assert (tmp_path / "old" / "train").is_dir()


def test_a_benchmark_checks_its_out_folder_before_measuring(tiny_data, tmp_path, capsys, monkeypatch):
    import tl.engine.feature_store as feature_store
    from benchmarks import command, feature_batch

    monkeypatch.setattr(feature_store, "compute_features", lambda *a, **kw: pytest.fail("measured first"))
    (tmp_path / "a-file").write_text("")
    assert command(lambda: feature_batch.main(["--data", str(tiny_data), "--out", str(tmp_path / "a-file")])) == 2
    assert capsys.readouterr().err.startswith("error: ")
