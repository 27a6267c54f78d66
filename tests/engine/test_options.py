"""tl/engine/options.py: every command-line option is a RunOptions field under its own name, or
belongs to an action; left out, the run options are RunOptions' defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import commands
import main
from tl.engine.options import RunOptions


def test_run_options_are_declared_once():
    """Every option is a RunOptions field under its own name (its dest), or belongs to an action
    or a command; left out, the run options give exactly RunOptions' defaults."""
    parser = main.build_parser()
    not_run = {"help", "experiment", "list", "resume", "evaluate", "predict", "explain", "export", "prepare",
               "show_data", "src", "dest", "force", "split", "checkpoint", "format", "quick", "csv", "find_lr"}
    assert {a.dest for a in parser._actions} - not_run <= {f.name for f in dataclasses.fields(RunOptions)}
    args = parser.parse_args(["-e", "resnet_finetune", "--data", "somewhere"])
    assert commands.run_options(args) == RunOptions(data=Path("somewhere"))
