"""benchmarks/bench.py, checked without a GPU: the compute bound trains with the very settings a
real run has on the device (precision, layout, per-phase reads, BatchNorm modes), on batches
already on the device; the prepared device script's arguments parse. No timing here."""

import dataclasses
import os
import statistics
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmarks import bench
from experiments import get_experiment
from tl.engine.device import device_hooks, make_grad_scaler
from tl.engine.options import RunOptions
from tl.engine.run import run

ROOT = Path(__file__).resolve().parents[2]
# what the device and the recipe decide; progress, log, best_by and end_of_epoch are the run's bookkeeping
FIELDS = ("autocast_dtype", "channels_last", "device_sums", "scaler", "frozen_bn_eval", "bn_eval",
          "scheduler_interval")


def _fields(hooks) -> dict:
    return {f: getattr(hooks, f) for f in FIELDS}


@pytest.mark.parametrize("name", ["resnet_finetune", "resnet_frozen"])  # frozen_bn_eval off, on
def test_the_bound_trains_with_the_hooks_of_a_real_run(name, tiny_data, tiny_backbone, tmp_path, monkeypatch):
    import tl.engine.run as engine_run

    seen, real = [], engine_run.train_model

    def spy(net, loaders, criterion, optimizer, num_epochs, device, history, hooks):
        seen.append(hooks)
        return real(net, loaders, criterion, optimizer, num_epochs, device, history, hooks)

    monkeypatch.setattr(engine_run, "train_model", spy)
    module = get_experiment(name)
    run(module.RECIPE, module.build, RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=1,
                                                out=tmp_path, progress=False, plots=False, feature_cache=False,
                                                device="cpu"), log=lambda s: None)
    recipe, _, _, _, hooks = bench.bound_training(name, "tiny", "none", torch.device("cpu"))
    assert _fields(hooks) == _fields(seen[0])
    assert recipe.batch_size == module.RECIPE.batch_size
    assert hooks.autocast_dtype is None and hooks.device_sums is False and hooks.channels_last is True
    assert hooks.frozen_bn_eval is (name == "resnet_frozen")


def test_on_cuda_the_bound_has_bf16_per_phase_reads_and_the_measured_layout(tiny_backbone, monkeypatch):
    """Without a GPU: the Hooks values alone, which decide what the loop does there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    _, _, _, _, hooks = bench.bound_training("resnet_finetune", "tiny", "none", cuda)
    # the function tl.engine.run.train_stages calls, with a run's defaults (--amp on, layout left out)
    run_side = device_hooks(cuda, RunOptions(data=Path(".")).amp, None, make_grad_scaler(cuda, True))
    assert {f: getattr(hooks, f) for f in run_side} == run_side
    assert hooks.autocast_dtype is torch.bfloat16 and hooks.device_sums is True
    assert hooks.channels_last is False and hooks.scaler is None  # default_channels_last(cuda); bf16 needs no scaler
    _, _, _, _, on = bench.bound_training("resnet_finetune", "tiny", "none", cuda, channels_last=True)
    assert on.channels_last is True and dataclasses.replace(on, channels_last=False).device_sums is True


def test_the_bound_reads_seeded_batches_that_stay_on_their_device():
    xs, ys = torch.arange(10.0).view(10, 1), torch.arange(10)
    orders = []
    for _ in range(2):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=None,
                                             sampler=bench.ShuffledBatches(10, 4, torch.device("cpu"), seed=3))
        batches = list(loader)
        assert [len(b[1]) for b in batches] == [4, 4, 2] and len(loader) == 3
        assert all(torch.equal(x[:, 0].long(), y) for x, y in batches)  # images and labels stay paired
        orders.append(torch.cat([y for _, y in batches]))
    assert sorted(orders[0].tolist()) == list(range(10)) and torch.equal(orders[0], orders[1])
    assert not torch.equal(orders[0], ys)  # shuffled


def _script_args(dry: bool) -> list[str]:
    env = {**os.environ, "GPU_SESSION_ARGS_ONLY": "1", "GPU_SESSION_DRY": "1" if dry else "0", "OUT": "/tmp/x"}
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], env=env, capture_output=True,
                         text=True, check=True).stdout
    return out.splitlines()


@pytest.mark.parametrize("dry", [False, True])
def test_the_device_script_passes_bench_arguments_it_accepts(dry):
    args = bench.parse_args(_script_args(dry))
    assert args.compare_minutes and args.deadline is not None and args.skip_frozen
    if dry:
        assert args.device == "cpu" and str(args.out).startswith("/tmp/x")  # never the committed results/
    else:
        assert args.device == "cuda" and [c[:2] for c in args.case] == [("resnet_finetune", "efficientnet_lite0"),
                                                                        ("resnet_bn_only", "efficientnet_lite0")]
        assert args.compile_case[:2] == ("resnet_finetune", "efficientnet_lite0") and args.configs is None
        assert set(args.compare_experiments) == set(bench.DOCUMENT_RECIPES) and args.compare_reserve > 0


def test_the_bench_flags_parse_and_bad_cases_are_refused(capsys):
    args = bench.parse_args(["--case", "resnet_finetune/resnet18", "--configs", "bound", "loop-layout",
                             "--compile-case", "resnet_bn_only/efficientnet_lite0", "--compile-path", "image-cache",
                             "--skip-frozen", "--compare-minutes", "--compare-epochs", "1", "--deadline", "60"])
    assert args.case == [("resnet_finetune", "resnet18", "none")]  # LOOP_CASES' weights
    assert args.configs == ["bound", "loop-layout"] and args.compile_path == "image-cache"
    for bad in (["--case", "resnet_finetune"], ["--configs", "bogus"], ["--compile-path", "disk"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_a_part_past_the_deadline_stops_with_a_note():
    notes, started = [], time.monotonic()
    with bench.time_limit(1, "--compile", notes):
        while time.monotonic() - started < 10:
            pass
    assert time.monotonic() - started < 5 and notes and "--compile" in notes[0]
    with bench.time_limit(None, "nothing", notes):
        pass
    assert len(notes) == 1


def test_the_cpu_side_of_the_end_to_end_comparison_comes_from_the_committed_runs():
    committed = pd.read_csv(ROOT / "results" / "runs.csv")
    mine = committed[(committed.dataset == "hymenoptera_data") & (committed.backbone == "efficientnet_lite0")
                     & (committed.seed == 0) & committed.experiment.isin(bench.DOCUMENT_RECIPES)]
    assert len(mine) == len(bench.DOCUMENT_RECIPES)
    seconds, machine = bench.committed_cpu_runs(mine.assign(train_seconds=0.0))
    assert seconds == pytest.approx(mine.train_seconds.sum()) and "CPU" in machine
    assert bench.committed_cpu_runs(mine.assign(seed=7)) is None  # a run the CPU never trained


def test_a_gpu_table_names_its_card(tmp_path):
    meta = {"command": "python -m benchmarks.bench", "machine": "m", "card": "NVIDIA Test Card", "commit": "c",
            "date": "d", "device": "cuda", "complete": False, "written_after": "resnet_finetune / tiny"}
    bench.write_results(tmp_path, [{"kind": "bound", "case": "x", "unit": "img/s", "median": 1.0, "min": 1.0,
                                    "max": 1.0, "n": 1, "card": "NVIDIA Test Card"}], [], meta)
    md = (tmp_path / "benchmark_cuda.md").read_text()
    assert "NVIDIA Test Card" in md and "partial" in md and "channels_last off" in md
    assert pd.read_csv(tmp_path / "benchmark_cuda.csv").card.tolist() == ["NVIDIA Test Card"]


def test_every_configuration_of_a_case_and_the_compile_case_make_their_rows(monkeypatch):
    """The rows of bench.py's table, with stand-ins for the timed runs (figures are not tested)."""
    speed = {"jpeg": 50.0, "image-cache": 80.0, "device-images": 90.0}
    calls = []

    def loop(*spec, epochs, workers, image_cache=False, device_images=False, channels_last=None, compile=False):
        path = "device-images" if device_images else "image-cache" if image_cache else "jpeg"
        calls.append((path, channels_last, compile))
        return speed[path] * (1.5 if compile else 1.0) * (0.5 if channels_last else 1.0)

    monkeypatch.setattr(bench, "loop_throughput", loop)
    monkeypatch.setattr(bench, "compute_bound", lambda *spec, epochs, channels_last: 100.0 if not channels_last
                        else 40.0)
    rows = []
    args = bench.parse_args(["--workers", "8", "--repeats", "2"])
    record = lambda kind, case, unit, values, **extra: rows.append((kind, case, statistics.median(values)))  # noqa: E731
    spec = bench.case_spec("resnet_finetune/efficientnet_lite0")
    loops = bench.measure_case(spec, bench.CONFIGS, args, Path("."), "cuda", record)
    bench.measure_compile(spec, "device-images", loops, args, Path("."), "cuda", record)
    got = {(k, c.split(" / ", 1)[1]): v for k, c, v in rows}
    case = "efficientnet_lite0"
    assert got[("loop", f"{case}, JPEG decoding in 8 workers")] == 50
    assert got[("bound", f"{case}, channels_last off")] == 100 and got[("bound", f"{case}, channels_last on")] == 40
    assert got[("share", f"{case}, --device-images")] == 90  # % of the bound of the same (default: off) layout
    assert got[("loop", f"{case}, --device-images, channels_last on")] == 45  # the fastest path, other layout
    assert got[("share", f"{case}, --device-images, channels_last on")] == pytest.approx(112.5)
    assert got[("loop", f"{case}, --device-images, --compile")] == 135
    assert got[("speedup", f"{case}, --device-images: --compile / eager")] == 1.5
    assert calls.count(("device-images", None, False)) == 2  # eager measured once (2 repeats), reused for --compile
