"""A full disk, at any byte of any write of any command: one `error:` line, exit status 2, and no
empty, half-written or left-over file; every file that was there before is there as it was.

`FillingDisk` makes every write of tl/engine/files.py (the one way this project writes a file)
fail with ENOSPC once a given number of bytes has gone to disk, writing the bytes that fit first,
as a real disk does. Each command runs once with room to spare, to count what each file takes,
then again with the disk full in the middle of its first file, of its last, and of others
between: each try fails at another write. `full_tmpfs` is a real full disk (a tmpfs mounted where the test runs as
root), which also catches a write that does not go through files.py. A last test reads the code:
no write outside files.py (and the table writer) remains.
"""

from __future__ import annotations

import ast
import csv
import errno
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import pytest

import main
from tests.conftest import write_image_folder
from tests.helpers import fill
from tl.engine import files

ROOT = Path(__file__).resolve().parents[1]


class FillingDisk:
    """Every write of tl/engine/files.py fails with ENOSPC once `room` bytes have been written in
    all (None: no limit); the bytes that fit are written first. `written` counts the bytes,
    `sizes` the bytes of each file in the order they were written, `failed` names the files whose
    write failed, `whole` holds the last whole version written of each file."""

    def __init__(self, monkeypatch, room: int | None = None):
        self.room, self.written, self.sizes, self.failed, self.whole = room, 0, [], [], {}
        real_fdopen = os.fdopen

        def fdopen(fd, *args, **kwargs):
            f = real_fdopen(fd, *args, **kwargs)
            if sys._getframe(1).f_globals.get("__name__") != files.__name__:
                return f  # someone else's file
            return _Filling(f, self, os.readlink(f"/proc/self/fd/{fd}"))

        monkeypatch.setattr(os, "fdopen", fdopen)


class _Filling:
    def __init__(self, f, disk: FillingDisk, temporary: str):
        name = Path(temporary).name  # .NAME.PID.XXXXXXXX.tmp
        self.f, self.disk, self.target = f, disk, Path(temporary).with_name(name[1:].rsplit(".", 3)[0])
        self.data = bytearray()
        disk.sizes.append(0)

    def write(self, data) -> int:
        data = bytes(data)
        fits = len(data) if self.disk.room is None else max(0, self.disk.room - self.disk.written)
        self.disk.written += min(fits, len(data))
        self.disk.sizes[-1] += min(fits, len(data))
        if fits < len(data):
            self.f.write(data[:fits])
            self.f.flush()  # the part that fits is on disk, in the temporary
            self.disk.failed.append(self.target)
            raise OSError(errno.ENOSPC, "No space left on device")
        self.data += data
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        self.f.close()
        if kind is None:
            self.disk.whole[self.target] = bytes(self.data)


# ----------------------------------------------------------------------------- what a folder holds
def canonical(path: Path) -> Path:
    """`path` with a run folder's name (resnet_scratch-tiny-20250101-120000) as RUN: each try's
    run folder is compared with the first one's."""
    return Path(*("RUN" if re.search(r"-\d{8}-\d{6}", part) else part for part in path.parts))


def snapshot(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for f in folders if f.exists() for p in sorted(f.rglob("*")) if p.is_file()}


def whole(path: Path, data: bytes) -> bool:
    """Whether `data` is a whole file of its kind: it reads to its end."""
    import io

    import torch

    if path.suffix == ".png":
        return data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82")
    if path.suffix == ".json":
        return isinstance(json.loads(data), dict)
    if path.suffix == ".md":
        return data.endswith(b"\n")
    if path.suffix == ".csv":  # every row as long as the header
        rows = list(csv.reader(io.StringIO(data.decode(), newline="")))
        return data.endswith(b"\n") and len(rows) > 0 and all(len(row) == len(rows[0]) for row in rows)
    if path.suffix in (".pth", ".ckpt"):
        return torch.load(io.BytesIO(data), weights_only=True) is not None
    if path.suffix == ".pt":
        return torch.jit.load(io.BytesIO(data)) is not None
    if path.suffix == ".onnx":
        import onnx

        return onnx.load_from_string(data) is not None
    return bool(data) or path.name.endswith(".lock")


def check_nothing_lost_or_half_written(before: dict[Path, bytes], after: dict[Path, bytes],
                                       disk: FillingDisk | None = None) -> None:
    """No temporary is left, no file is empty or cut short (each reads to its end), a file whose
    write failed holds its last whole version (or is absent, as before), and every file of
    `before` is still there (as it was, or whole). (The journal of an update, tl.engine.files.all_or_none,
    goes once its update is undone.)"""
    for path in (p for p in disk.failed if not p.name.endswith(".journal")) if disk else []:
        assert after.get(path) == disk.whole.get(path, before.get(path)), f"{path}: its failed write changed it"
    before, after = ({canonical(p): data for p, data in files_.items()} for files_ in (before, after))
    assert not [p for p in after if p.name.endswith(".tmp")], "a temporary was left behind"
    for path, data in after.items():
        assert data == before.get(path) or whole(path, data), f"{path} is empty or cut short"
    assert not [p for p in before if p not in after], "a file was lost"


def all_folders(*roots: Path) -> set[Path]:
    """Every folder under (and including) `roots` that exists."""
    return {d for root in roots if root.is_dir() for d in [root, *root.rglob("*")] if d.is_dir()}


def check_no_empty_folder_made(before: set[Path], roots: list[Path]) -> None:
    """A failed command leaves no empty folder it made (tl/engine/folders.py): every folder that
    is new since `before` holds a file."""
    made = all_folders(*roots) - before
    assert not [d for d in made if not any(p.is_file() for p in d.rglob("*"))], f"empty folders left: {made}"


def one_error_line(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no space left on the device" in lines[0], err


def fill_at_every_depth(monkeypatch, capfd, command, folders: list[Path], tries: int = 4,
                        all_or_none: bool = False) -> None:
    """Run `command()` (an exit status) with room to spare, counting what each file takes, then with
    the disk full in the middle of its first file, its last, and others between (`tries` in all):
    each try one error: line, nothing lost or half-written; `all_or_none`: the folders exactly as
    before (a command that updates its files together, tl.engine.files.all_or_none)."""
    before, folders_before = snapshot(*folders), all_folders(*folders)
    with monkeypatch.context() as m:
        disk = FillingDisk(m)
        code = command()
        capfd.readouterr()
    assert code == 0 and disk.written > 0
    n = len(disk.sizes)
    chosen = sorted({round(i * (n - 1) / max(1, tries - 1)) for i in range(tries)})
    for room in (sum(disk.sizes[:k]) + disk.sizes[k] // 2 for k in chosen):
        restore(folders, before, folders_before)
        with monkeypatch.context() as m:
            full = FillingDisk(m, room)
            code = command()
        one_error_line(code, capfd.readouterr().err)
        assert full.failed, "no write failed"
        check_nothing_lost_or_half_written(before, snapshot(*folders), full)
        check_no_empty_folder_made(folders_before, folders)
        if all_or_none:  # (the folder's lock file, empty once released, may be new: tl/engine/files.updating)
            def unlocked(found):
                return {p: d for p, d in found.items() if p.name != files.RESULTS_LOCK}
            assert unlocked(snapshot(*folders)) == unlocked(before), "the files changed in part"
            assert all_folders(*folders) == folders_before, "the folders changed"


def restore(folders: list[Path], files_: dict[Path, bytes], folders_before: set[Path] | None = None) -> None:
    """The folders as they were before the first try (each try starts from the same files, and,
    given `folders_before`, in the same folders)."""
    for folder in folders:
        for p in sorted(folder.rglob("*"), reverse=True) if folder.exists() else []:
            if p.is_file() and p not in files_:
                p.unlink()
        for p, data in files_.items():
            if p.is_relative_to(folder):
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
    kept = all_folders(*folders) if folders_before is None else folders_before
    for folder in sorted(all_folders(*folders) - kept, reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def cli(*argv) -> int:
    return main.main([str(a) for a in argv])


# ----------------------------------------------------------------------------- the commands
@pytest.fixture
def trained(tiny_backbone, tmp_path) -> Path:
    """A run folder of the tiny backbone (one epoch) and its data."""
    data = write_image_folder(tmp_path / "data", train=4, val=4)
    assert cli("-e", "resnet_scratch", "-b", "tiny", "--data", data, "--epochs", "1", "--out", tmp_path / "runs",
               "--workers", "0", "--image-size", "32", "--no-progress") == 0
    (run,) = (tmp_path / "runs").iterdir()
    return run


def test_a_training_run_on_a_full_disk(tiny_backbone, tmp_path, monkeypatch, capfd):
    data = write_image_folder(tmp_path / "data", train=4, val=4)
    out = tmp_path / "runs"
    (out / "an-older-run").mkdir(parents=True)
    (out / "an-older-run" / "config.json").write_text('{"kept": true}\n')

    def train():
        for run in out.glob("resnet_scratch-*"):  # each try makes its run folder anew
            shutil.rmtree(run)
        return cli("-e", "resnet_scratch", "-b", "tiny", "--data", data, "--epochs", "1", "--out", out,
                   "--workers", "0", "--image-size", "32", "--no-progress")

    fill_at_every_depth(monkeypatch, capfd, train, [out], tries=3)


def test_predict_dir_on_a_full_disk(trained, tmp_path, monkeypatch, capfd):
    table = tmp_path / "tables" / "table.csv"
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "older.csv").write_text("path,prediction\n")

    def predict():
        table.unlink(missing_ok=True)
        return cli("--predict", trained.parents[1] / "data" / "val", "--checkpoint", trained / "best.pth",
                   "--csv", table, "--workers", "0", "--no-progress")

    fill_at_every_depth(monkeypatch, capfd, predict, [tmp_path / "tables"])


@pytest.mark.parametrize("fmt, tries", [("onnx", 1), ("torchscript", 2)])  # (an ONNX export takes seconds)
def test_export_on_a_full_disk(trained, monkeypatch, capfd, fmt, tries):
    fill_at_every_depth(monkeypatch, capfd, lambda: cli("--export", trained, "--format", fmt), [trained], tries)


def test_compare_all_on_a_full_results_folder(tiny_backbone, tmp_path, monkeypatch, capfd):
    """The results folder holds a comparison (seed 0) and takes a second seed's rows: whatever write
    the disk fills up at, the folder stays as the first comparison left it, every file."""
    out = tmp_path / "results"
    fill_at_every_depth(monkeypatch, capfd, cached_comparison(monkeypatch, tmp_path, out), [out], tries=3,
                        all_or_none=True)


def test_compare_all_that_removes_stale_files_on_a_full_disk(tiny_backbone, tmp_path, monkeypatch, capfd):
    """The results folder holds seeds 0 and 1 and takes a comparison of seed 0 alone, which removes
    seed 1's files: at whatever write the disk fills up, those files are back and the folder is
    as before, and no "removed stale" line is printed; with room, the removal is said."""
    out = tmp_path / "results"
    compare = cached_comparison(monkeypatch, tmp_path, out, first=("0", "1"))  # out: seeds 0 and 1
    before = snapshot(out)
    with monkeypatch.context() as m:
        disk = FillingDisk(m)
        assert compare(["0"]) == 0
    said = capfd.readouterr().out
    assert "removed stale" in said
    for k in (len(disk.sizes) // 2, len(disk.sizes) - 1):  # a table, the page (the block's last write)
        restore([out], before)
        with monkeypatch.context() as m:
            FillingDisk(m, sum(disk.sizes[:k]) + disk.sizes[k] // 2)
            code = compare(["0"])
        printed = capfd.readouterr()
        one_error_line(code, printed.err)
        assert "removed stale" not in printed.out and snapshot(out) == before, k


def cached_comparison(monkeypatch, tmp_path: Path, out: Path, first: tuple = ("0",)):
    """`out` holding a comparison of `first` seeds (compare_all, tiny data), and the command that
    compares `seeds` into it (by default seeds 0 and 1: seed 1's rows added).
    Each (recipe, backbone, seed) trains once, before: a try of that command is
    its writing alone (training is tested elsewhere; here the results folder is)."""
    from experiments import compare_all

    real, done = compare_all.run_one, {}

    def run_one(name, backbone, seed, *args, **kwargs):
        if (name, backbone, seed) not in done:
            done[(name, backbone, seed)] = real(name, backbone, seed, *args, **kwargs)
        return done[(name, backbone, seed)]

    monkeypatch.setattr(compare_all, "run_one", run_one)
    data = write_image_folder(tmp_path / "data", train=4, val=4)

    def compare(seeds: list[str], where: Path) -> int:
        return command(lambda: compare_all.main(["--quick", "--data", str(data), "--experiments", "resnet_scratch",
                                                 "--backbone", "tiny", "--out", str(where), "--workers", "0",
                                                 "--seeds", *seeds, "--runs-dir",
                                                 str(tmp_path / f"runs-{uuid.uuid4().hex}")]))

    assert compare(["0", "1"], tmp_path / "scratch") == 0  # both seeds trained
    assert compare(list(first), out) == 0
    return lambda seeds=("0", "1"): compare(list(seeds), out)


def command(main_function) -> int:
    from tl.engine.command import command as run_command

    return run_command(main_function)


def test_a_benchmark_on_a_full_disk(tiny_backbone, tmp_path, monkeypatch, capfd):
    from benchmarks import feature_batch

    data = write_image_folder(tmp_path / "data", train=4, val=4)
    out = tmp_path / "results"
    out.mkdir()
    (out / "benchmark.md").write_text("# the loop's page, not this benchmark's\n")

    def measure():
        return command(lambda: feature_batch.main(["--data", str(data), "--backbone", "tiny", "--weights", "none",
                                                   "--batch-sizes", "2", "--repeats", "1", "--out", str(out)]))

    fill_at_every_depth(monkeypatch, capfd, measure, [out], all_or_none=True)  # its table and page together


def test_commands_that_make_their_output_folder_on_a_full_disk(tiny_backbone, tmp_path, monkeypatch, capfd):
    """--show-data, --find-lr and a benchmark, each into an --out two folders deep that does not
    exist yet: at whatever write the disk fills up, no empty folder is left behind."""
    from benchmarks import blind_sizes

    data = write_image_folder(tmp_path / "data", train=4, val=4)
    nested = tmp_path / "nested"
    monkeypatch.setattr(blind_sizes, "NETWORKS", [("tiny", "none")])
    commands = {
        "show-data": lambda: cli("--show-data", "--data", data, "--backbone", "tiny", "--out", nested / "a" / "b"),
        "find-lr": lambda: cli("-e", "resnet_scratch", "-b", "tiny", "--data", data, "--find-lr", "--quick",
                               "--image-size", "32", "--out", nested / "a" / "b", "--no-progress"),
        "blind sizes": lambda: command(lambda: blind_sizes.main(["--data", str(data), "--sizes", "32",
                                                                 "--out", str(nested / "a" / "b")])),
    }
    for run in commands.values():
        fill_at_every_depth(monkeypatch, capfd, run, [nested], tries=2)
        shutil.rmtree(nested, ignore_errors=True)  # (a failed last try removed the folders it made)


# ----------------------------------------------------------------------------- a real full disk
def test_compare_all_on_a_really_full_tmpfs(tiny_backbone, tmp_path, monkeypatch, capfd, full_tmpfs):
    """The issue's case on a real disk, where a write that bypassed files.py would show too: the
    results folder full at one write after another (0, 1, 2, 4, 8, ... pages of 4 KiB free)."""
    out = full_tmpfs / "results"
    compare = cached_comparison(monkeypatch, tmp_path, out)
    before = snapshot(out)
    tries = 0
    for pages in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256):
        restore([out], before)
        fill(full_tmpfs, pages)
        code = compare()
        err = capfd.readouterr().err
        if code == 0:
            break
        tries += 1
        one_error_line(code, err)
        check_nothing_lost_or_half_written(before, snapshot(out))
    assert code == 0 and tries > 3, f"{tries} tries failed before one fitted"
    (full_tmpfs / ".filler").unlink()


# ----------------------------------------------------------------------------- the code itself
# calls that write a file themselves (a name ends so): a failed write would leave half of it
WRITERS = ("write_text", "write_bytes", "savefig", "save", "shutil.copy", "shutil.copy2", "shutil.copyfile",
           "shutil.copyfileobj", "json.dump", "tofile", "os.write", "to_csv")
ALLOWED = {  # (file, text on the line): writes into memory or into files.py's temporary
    ("tl/engine/plots.py", "fig.savefig(picture,"),
    ("tl/engine/export.py", "atomic_write(path, lambda f: torch.jit.save("),
    ("benchmarks/gpu_data.py", "atomic_write(dst, lambda f: small.save("),
    ("benchmarks/growth.py", 'atomic_write(folder / f"{i:06d}.jpg", lambda f: image.save('),
    ("tl/engine/folder_lock.py", 'open(path, "a+")'),  # a lock file: its holder's one line, never data
    ("tl/engine/folder_lock.py", "os.write(f.fileno(), "),  # that line, unbuffered
}


def _writes(path: Path) -> list[tuple[int, str]]:
    """(line, call) of every call in `path` that writes a file by itself."""
    text = path.read_text()
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        writes = name == "open" and any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                                        and set(a.value) & set("wax+") for a in [*node.args[1:2],
                                                                                 *(k.value for k in node.keywords)])
        # "shutil.copy" as itself; "save" as any object's method (torch.save, image.save)
        writes |= any(name == w if "." in w else name.endswith("." + w) for w in WRITERS)
        if name.endswith(".to_csv") and not node.args and not any(k.arg == "path_or_buf" for k in node.keywords):
            writes = False  # to_csv() without a path returns the text
        if writes:
            found.append((node.lineno, text.splitlines()[node.lineno - 1].strip()))
    return found


def test_every_write_goes_through_files_py():
    """No module writes a file itself (a write that fails half-way would leave half a file, and
    shutil.copyfile an empty one): tl/engine/files.py does, for every table, page, picture and model."""
    bad = []
    for path in [ROOT / "main.py", ROOT / "commands.py", *ROOT.glob("tl/**/*.py"), *ROOT.glob("experiments/**/*.py"),
                 *ROOT.glob("benchmarks/*.py")]:
        name = path.relative_to(ROOT).as_posix()
        if name != "tl/engine/files.py":
            bad += [f"{name}:{n}: {line}" for n, line in _writes(path)
                    if not any(name == f and allowed in line for f, allowed in ALLOWED)]
    assert not bad, "writes that bypass tl/engine/files.py:\n" + "\n".join(bad)


def test_the_code_check_sees_each_kind_of_write(tmp_path):
    """The check above finds every kind of write it looks for (a check that finds nothing proves nothing)."""
    code = tmp_path / "writes.py"
    code.write_text("\n".join([
        "p.write_text('x')", "p.write_bytes(b'x')", "fig.savefig(p)", "torch.save(obj, p)", "img.save(p)",
        "shutil.copyfile(a, b)", "shutil.copy(a, b)", "json.dump(obj, f)", "df.to_csv(p)", "open(p, 'w')",
        "open(p, mode='ab')", "os.write(fd, b'x')", "np.save(p, a)",
        "df.to_csv(index=False)", "open(p)", "open(p, 'rb')", "json.dumps(obj)"]))  # the last four write nothing
    assert [n for n, _ in _writes(code)] == list(range(1, 14))


def test_every_entry_point_runs_through_the_one_wrapper():
    """`python -m experiments.X` / `benchmarks.X` end through tl.engine.command.command, as main.py does."""
    for path in [*ROOT.glob("experiments/*.py"), *ROOT.glob("benchmarks/*.py")]:
        text = path.read_text()
        if 'if __name__ == "__main__":' in text and path.name != "trace_core.py":  # trace_core runs main.main
            block = text.split('if __name__ == "__main__":', 1)[1]
            assert "sys.exit(command(main" in block, path


def test_a_resume_on_a_full_disk_says_to_resume_a_copy(trained, monkeypatch, capfd):
    """A resumed run writes in its own folder: --out cannot move it, so the advice is a copy."""
    with monkeypatch.context() as m:
        FillingDisk(m, room=0)
        code = cli("--resume", trained / "last.ckpt", "--epochs", "2", "--no-progress")
    err = capfd.readouterr().err
    one_error_line(code, err)
    assert "copy the run folder to a writable disk and --resume the copy's last.ckpt" in err and "--out" not in err


def test_commands_that_write_into_a_run_folder_on_a_full_disk_say_to_use_a_copy(trained, monkeypatch, capfd):
    """--evaluate, --export and --explain write into the run's folder, which --out does not move."""
    photo = next((trained.parents[1] / "data" / "val").rglob("*.png"))
    evaluate = ["--evaluate", trained / "best.pth", "--data", trained.parents[1] / "data"]
    for argv in (evaluate, ["--export", trained], ["--explain", photo, "--checkpoint", trained / "best.pth"]):
        with monkeypatch.context() as m:
            FillingDisk(m, room=0)
            code = cli(*argv, "--no-progress")
        err = capfd.readouterr().err
        one_error_line(code, err)
        assert "(copy the run folder to a writable disk and run the command on the copy)" in err, argv
