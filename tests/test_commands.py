"""commands.py: the run options a command line gives (workers and the image cache by option)."""

from __future__ import annotations

import pytest

import commands
import main


@pytest.mark.parametrize("argv, workers, image_cache", [
    ([], 2, False),
    (["--quick"], 0, False),
    (["--quick", "--workers", "1"], 1, False),  # an explicit --workers wins over --quick's 0
    (["--device-images"], 0, True),
    (["--device-images", "--workers", "0"], 0, True),
])
def test_workers_and_image_cache_from_the_command_line(tiny_data, argv, workers, image_cache):
    args = main.build_parser().parse_args(["-e", "resnet_finetune", "--data", str(tiny_data), *argv])
    opts = commands.run_options(args)
    assert (opts.workers, opts.image_cache) == (workers, image_cache)
