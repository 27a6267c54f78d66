"""benchmarks/growth.py's bookkeeping (the measurements themselves are benchmarks, not tests):
its section replaces its previous section of results/benchmark.md and nothing else, and the
straight-line fit recovers a line."""

from __future__ import annotations

import pytest

from benchmarks import growth
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


def test_growth_measures_the_feature_pass_in_its_child_process(tmp_path, monkeypatch):
    """The feature-pass child of benchmarks/growth.py runs (it names tl's modules as they are)."""
    import json

    from benchmarks.growth import FEATURE_CODE, _child

    data = make_images(tmp_path / "images", 10, size=32)
    result = _child(FEATURE_CODE, str(data), "0", "1.0", env={"TL_CACHE_DIR": str(tmp_path / "cache")})
    assert result["images"] == 10 and result["seconds"] > 0, json.dumps(result)


@pytest.mark.parametrize("sizes", [["10"], ["50", "50"]])
def test_one_size_is_refused_not_fitted(sizes, tmp_path, capsys):
    """A straight line through one point would print a slope and "0.0% deviation" that no one measured."""
    with pytest.raises(SystemExit) as stopped:
        growth.main(["--sizes", *sizes, "--out", str(tmp_path)])
    assert stopped.value.code == 2 and "needs two different sizes" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
