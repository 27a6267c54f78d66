"""The machinery of a search for a recipe's numbers (experiments/tune.py): what is searched,
where the study lives, and the tuned file a search leaves behind.

SPACE is the search space as a table: one row per number, saying when the recipe has it,
how Optuna draws it, and which Recipe fields it changes. A new Recipe field becomes
searchable by adding one row. Optuna is imported only where a search runs, so reading a
tuned file (`tuned_recipe`) needs none.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tl import TLError
from tl.recipe import Recipe

HEARTBEAT_S, GRACE_S, RETRIES = 60, 180, 2  # a trial silent for 3 minutes was killed: it is run again, twice at most
# BatchNorm while training, as (frozen_bn_eval, bn_eval): all in train mode, the frozen ones in eval mode, all in eval
BN_POLICIES = {"train": (False, False), "frozen_eval": (True, False), "eval": (False, True)}


@dataclass(frozen=True)
class Knob:
    """One searched number: `applies(recipe)`, `draw(trial, recipe, max_epochs)` -> value,
    `change(recipe, value)` -> the Recipe fields it sets."""

    applies: Callable[[Recipe], bool]
    draw: Callable
    change: Callable[[Recipe, object], dict]


def _scaled(lrs: dict | None, factor: float, groups=None) -> dict | None:
    return None if lrs is None else {g: lr * factor if groups is None or g in groups else lr for g, lr in lrs.items()}


def _has(name: str) -> Callable[[Recipe], bool]:
    """A knob for a Recipe field that may not exist yet: active once it does."""
    return lambda r: name in {f.name for f in dataclasses.fields(r)}


SPACE: dict[str, Knob] = {
    # every rate times one factor, log-uniform: a rate matters by its order of magnitude
    "lr_scale": Knob(lambda r: True, lambda t, r, m: t.suggest_float("lr_scale", 0.1, 10.0, log=True),
                     lambda r, v: {"lrs": _scaled(r.lrs, v), "first_lrs": _scaled(r.first_lrs, v)}),
    # discriminative rates: how much gentler than the head the body and neck train (1 = the recipe's ratio)
    "body_factor": Knob(lambda r: "head" in r.lrs and len(r.lrs) > 1,
                        lambda t, r, m: t.suggest_float("body_factor", 0.2, 5.0, log=True),
                        lambda r, v: {"lrs": _scaled(r.lrs, v, [g for g in r.lrs if g != "head"])}),
    "weight_decay": Knob(lambda r: r.weight_decay is not None,
                         lambda t, r, m: t.suggest_float("weight_decay", 1e-3, 0.3, log=True),
                         lambda r, v: {"weight_decay": v}),
    "train_epochs": Knob(lambda r: True, lambda t, r, m: t.suggest_int("train_epochs", r.first_epochs + 1,
                                                                       max(m, r.first_epochs + 1)),
                         lambda r, v: {"train_epochs": v}),
    "label_smoothing": Knob(lambda r: r.loss == "cross_entropy",
                            lambda t, r, m: t.suggest_float("label_smoothing", 0.0, 0.2),
                            lambda r, v: {"label_smoothing": v}),
    "augment": Knob(lambda r: True,
                    lambda t, r, m: t.suggest_categorical("augment", ["tutorial", "standard", "strong"]),
                    lambda r, v: {"augment": v}),
    "bn_policy": Knob(lambda r: True, lambda t, r, m: t.suggest_categorical("bn_policy", list(BN_POLICIES)),
                      lambda r, v: dict(zip(("frozen_bn_eval", "bn_eval"), BN_POLICIES[v]))),
    # searched once Recipe has these fields: the recipe's own value (off) or another. A run here takes
    # about 100 optimizer steps, so the averages remember the last 10 or 50 steps (tl/engine/averaging.py)
    "ema_decay": Knob(_has("ema_decay"), lambda t, r, m: t.suggest_categorical(
        "ema_decay", list(dict.fromkeys([r.ema_decay, 0.9, 0.98]))), lambda r, v: {"ema_decay": v}),
    "tta": Knob(_has("tta"), lambda t, r, m: t.suggest_categorical("tta", [False, True]), lambda r, v: {"tta": v}),
}


def suggest(trial, recipe: Recipe, max_epochs: int) -> dict:
    """The Recipe fields of one trial: each knob that applies to `recipe`, drawn by `trial`.
    Knobs that set the same field (the two rate knobs) act one after the other."""
    changes: dict = {}
    for knob in SPACE.values():
        if knob.applies(recipe):
            value = knob.draw(trial, recipe, max_epochs)
            changes |= knob.change(dataclasses.replace(recipe, **changes), value)
    return changes


def make_storage(path: Path):
    """Optuna's study database: SQLite at `path`, with heartbeats. A running trial beats every
    HEARTBEAT_S seconds; one silent for GRACE_S (its process was killed) is marked failed when
    the next trial starts, and RetryHeartbeatStaleTrialCallback queues its numbers again."""
    import optuna

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # both are marked experimental in Optuna 5.0
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            f"sqlite:///{path}", heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES))


def open_study(path: Path, name: str, setup: dict, seed: int, startup: int = 5):
    """The study `name` in the file at `path`, created or continued (`load_if_exists`).

    `setup` (recipe, data set and its fingerprint, backbone, inner split, ...) is stored in
    the study's user_attrs; a file that holds a study of another recipe or data set, or a
    study of this name with another setup, is refused: its trials answer another question.
    TPE (seeded) proposes the numbers; the median pruner stops a trial whose inner val accuracy
    after an epoch is below the median of earlier trials at that epoch."""
    import optuna

    storage = make_storage(path)
    for other in optuna.get_all_study_summaries(storage):
        theirs = other.user_attrs.get("setup", {})
        keys = ("recipe", "dataset", "data_fingerprint") if other.study_name != name else setup
        if differ := [k for k in keys if theirs.get(k) != setup.get(k)]:
            raise TLError(f"{path} holds study {other.study_name!r} with another "
                          f"{', '.join(f'{k} ({theirs.get(k)} vs {setup.get(k)})' for k in differ)}: "
                          f"choose another --storage (or --study-name)")
    study = optuna.create_study(
        storage=storage, study_name=name, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=2))
    if "setup" not in study.user_attrs:
        study.set_user_attr("setup", setup)
    return study


def tuned_recipe(base: Recipe, path: Path) -> Recipe:
    """The recipe a tuned file (experiments/tune.py) describes: `base` with the chosen fields
    replaced, named tuned_<base>."""
    try:
        tuned = json.loads(Path(path).read_text())
        fields = tuned["recipe_fields"]
        if tuned["recipe"] != base.name:
            raise TLError(f"{path} holds numbers tuned for {tuned['recipe']}, not {base.name}")
        return dataclasses.replace(
            base, **fields, name=f"tuned_{base.name}",
            source=f"{base.source}; numbers tuned on an inner val of {tuned['dataset']} ({path.name})",
            strategy=f"{base.strategy}; tuned: " + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in tuned["params"].items()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TLError(f"{path} is not a tuned file of experiments/tune.py ({type(exc).__name__}: {exc})") from None
