"""benchmarks/side_by_side.py: loop rows paired by case and path, a case's further qualifiers kept
apart."""

from __future__ import annotations


def test_side_by_side_pairs_loop_rows_by_case_and_path(tmp_path):
    from benchmarks import side_by_side

    before, after = tmp_path / "before.csv", tmp_path / "after.csv"
    before.write_text("kind,case,unit,median,min,max,n\n"
                      "loop,resnet_finetune / efficientnet_lite0,img/s,20.0,19.0,21.0,3\n"
                      "loop,\"resnet_finetune / efficientnet_lite0, --image-cache --workers 0\",img/s,25.0,24.0,"
                      "26.0,3\n"
                      "bound,resnet_finetune / efficientnet_lite0,img/s,27.0,26.0,28.0,3\n")
    after.write_text("kind,case,unit,median,min,max,n\n"
                     "loop,\"resnet_finetune / efficientnet_lite0, JPEG decoding in 2 workers\",img/s,30.0,29.0,"
                     "31.0,2\n"
                     "loop,\"resnet_finetune / efficientnet_lite0, --image-cache --workers 0\",img/s,20.0,19.0,21.0,2\n"
                     "loop,\"resnet_finetune / efficientnet_lite0, --image-cache --workers 0, --compile\",img/s,3.0,"
                     "3.0,3.0,1\n")
    md = side_by_side.page(before, after, "t")
    rows = [line for line in md.splitlines() if line.startswith("| resnet_finetune")]
    assert rows == ["| resnet_finetune / efficientnet_lite0 | JPEG in workers | 20.00 (19.00-21.00) | "
                    "30.00 (29.00-31.00) | 1.50 |",
                    "| resnet_finetune / efficientnet_lite0 | image cache | 25.00 (24.00-26.00) | "
                    "20.00 (19.00-21.00) | 0.80 |"]


def test_side_by_side_keeps_a_cases_further_qualifiers_apart(tmp_path):
    """The CUDA benchmark has '--device-images' and '--device-images, channels_last on' for one
    recipe: each pairs with its own row of the other run, never with the other layout's."""
    from benchmarks import side_by_side

    case = "resnet_finetune / efficientnet_lite0"
    header = "kind,case,unit,median,min,max,n\n"
    before, after = tmp_path / "before.csv", tmp_path / "after.csv"
    before.write_text(header + f"loop,\"{case}, --device-images\",img/s,100.0,99.0,101.0,2\n"
                      f"loop,\"{case}, --device-images, channels_last on\",img/s,80.0,79.0,81.0,2\n")
    after.write_text(header + f"loop,\"{case}, --device-images\",img/s,110.0,109.0,111.0,2\n"
                     f"loop,\"{case}, --device-images, channels_last on\",img/s,40.0,39.0,41.0,2\n")
    rows = [line for line in side_by_side.page(before, after, "t").splitlines() if line.startswith(f"| {case}")]
    assert rows == [f"| {case} | device images | 100.00 (99.00-101.00) | 110.00 (109.00-111.00) | 1.10 |",
                    f"| {case} | device images, channels_last on | 80.00 (79.00-81.00) | 40.00 (39.00-41.00) | 0.50 |"]


def test_a_table_benchmarks_bench_did_not_write_is_one_error_line(tmp_path, capsys):
    from benchmarks import side_by_side
    from tl.engine.command import command

    tables = {"no kind": "case,median,min,max,n\nx,1,1,1,1\n",
              "a text median": "kind,case,median,min,max,n\nloop,\"a, --image-cache\",fast,1,1,1\n",
              "no rows at all": "", "not a table": "\x00\x01garbage"}
    for name, text in tables.items():
        path = tmp_path / f"{name}.csv"
        path.write_text(text)
        code = command(lambda p=path: side_by_side.main([str(p), str(p), "--out", str(tmp_path / "o.md")]))
        err = capsys.readouterr().err
        assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, (name, err)
