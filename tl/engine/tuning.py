"""The machinery of a search for a recipe's numbers (experiments/tune.py): what is searched,
where the study lives, and the tuned file a search leaves behind.

SPACE is the search space as a table: one row per number, saying when the recipe has it,
how Optuna draws it, and which Recipe fields it changes. A new Recipe field becomes
searchable by adding one row. Optuna is imported only where a search runs, so reading a
tuned file (`tuned_recipe`) needs none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tl import TLError
from tl.engine.schema import RECIPE, TUNED, SchemaError, check, problems
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
    # about 100 optimizer steps, so the averages remember the last 10 or 50 steps (tl/engine/ema.py)
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
    from sqlalchemy.engine import URL
    from sqlalchemy.exc import SQLAlchemyError

    check_storage_file(path)
    # the path as a URL's database part, quoted: a "?" or "#" in it would otherwise start the URL's query
    url = URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)
    try:
        with warnings.catch_warnings():  # both are marked experimental in Optuna 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES))
    except SQLAlchemyError as exc:  # a locked, read-only or damaged database
        raise TLError(f"--storage {path}: SQLite cannot use it ({str(exc.orig or exc).splitlines()[0][:120]}); "
                      f"choose another --storage") from None


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_storage_file(path: Path) -> None:
    """Stop unless `path` is a SQLite file or can become one: not a folder, not another kind of
    file (which SQLite would refuse, or a user would not want overwritten), in a folder that can be made."""
    if path.is_dir():
        raise TLError(f"--storage {path} is a folder: name the study's SQLite file, e.g. {path / 'study.db'}")
    if file := next((p for p in path.parents if p.exists() and not p.is_dir()), None):
        raise TLError(f"--storage {path}: {file} is a file, not a folder; choose another --storage")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        head = None  # a new study file: SQLite creates it
    except OSError as exc:
        raise TLError(f"--storage {path}: {exc.strerror or exc} ({exc.filename or path}); "
                      f"choose another --storage") from None
    if head and head != SQLITE_MAGIC:
        raise TLError(f"--storage {path} is not a SQLite file (it starts with {head[:8]!r}): it is left as it is; "
                      f"choose another --storage")
    if head:  # a SQLite file: Optuna's (its table version_info), or one without tables; another program's is kept
        try:
            with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as exc:
            raise TLError(f"--storage {path}: SQLite cannot read it ({exc}); choose another --storage") from None
        if tables and "version_info" not in tables:
            raise TLError(f"--storage {path} is a SQLite file of another program (tables "
                          f"{', '.join(sorted(tables)[:4])}), not an Optuna study: it is left as it is; "
                          f"choose another --storage")


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


def recorded_path(path: Path, cache: Path) -> str:
    """`path` as a tuned file records it (tuned files are committed, so they name no machine's
    absolute path): under the cache folder as $TL_CACHE_DIR/..., under the working folder
    relative to it, else the file's name alone."""
    path = Path(path).resolve()
    for root, shown in ((Path(cache).resolve(), "$TL_CACHE_DIR/"), (Path.cwd().resolve(), "")):
        if path.is_relative_to(root):
            return shown + path.relative_to(root).as_posix()
    return path.name


# the tuned recipe's own, never a file's; stack_head too: the recipe's build is written for its own head
NOT_TUNED = ("name", "source", "strategy", "stack_head")
EDITED = "; the file was edited by hand or by another version: run python -m experiments.tune again"


def fields_problems(base: Recipe, fields: dict) -> list[str]:
    """Every way `fields` cannot be the Recipe fields of a tuned file for `base`: a field a tuned
    file may not set, or one out of the schema's bounds (tl/engine/schema.py RECIPE); and rates
    that are not {group: rate} for exactly the groups of `base`'s own rates: a search scales the
    recipe's rates and keeps their groups, and the recipe's build gives each of those groups its
    parameters (a group left out would leave its parameters without a rate)."""
    allowed = {f.name: RECIPE[f.name] for f in dataclasses.fields(base) if f.name not in NOT_TUNED}
    found = problems(fields, allowed, "recipe_fields.", unknown="is not a field a tuned file may set")
    for name in ("lrs", "first_lrs"):
        value, current = fields.get(name), getattr(base, name)
        if name not in fields or any(line.startswith(f"recipe_fields.{name} ") for line in found):
            continue
        if current is None and value is not None:  # a recipe in one stage has no first-stage rates
            found.append(f"recipe_fields.{name} = {json.dumps(value)} is not null (the recipe trains in one stage)")
        elif current is not None and (value is None or set(value) != set(current)):
            found.append(f"recipe_fields.{name} = {json.dumps(value)} is not a table of positive learning rates "
                         f"for the recipe's groups ({', '.join(current)})")
    return found


def tuned_recipe(base: Recipe, path: Path) -> Recipe:
    """The recipe a tuned file (experiments/tune.py) describes: `base` with the chosen fields
    replaced, named tuned_<base>."""
    try:
        tuned = check(json.loads(Path(path).read_text()), TUNED, f"{path}: ", EDITED)
        fields = tuned["recipe_fields"]
        if tuned["recipe"] != base.name:
            raise TLError(f"{path} holds numbers tuned for {tuned['recipe']}, not {base.name}")
        if found := fields_problems(base, fields):
            raise SchemaError([f"{path}: {line}{EDITED}" for line in found])
        return dataclasses.replace(
            base, **fields, name=f"tuned_{base.name}",
            source=f"{base.source}; numbers tuned on an inner val of {tuned['dataset']} ({path.name})",
            strategy=f"{base.strategy}; tuned: " + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in tuned["params"].items()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TLError(f"{path} is not a tuned file of experiments/tune.py ({type(exc).__name__}: {exc})") from None
