"""main.py for the distributed tests: `torchrun ... tests/ddp_main.py ARGS` (tests/test_distributed.py).

A torchrun subprocess does not see pytest's fixtures, so this script registers the tiny
backbone of tests/conftest.py itself and adds two test hooks, each set by an environment
variable, before it hands the arguments to `main.main`:

TL_TEST_DIGESTS=DIR      each process writes DIR/rank<R>.json: digests of its final weights
                         (as the loop left them) and of its best-epoch copy, and how many
                         feature passes (tl.engine.feature_store.compute_features) it ran;
TL_TEST_KILL_AFTER=E     process 0 kills itself (SIGKILL, no clean-up) right after it has
                         saved epoch E: a machine that dies mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main  # noqa: E402
import tl.engine.feature_store  # noqa: E402
import tl.engine.run  # noqa: E402
from tests.conftest import TINY  # noqa: E402
from tl.engine import distributed, files  # noqa: E402
from tl.models import BACKBONES  # noqa: E402

BACKBONES["tiny"] = TINY

if "TL_TEST_DIGESTS" in os.environ:
    train_model, feature_passes = tl.engine.run.train_model, []
    compute_features = tl.engine.feature_store.compute_features

    def counted_compute_features(*args, **kwargs):
        feature_passes.append(1)
        return compute_features(*args, **kwargs)

    def recording_train_model(net, *args, **kwargs):
        history = train_model(net, *args, **kwargs)
        digests = {"final": files.state_digest(distributed.unwrap(net).state_dict()),
                   "best": files.state_digest(history.best_state), "world_size": distributed.world_size(),
                   "feature_passes": len(feature_passes)}
        path = Path(os.environ["TL_TEST_DIGESTS"]) / f"rank{distributed.rank()}.json"
        path.write_text(json.dumps(digests))
        return history

    tl.engine.run.train_model = recording_train_model
    tl.engine.feature_store.compute_features = counted_compute_features

if "TL_TEST_KILL_AFTER" in os.environ:
    write_history_csv = tl.engine.run_folder.write_history_csv

    def dying_write_history_csv(history, path):
        write_history_csv(history, path)  # the last write of on_epoch_end: the epoch is saved
        if history.rows[-1]["epoch"] == int(os.environ["TL_TEST_KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)

    tl.engine.run_folder.write_history_csv = dying_write_history_csv

if __name__ == "__main__":
    sys.exit(main.main())
