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
import random
import sqlite3
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tl import TLError
from tl.engine import folders
from tl.engine.schema import RECIPE, TUNED, TUNED_RULES, SchemaError, check, loads, problems
from tl.recipe import Recipe

HEARTBEAT_S, GRACE_S = 60, 180  # a trial silent for 3 minutes was lost (tl/engine/trials.py LostTrials)
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


def storage_arg(value: str) -> Path | str:
    """--storage as given: a database URL (it has "://"; a sqlite:/// URL is its file's path),
    or the path of a SQLite file."""
    if "://" not in value:
        return Path(value)
    if value.startswith("sqlite:///") and value != "sqlite:///:memory:":
        from sqlalchemy.engine import make_url

        return Path(make_url(value).database)
    return value


def shown_storage(storage: Path | str, cache: Path | None = None) -> str:
    """`storage` as messages show it (a URL's password hidden, or left out of its options),
    and, given the cache folder, as a tuned file records it: a URL without its password and
    without its options (`?host=...` may name a folder of this machine), a SQLite file by
    `recorded_path`."""
    if isinstance(storage, Path):
        return str(storage) if cache is None else recorded_path(storage, cache)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy can read (a port that is no number): none of it shown
        return storage.split("://", 1)[0] + "://..."
    options = {} if cache is not None else {k: v for k, v in url.query.items() if "pass" not in k.lower()}
    return url.set(query=options).render_as_string(hide_password=True)


def database_url(storage: str) -> str:
    """A server database's URL as SQLAlchemy opens it: postgresql:// without a driver gets the
    PostgreSQL driver that is installed (SQLAlchemy's default differs between its versions)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except (ArgumentError, ValueError):
        raise TLError(f"--storage {shown_storage(storage)} is not a database URL (such as "
                      f"postgresql://user:password@host:5432/database; a password's @ : / # ? % are "
                      f"percent-encoded, @ as %40) or a SQLite file's path") from None
    if url.drivername == "postgresql":
        import importlib.util

        driver = next((d for d in ("psycopg", "psycopg2") if importlib.util.find_spec(d)), None)
        if driver is None:
            raise TLError(f"--storage {shown_storage(storage)}: no PostgreSQL driver is installed: "
                          f"pip install psycopg2-binary (or psycopg[binary])")
        url = url.set(drivername=f"postgresql+{driver}")
    return url.render_as_string(hide_password=False)


def make_storage(storage: Path | str):
    """Optuna's study database, with heartbeats: a SQLite file at a path (the processes of one
    machine share it), or a server database's URL (PostgreSQL: several machines share it).
    A running trial beats every HEARTBEAT_S seconds; one silent for GRACE_S (its process or
    machine stopped) is failed when a trial starts, by Optuna, which hands it to
    tl.engine.trials.LostTrials (storage.heartbeat_stale_trial_callback)."""
    import optuna
    from sqlalchemy.engine import URL
    from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError

    from tl.engine.trials import LostTrials

    new = isinstance(storage, Path) and not storage.exists()
    if isinstance(storage, Path):
        check_storage_file(storage)
        # the path as a URL's database part, quoted: a "?" or "#" in it would otherwise start the URL's query
        url = URL.create("sqlite", database=str(storage)).render_as_string(hide_password=False)
        lost, what = LostTrials(study_lock(storage), GRACE_S), "SQLite cannot use it"
    else:
        url, lost, what = database_url(storage), LostTrials(grace_s=GRACE_S), "the database cannot be used"
    try:
        for attempt in range(4):
            try:
                with warnings.catch_warnings():  # both are marked experimental in Optuna 5.0
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                                      heartbeat_stale_trial_callback=lost)
            except (IntegrityError, ProgrammingError):  # processes creating a new database's tables at once
                if attempt == 3:  # clash (PostgreSQL: "duplicate key"); tried again, they find them made
                    raise
                time.sleep(0.2 + random.random())
    except SQLAlchemyError as exc:  # a locked, read-only or damaged file; a server that refuses or is not there
        if new:  # SQLite made the file, then failed (a full disk) before the study's tables were all there:
            for made in (storage, storage.with_name(storage.name + "-journal")):  # a failure leaves nothing behind
                made.unlink(missing_ok=True)
        said = str(getattr(exc, "orig", None) or exc).splitlines()[0][:120]  # an unknown dialect's has no .orig
        free = "free some space or " if "disk is full" in said else ""
        raise TLError(f"--storage {shown_storage(storage)}: {what} ({said}); {free}choose another --storage") from None
    except ImportError as exc:  # a URL that names a driver which is not installed
        raise TLError(f"--storage {shown_storage(storage)}: its database driver {exc.name} is not installed "
                      f"(pip install it, or name another driver in the URL)") from None


def lost_trials(study):
    """The tl.engine.trials.LostTrials of `study`'s storage (make_storage gave it to Optuna)."""
    return study._storage.get_heartbeat_stale_trial_callback()  # Optuna keeps the storage as _storage


def study_lock(path: Path):
    """The lock of a SQLite study's lost-trial bookkeeping (tl/engine/trials.py): a lock file
    beside the study, .<name>.lock, held by one process at a time (tl/engine/folder_lock.py)."""
    from tl.engine.folder_lock import hold

    return lambda: hold(path.parent, f".{path.name}.lock", wait=True, log=lambda line: None)


SQLITE_MAGIC = b"SQLite format 3\x00"


# the tables of an Optuna study file (optuna.storages._rdb.models), alembic's from older Optuna versions
OPTUNA_TABLES = {"studies", "study_directions", "study_system_attributes", "study_user_attributes",
                 "trial_heartbeats", "trial_intermediate_values", "trial_params", "trial_system_attributes",
                 "trial_user_attributes", "trial_values", "trials", "version_info", "alembic_version"}


def _optuna_tables(tables: dict[str, set[str]]) -> bool:
    """True when every table of the file is one of Optuna's, with Optuna's columns (a study file,
    or one whose creation was interrupted: Optuna creates its tables in several commits and
    completes them when the study is opened again); False for another program's file."""
    from optuna.storages._rdb import models

    known = {name: {c.name for c in t.columns} for name, t in models.BaseModel.metadata.tables.items()}
    return all(name == "alembic_version" or known.get(name) == columns for name, columns in tables.items())


def check_storage_file(path: Path) -> None:
    """Stop unless `path` is a SQLite file or can become one: not a folder, not another kind of
    file (which SQLite would refuse, or a user would not want overwritten), in a folder that can be made;
    an existing study file is read whole (SQLite's quick_check) and refused, untouched, where damaged."""
    if path.is_dir():
        raise TLError(f"--storage {path} is a folder: name the study's SQLite file, e.g. {path / 'study.db'}")
    if file := next((p for p in path.parents if p.exists() and not p.is_dir()), None):
        raise TLError(f"--storage {path}: {file} is a file, not a folder; choose another --storage")
    try:
        folders.make(path.parent)
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
    if head:  # a SQLite file: Optuna's, or one without tables; another program's is kept
        try:
            with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
                tables = {row[0]: {c[1] for c in db.execute(f"PRAGMA table_info('{row[0]}')")}
                          for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                # every page read once (a damaged page that the table list does not touch): before a search writes
                found = [line for row in db.execute("PRAGMA quick_check") for line in row[0].splitlines()
                         if line != "ok" and not line.startswith("*** in database")]
        except sqlite3.Error as exc:
            raise TLError(f"--storage {path}: SQLite cannot read it ({exc}); it is left as it is: repair it "
                          f"(sqlite3's .recover) or choose another --storage") from None
        if found:
            raise TLError(f"--storage {path} is damaged (SQLite's quick_check: {'; '.join(found[:2])[:160]}); it is "
                          f"left as it is: repair it (sqlite3's .recover) or choose another --storage")
        if not _optuna_tables(tables):  # only Optuna's tables, some perhaps still missing: a study file
            raise TLError(f"--storage {path} is a SQLite file of another program (tables "
                          f"{', '.join(sorted(tables)[:4])}), not an Optuna study: it is left as it is; "
                          f"choose another --storage")


STORAGE_MODULES = ("sqlalchemy", "sqlite3", "_sqlite3", "psycopg2", "psycopg")  # the database's own errors' modules


def storage_failure(exc: BaseException | None) -> BaseException | None:
    """The study database's own error in `exc`'s chain (__cause__ / __context__), or None: a
    library that fails on top of it (Optuna's AssertionError "Should not reach.", an
    UnboundLocalError in its cleanup) is the database's failure all the same."""
    import optuna

    seen, found = set(), None
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, optuna.exceptions.StorageInternalError) \
                or type(exc).__module__.split(".")[0] in STORAGE_MODULES:
            found = getattr(exc, "orig", None) or exc  # the deepest: the driver's own words, plainest
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return found


@contextlib.contextmanager
def storage_errors(storage: Path | str):
    """A study database that fails while a search uses it (a full disk, a read-only file, a
    damaged page, a server that went away), whatever a library raises on top of it, is one
    TLError naming it and saying what failed, never a library traceback; the file is left as
    it is. A TLError is said as it is. The same failure in another thread (Optuna's heartbeat
    thread) prints no traceback there: the search's own next use of the database says it."""
    import threading

    hook = threading.excepthook
    threading.excepthook = lambda failed: None if storage_failure(failed.exc_value) else hook(failed)
    try:
        yield
    except TLError:
        raise
    except Exception as exc:
        if (found := storage_failure(exc)) is None:
            raise
        why = (str(found).splitlines() or [type(found).__name__])[0][:160]
        raise TLError(f"--storage {shown_storage(storage)}: the study database failed ({why}); {_advice(why)}") \
            from None
    finally:
        threading.excepthook = hook


def _advice(why: str) -> str:
    """What to do about a study database's failure, by what its message says."""
    lowered = why.lower()
    if "full" in lowered or "no space" in lowered:
        return "free some space (the finished trials are kept), or choose another --storage"
    if "readonly" in lowered or "read-only" in lowered:
        return "make it writable, or choose another --storage"
    if "malformed" in lowered or "not a database" in lowered:
        return "it is left as it is: repair it (sqlite3's .recover), or choose another --storage"
    return "it is left as it is: run the same command again once the database works, or choose another --storage"


MEDIAN_OF = 3  # completed trials at an epoch before the pruner compares with their median


def open_study(storage: Path | str, name: str, setup: dict, seed: int, startup: int = 5):
    """The study `name` in `storage` (a SQLite file's path or a database URL), created or
    continued (`load_if_exists`): a search run again, or run by several workers at once.

    `setup` (recipe, data set and its fingerprint, backbone, inner split, ...) is stored in
    the study's user_attrs; a storage that holds a study of another recipe or data set, or a
    study of this name with another setup, is refused: its trials answer another question.
    TPE proposes the numbers, from a random stream per trial (tl/engine/trials.py
    TrialSampler: seeded by `seed` and the trial's number); the median pruner stops a trial
    whose best inner val accuracy so far is below the median of the completed trials at that
    epoch, once MEDIAN_OF trials reached it (a late epoch of a long schedule is otherwise
    judged against one other trial, a one-image difference on a small inner val). Trials
    left running by a process of this host that is gone are failed now, and their numbers
    queued once more (tl/engine/trials.py LostTrials)."""
    import optuna

    from tl.engine.trials import TrialSampler

    db = make_storage(storage)
    for other in optuna.get_all_study_summaries(db):
        if (theirs := other.user_attrs.get("setup")) is None:
            continue  # created by another process this moment, which stores its setup next
        keys = ("recipe", "dataset", "data_fingerprint") if other.study_name != name else setup
        if differ := [k for k in keys if theirs.get(k) != setup.get(k)]:
            raise TLError(f"{shown_storage(storage)} holds study {other.study_name!r} with another "
                          f"{', '.join(f'{k} ({theirs.get(k)} vs {setup.get(k)})' for k in differ)}: "
                          f"choose another --storage (or --study-name)")
    study = optuna.create_study(
        storage=db, study_name=name, direction="maximize", load_if_exists=True, sampler=TrialSampler(seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=2, n_min_trials=MEDIAN_OF))
    if "setup" not in study.user_attrs:
        study.set_user_attr("setup", setup)
    lost_trials(study).sweep(study)
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
    file may not set, one out of the schema's bounds (tl/engine/schema.py RECIPE), or fields that do
    not fit one another, the recipe's own counted where the file leaves them (TUNED_RULES); and rates
    that are not {group: rate} for exactly the groups of `base`'s own rates: a search scales the
    recipe's rates and keeps their groups, and the recipe's build gives each of those groups its
    parameters (a group left out would leave its parameters without a rate)."""
    allowed = {f.name: RECIPE[f.name] for f in dataclasses.fields(base) if f.name not in NOT_TUNED}
    found = problems(fields, allowed, "recipe_fields.", unknown="is not a field a tuned file may set",
                     rules=TUNED_RULES, given=dataclasses.asdict(base))  # fields the file leaves are the recipe's
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
    replaced and the backbone they were tuned with, named tuned_<base>."""
    try:
        tuned = check(loads(Path(path).read_text()), TUNED, f"{path}: ", EDITED)
        fields = tuned["recipe_fields"]
        if tuned["recipe"] != base.name:
            raise TLError(f"{path} holds numbers tuned for {tuned['recipe']}, not {base.name}")
        if found := fields_problems(base, fields):
            raise SchemaError([f"{path}: {line}{EDITED}" for line in found])
        if fields.get("backbone", tuned["backbone"]) != tuned["backbone"]:
            raise TLError(f"{path} says backbone {tuned['backbone']} and recipe_fields.backbone "
                          f"{fields['backbone']}{EDITED}")
        return dataclasses.replace(
            base, **(fields | {"backbone": tuned["backbone"]}), name=f"tuned_{base.name}",
            source=f"{base.source}; numbers tuned on an inner val of {tuned['dataset']} with {tuned['backbone']} "
                   f"({path.name})",
            strategy=f"{base.strategy}; tuned: " + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in tuned["params"].items()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TLError(f"{path} is not a tuned file of experiments/tune.py ({type(exc).__name__}: {exc})") from None
