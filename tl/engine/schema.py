"""The files a person may edit and the project reads back, checked against one declared schema.

Three kinds of file are written by this project, read back by it, and open to a text editor:

    tuned file     experiments/tuned/<recipe>-<data set>-<backbone>.json: experiments/tune.py writes it,
                   the recipe tuned_<recipe> reads it (tl/engine/tuning.py)
    config.json    a run's configuration: --evaluate, --predict, --explain and --export read
                   it (tl/engine/model_loading.py); --resume reads the copy in last.ckpt
    description    an exported model's own description ("tl_meta", tl/engine/export.py),
                   which --predict --checkpoint model.onnx reads

Every value there has a type and bounds, declared once below: RECIPE (a recipe's numbers),
OPTIONS (a run's options), CONFIG, TUNED and DESCRIPTION (the three files). `problems` lists
every field that is missing, of another type or out of its bounds, one line each naming the
field, the value and the bound; `check` raises them as one SchemaError, which main.py and every
study print as one `error:` line per violation, with exit status 2. The bounds are those of a
sensible run (a run of 10^9 epochs never ends) and, for what a run writes, no narrower than
the command line's (main.py takes its bounds from OPTIONS), so every file a run writes reads
back: a tuned file's learning rates lie in (0, 1], while a run's config.json records the
rates its --lr-scale gave; a description's mean and std are of pixels scaled to [0, 1].

Fields of one object that must fit one another are declared here too, as Rules: RECIPE_RULES
(first_epochs with first_lrs, label smoothing with the loss), TUNED_RULES (those, and a first
stage shorter than the whole), OPTION_RULES (inner_fold below folds); each broken rule is one
line naming the fields and their values. What needs more than the file (a tuned file's rates
name the recipe's groups; a description's classes fit the model's outputs) is for the code
that reads it to say.

This module imports neither torch nor numpy: main.py takes its option bounds from here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tl import TLError


def loads(text: str):
    """`json.loads` for a file a person may edit: every way the text is not a JSON value this
    process can hold (bad syntax, nesting deeper than Python's parser goes) is a ValueError,
    as a file that is not UTF-8 already is when read."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to read") from None


class SchemaError(TLError):
    """Fields out of their schema: one line per violation (each printed as its own `error:` line)."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\nerror: ".join(lines))


@dataclass(frozen=True)
class Field:
    """One field: its kind, bounds and whether it may be missing or null.

    kind: "whole" (int), "number" (int or float, finite), "bool", "text" (str), "texts" (a
    list of distinct non-empty names), "numbers" (a list of `count` numbers), "table" (an
    object {name: number}), "digests" (an object {name: str}), "object" (an object of `fields`).
    Numbers lie in [low, high], with `open_low` / `open_high` leaving that end out; for
    "texts", low is the least count. `says` replaces the generated description of the bound."""

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    null: bool = False
    required: bool = False
    choices: tuple = ()
    count: int | None = None
    what: str = ""
    says: str = ""
    fields: Mapping[str, Field] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()  # of an "object": how its fields must fit one another

    def bound(self) -> str:
        """What the field must be, in words: "a whole number >= 1 and <= 10000", "true or false"."""
        if self.says:
            text = self.says
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "text":
            text = "one of " + ", ".join(self.choices) if self.choices else "a text"
        elif self.kind == "texts":
            text = f"a list of {self.low or 1} or more distinct names"
        elif self.kind == "digests":
            text = "an object of file names and their digests"
        elif self.kind == "object":
            text = "an object"
        else:
            text = f"{self.what or _NOUN[self.kind]}{self._range()}"
        return text + (", or null" if self.null else "")

    def _range(self) -> str:
        low = "" if self.low is None else f" {'>' if self.open_low else '>='} {_number(self.low)}"
        high = "" if self.high is None else f" {'<' if self.open_high else '<='} {_number(self.high)}"
        if self.kind in ("table", "numbers"):
            return " (each" + low + (" and" if low and high else "") + high + ")" if low or high else ""
        return low + (" and" if low and high else "") + high

    def fits(self, value) -> bool:
        """Whether `value` is of this field's kind and within its bounds (not its sub-fields)."""
        if value is None:
            return self.null
        if self.kind == "whole":
            return _is_number(value) and isinstance(value, int) and self._within(value)
        if self.kind == "number":
            return _is_number(value) and self._within(value)
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "text":
            return isinstance(value, str) and (not self.choices or value in self.choices)
        if self.kind == "texts":
            names = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            return names and len(value) >= (self.low or 1) and len(set(value)) == len(value)
        if self.kind == "numbers":
            return (isinstance(value, list) and len(value) == self.count
                    and all(_is_number(v) and self._within(v) for v in value))
        if self.kind == "table":
            return (isinstance(value, dict) and bool(value)
                    and all(isinstance(k, str) and _is_number(v) and self._within(v) for k, v in value.items()))
        if self.kind == "digests":
            return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        return isinstance(value, dict)  # "object"

    def _within(self, x) -> bool:
        low_ok = self.low is None or (x > self.low if self.open_low else x >= self.low)
        high_ok = self.high is None or (x < self.high if self.open_high else x <= self.high)
        return low_ok and high_ok


@dataclass(frozen=True)
class Rule:
    """Fields of one object that must fit one another, each already within its own bounds:
    `holds(values)` on {name: value} of `names`; `says` is what must hold, in words."""

    names: tuple[str, ...]
    holds: Callable[[dict], bool]
    says: str


_NOUN = {"whole": "a whole number", "number": "a number", "numbers": "a list of numbers", "table": "a table of numbers"}
_TYPES = {"whole": int, "number": (int, float), "bool": bool, "text": str, "texts": list, "numbers": list,
          "table": dict, "digests": dict, "object": dict}


def _number(x: float) -> str:
    """A bound as written: 4294967295, 0.5, 1e-08."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _shown(value) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _wrong_type(f: Field, value) -> bool:
    """A value of another JSON type than the field's (a string where a number belongs)."""
    if value is None:
        return False
    if f.kind in ("whole", "number"):
        return not _is_number(value)
    if f.kind == "bool":
        return not isinstance(value, bool)
    return not isinstance(value, _TYPES[f.kind])


def problems(obj, fields: Mapping[str, Field], prefix: str = "", unknown: str | None = None,
             rules: tuple[Rule, ...] = (), given: Mapping | None = None) -> list[str]:
    """Every violation of `fields` in the object `obj`, one line each: `NAME is missing (...)`,
    `NAME is str "3", which is not a whole number >= 1 and <= 10000`, `NAME = 0 is not ...`.
    With `unknown` (what to say), a field that is not declared is a violation too. Then each of
    `rules` whose fields are all within bounds: `A = 3 and B = 2 do not fit: A must be ...`;
    `given` holds values for fields `obj` leaves out (a tuned file's recipe), and a rule is the
    object's only where it sets one of the rule's fields."""
    if not isinstance(obj, dict):
        return [f"{prefix.rstrip('.') or 'the file'} is a JSON {type(obj).__name__}, not an object"]
    found = _field_problems(obj, fields, prefix, unknown)
    return found + _rule_problems(obj, rules, prefix, given or {}, bad={line.split()[0] for line in found})


def _rule_problems(obj: dict, rules: tuple[Rule, ...], prefix: str, given: Mapping, bad: set) -> list[str]:
    found = []
    for rule in rules:
        if (not any(n in obj for n in rule.names) or not all(n in obj or n in given for n in rule.names)
                or any(prefix + n in bad for n in rule.names)):
            continue  # a rule of fields the object leaves out, or of one already out of its bounds
        values = {n: obj[n] if n in obj else given[n] for n in rule.names}
        if not rule.holds(values):
            shown = " and ".join(f"{prefix}{n} = {_shown(v)}" + ("" if n in obj else " (the recipe's)")
                                 for n, v in values.items())
            found.append(f"{shown} do not fit: {rule.says}")
    return found


def _field_problems(obj: dict, fields: Mapping[str, Field], prefix: str, unknown: str | None) -> list[str]:
    found = []
    for name, f in fields.items():
        where = prefix + name
        if name not in obj:
            if f.required:
                found.append(f"{where} is missing (it must be {f.bound()})")
            continue
        value = obj[name]
        if _wrong_type(f, value):
            found.append(f"{where} is {type(value).__name__} {_shown(value)}, which is not {f.bound()}")
        elif not f.fits(value):
            verb = "is none of " + ", ".join(f.choices) if f.choices else f"is not {f.bound()}"
            found.append(f"{where} = {_shown(value)} {verb}")
        elif f.kind == "object" and f.fields:
            found += problems(value, f.fields, where + ".", rules=f.rules)
    if unknown is not None:
        found += [f"{prefix}{name} = {_shown(obj[name])} {unknown}" for name in obj if name not in fields]
    return found


def check(obj, fields: Mapping[str, Field], head: str, tail: str = "", unknown: str | None = None,
          rules: tuple[Rule, ...] = ()):
    """`obj` if it fits `fields` and `rules`; else a SchemaError of one line per violation, each
    `head` + the violation + `tail` (`head` names the file)."""
    if found := problems(obj, fields, unknown=unknown, rules=rules):
        raise SchemaError([f"{head}{line}{tail}" for line in found])
    return obj


# ----------------------------------------------------------------------------- the declarations
# A tuned learning rate: above 0, at most 1 (no rate of SGD or Adam above 1 trains; the recipes'
# are at most 3e-3, and a search scales them by at most 10, and the body's by 5 more).
RATE = dict(low=0, high=1, open_low=True)
EPOCHS = Field("whole", 1, 10_000)  # 10^4 epochs of even 10 images is days of CPU
BATCH = Field("whole", 1, 65_536)
SIZE_LOW, SIZE_HIGH = 8, 4096  # image sides, in pixels (the command line asks 16 or more)
IMAGE_SIZE = Field("whole", SIZE_LOW, SIZE_HIGH, null=True)
COUNT = Field("whole", 1, 10**9, null=True)  # images per class
SEED = Field("whole", 0, 2**32 - 1)  # NumPy's legacy seeding takes 32 bits
FRACTION = Field("number", 0, 1, open_low=True, open_high=True, null=True)

RECIPE: dict[str, Field] = {  # tl/recipe.py's Recipe
    "name": Field("text"), "source": Field("text"), "strategy": Field("text"),
    "backbone": Field("text"), "weights": Field("text"),
    "lrs": Field("table", **RATE, says="a table of positive learning rates (each <= 1)"),
    "train_epochs": EPOCHS, "batch_size": BATCH,
    "frozen_bn_eval": Field("bool"), "bn_eval": Field("bool"), "stack_head": Field("bool"), "tta": Field("bool"),
    "loss": Field("text", choices=("cross_entropy", "bce_logit")),
    "weight_decay": Field("number", 0, 1, null=True, what="a weight decay"),
    "label_smoothing": Field("number", 0, 1, open_high=True, what="a label smoothing"),
    "augment": Field("text", choices=("standard", "tutorial", "strong")),  # tl/data.py AUGMENT_POLICIES
    "first_epochs": Field("whole", 0, 10_000),
    "first_lrs": Field("table", **RATE, null=True, says="a table of positive learning rates (each <= 1)"),
    "ema_decay": Field("number", 0, 1, open_high=True, says="a decay in (0, 1) (or 0: off)"),  # ema.check_decay
}
RECIPE_RULES = (  # how a recipe's fields fit one another (tl/recipe.py, tl/stages.py)
    Rule(("first_epochs", "first_lrs"), lambda v: (v["first_epochs"] == 0) == (v["first_lrs"] is None),
         "a staged recipe has first_epochs above 0 and first_lrs, one in one stage first_epochs 0 and first_lrs "
         "null"),
    Rule(("loss", "label_smoothing"), lambda v: v["loss"] == "cross_entropy" or v["label_smoothing"] == 0,
         "label smoothing applies to cross_entropy only (bce_logit would ignore it): 0 with bce_logit"),
)
# A tuned file's recipe trains every stage: its first stage leaves the next at least one epoch. (A
# run's config.json may not: --epochs 1 cuts the first stage short and drops the next one.)
TUNED_RULES = RECIPE_RULES + (
    Rule(("first_epochs", "train_epochs"), lambda v: v["first_epochs"] < v["train_epochs"],
         "first_epochs (the first stage) must be fewer than train_epochs (all stages)"),
)
OPTIONS: dict[str, Field] = {  # tl/engine/options.py's RunOptions, as config.json holds them
    "data": Field("text", null=True), "out": Field("text"), "run_name": Field("text", null=True),
    "device": Field("text"), "backbone": Field("text", null=True), "weights": Field("text", null=True),
    "epochs": Field("whole", 1, 10_000, null=True), "batch_size": Field("whole", 1, 65_536, null=True),
    "lr_scale": Field("number", 0, open_low=True), "seed": SEED, "split_seed": SEED,
    "workers": Field("whole", 0, 1024), "image_size": IMAGE_SIZE, "max_per_class": COUNT, "train_per_class": COUNT,
    "train_fraction": Field("table", 0, 1, open_low=True, null=True, what="a table of fractions"),
    "val_split": FRACTION, "inner_val": FRACTION, "folds": Field("whole", 2, 1000, null=True),
    "inner_fold": Field("whole", 0, 999), "cache_views": Field("whole", 0, 1000),
    "cache_limit_gb": Field("number", 0, 10**6, open_low=True), "patience": Field("whole", 1, 10_000, null=True),
    "monitor": Field("text", choices=("acc", "loss")), "class_weights": Field("text", choices=("auto",), null=True),
    "ema": Field("number", 0, 1, open_high=True, null=True, says="a decay in (0, 1) (or 0: off)"),
    **{name: Field("bool") for name in (
        "verify_images", "follow_links", "augment", "save_every_epoch", "amp", "feature_cache", "image_cache",
        "device_images", "compile", "informative_names", "plots", "allow_pickle", "progress", "sync_bn",
        "balanced_sampler", "tensorboard")},
    "channels_last": Field("bool", null=True), "tta": Field("bool", null=True),
}
OPTION_RULES = (  # how a run's options fit one another (tl/engine/selection.py)
    Rule(("folds", "inner_fold"), lambda v: v["folds"] is None or v["inner_fold"] < v["folds"],
         "inner_fold must be below folds (folds are counted from 0)"),
)
RATES_RUN = Field("table", 0, open_low=True, null=True, says="a table of positive learning rates")
CONFIG: dict[str, Field] = {  # a run's config.json (tl/engine/run_folder.py writes it): its rates are --lr-scale's
    "recipe": Field("object", required=True, rules=RECIPE_RULES,
                    fields=RECIPE | {"backbone": Field("text", required=True), "lrs": RATES_RUN,
                                     "first_lrs": RATES_RUN}),
    "options": Field("object", required=True, fields=OPTIONS, rules=OPTION_RULES),
    "classes": Field("texts", 2, required=True), "checksums": Field("digests"),  # a classifier tells 2 or more apart
}
TUNED: dict[str, Field] = {  # experiments/tuned/*.json (experiments/tune.py writes it)
    "recipe": Field("text", required=True), "dataset": Field("text", required=True),
    "backbone": Field("text", required=True), "params": Field("object", required=True),
    "recipe_fields": Field("object", required=True),
}
DESCRIPTION: dict[str, Field] = {  # an exported model's tl_meta (tl/engine/export.py `describe` writes it)
    "format": Field("text", required=True), "classes": Field("texts", 2, required=True),
    "backbone": Field("text", required=True), "image_size": Field("whole", SIZE_LOW, SIZE_HIGH, required=True),
    "resize": Field("whole", SIZE_LOW, round(SIZE_HIGH * 256 / 224), required=True),  # tl/data.py val_resize
    # images are scaled to [0, 1] before normalising: a channel's mean lies in [0, 1], its spread in (0, 1]
    "mean": Field("numbers", 0, 1, count=3, required=True, what="3 numbers (R, G, B)"),
    "std": Field("numbers", 0, 1, open_low=True, count=3, required=True, what="3 numbers (R, G, B)"),
    "single_logit": Field("bool", required=True),
}
