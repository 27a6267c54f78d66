"""The reading notebook, made from its source and run: docs/reading.py -> docs/reading.ipynb.

    python -m benchmarks.reading_notebook        # on ../shared/data/hymenoptera_data, a few minutes on a CPU

docs/reading.py (jupytext's percent format) is what is edited and reviewed; docs/reading.ipynb
holds the same cells with the outputs and pictures of one run on the shared photos. This command
converts the source (jupytext), runs every cell in a fresh kernel of the Python that runs it
(nbclient, ipykernel's "python3", the notebook's folder as the working directory) and writes the
notebook atomically, or nothing when a cell fails. `--data`, `--backbone`, `--weights` reach the
notebook's first cell through the environment variables it reads (TL_READING_DATA,
TL_READING_BACKBONE, TL_READING_WEIGHTS). tests/benchmarks/test_reading_notebook.py runs the same
source on tiny images, and checks that the committed notebook has the source's cells.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks import command
from tl import TLError

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "docs" / "reading.py"
NOTEBOOK = ROOT / "docs" / "reading.ipynb"
KERNEL = "python3"  # ipykernel's kernel, in the Python that runs this command


def read_source(path: Path = SOURCE):
    """The notebook of a percent-format source, without outputs; cell ids numbered in order, so a
    regenerated notebook differs from the last one only where a cell or an output does."""
    import jupytext

    nb = jupytext.read(path, fmt="py:percent")
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    return nb


def this_python() -> type:
    """A kernel manager class that starts ipykernel's own kernel, which runs this interpreter
    (sys.executable): no kernel folder is searched, where a "python3" that another Python registered
    (~/.local/share/jupyter/kernels) would come first and lack this environment's packages."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ThisPython(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _no_kernel_folders(self) -> KernelSpecManager:
            return KernelSpecManager(kernel_dirs=[])

    return ThisPython


def execute(nb, env: dict[str, str] | None = None, timeout: int = 600, cwd: Path = SOURCE.parent):
    """Run every code cell of `nb` in order in a new kernel, with `env` added to this process's
    environment; the outputs go into `nb`. A cell that fails stops the run: a TLError naming the
    cell and the error (never the kernel's traceback); so does a kernel that dies."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    # the kernel's own log stays quiet (its warning that local sockets are not encrypted would stand among
    # the command's lines); what a cell prints or raises comes back in its outputs
    client = NotebookClient(nb, kernel_manager_class=this_python(), kernel_name=KERNEL, timeout=timeout,
                            record_timing=False, extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute(env={**os.environ, **(env or {})})
    except (CellExecutionError, CellTimeoutError) as exc:
        failed = next((i for i, c in enumerate(nb.cells) if any(o.get("output_type") == "error"
                                                               for o in c.get("outputs", []))), None)
        where = f"cell {failed} ({nb.cells[failed].source.splitlines()[0]!r})" if failed is not None else "a cell"
        what = f"{exc.ename}: {exc.evalue}" if isinstance(exc, CellExecutionError) else str(exc).splitlines()[0]
        raise TLError(f"the reading notebook stopped in {where}: {what}") from None
    except (DeadKernelError, RuntimeError) as exc:  # jupyter_client: "Kernel died before replying to kernel_info"
        raise TLError(f"the reading notebook's kernel ({sys.executable} -m ipykernel) stopped: {exc}") from None
    return nb


def write_notebook(nb, path: Path = NOTEBOOK) -> Path:
    """`nb` as an .ipynb file, written atomically (a failed write leaves the old file)."""
    import nbformat

    from tl.engine.files import atomic_write_text

    text = nbformat.writes(nb)
    return atomic_write_text(path, text if text.endswith("\n") else text + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reading_notebook", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/hymenoptera_data"),
                   help="the photos (a relative path is taken from the project's folder)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--out", type=Path, default=NOTEBOOK)
    p.add_argument("--timeout", type=int, default=600, help="seconds one cell may run")
    args = p.parse_args(argv)
    data = ROOT / args.data
    if not (data / "train").is_dir():
        raise TLError(f"--data {args.data}: no train/ folder in {data}")
    started = time.perf_counter()
    nb = execute(read_source(), {"TL_READING_DATA": str(data), "TL_READING_BACKBONE": args.backbone,
                                 "TL_READING_WEIGHTS": args.weights}, timeout=args.timeout)
    written = write_notebook(nb, args.out)
    print(f"wrote {written} ({written.stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
