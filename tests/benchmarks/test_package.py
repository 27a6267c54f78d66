"""benchmarks/__init__.py, what every benchmark shares: a measurement's own process never
outlives the benchmark that started it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import child_process

ROOT = Path(__file__).resolve().parents[2]
WITH_A_WORKER = ("import subprocess, sys, time; "
                 "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                 "print(w.pid, flush=True); time.sleep(60)")  # a child with a worker process of its own


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return status == "Z"  # ended, not yet reaped by its parent


@pytest.mark.parametrize("ended_by", [KeyboardInterrupt, RuntimeError, None])
def test_a_measurements_process_and_its_workers_end_with_the_block(ended_by):
    """Ctrl-C or SIGTERM (KeyboardInterrupt), an error, or the block's plain end: the child and
    the process it started are gone once the block is left."""
    with pytest.raises(ended_by) if ended_by else open(os.devnull) as _:
        with child_process([sys.executable, "-c", WITH_A_WORKER], stdout=subprocess.PIPE, text=True) as child:
            worker = int(child.stdout.readline())
            assert os.getpgid(child.pid) == child.pid != os.getpgid(0)  # a group of its own
            if ended_by:
                raise ended_by()
    deadline = time.monotonic() + 10
    while not (_gone(child.pid) and _gone(worker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.returncode is not None and _gone(worker)


def test_every_benchmark_starts_its_processes_through_child_process():
    """A bare Popen would outlive a benchmark stopped by Ctrl-C or SIGTERM (subprocess.run ends
    its child itself)."""
    for path in (ROOT / "benchmarks").glob("*.py"):
        if path.name != "__init__.py":
            assert "subprocess.Popen(" not in path.read_text(), path.name
