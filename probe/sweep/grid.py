"""Sweep grid files: the TOML axes and shared settings, checked before anything runs (see probe/sweep/__init__.py)."""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from probe.errors import ProbeError, SettingError
from probe.files import read_text
from probe.fit import config_fields
from probe.methods import get_method, method_config, option_names
from probe.runs import slug
from probe.spec import check_fallback

OPTIONS = tuple(option_names())  # the method options a grid may vary (init, reparam, ...), in the methods' order
AXES = ("model", "method", "length", *OPTIONS, "seed")
SETTING = ("model", "method", "length", *OPTIONS)  # what a summary row is; seeds and relations are averaged
# (the three above: as at import; the functions below also take the methods registered since)


def grid_options() -> tuple[str, ...]:
    """The method options a grid may vary (init, reparam, ...): those of the methods registered now, in their order."""
    return tuple(option_names())


def grid_axes() -> tuple[str, ...]:
    """The axes a grid may name: model, method, length, every method option registered now, seed."""
    return ("model", "method", "length", *grid_options(), "seed")


def setting_columns() -> tuple[str, ...]:
    """What a summary row is (seeds and relations are averaged): model, method, length and the options."""
    return ("model", "method", "length", *grid_options())
SHARED_KEYS = ("model", "template", "split", "vocab", "dtype", "control", "train", "fallback")  # must agree to resume a folder
NOT_APPLICABLE = "-"


@dataclass
class SweepGrid:
    """A sweep grid file, validated."""

    relations: list[str] | str
    axes: dict[str, list]
    model: str = "smollm2"
    template: str | None = None
    split: str | None = None  # the data's test split (test_34k for LAMA)
    vocab: str = "common"
    dtype: str = "bfloat16"
    control: str = "none"
    train: dict = field(default_factory=dict)
    fallback: str | None = None  # "manual": a cell below the manual prompt on dev keeps the manual prompt

    def shared(self) -> dict:
        return {k: getattr(self, k) for k in SHARED_KEYS}


def load_grid(path: str | Path) -> SweepGrid:
    """Read and check a grid file; any problem is a ProbeError naming the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise SettingError(f"sweep grid {path} not found")
    try:
        raw = tomllib.loads(read_text(path, "sweep grid", "a TOML grid file", error=SettingError))
    except tomllib.TOMLDecodeError as e:
        raise SettingError(f"{path}: not a valid TOML grid ({e})") from None
    known = {f.name for f in dataclasses.fields(SweepGrid)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SettingError(f"{path}: unknown key {unknown[0]!r}: expected {', '.join(sorted(known))}")
    if "relations" not in raw or "axes" not in raw:
        raise SettingError(f"{path}: a grid needs `relations` (a list of ids or \"all\") and an [axes] table")
    axes = raw["axes"]
    if not isinstance(axes, dict) or "method" not in axes:
        raise SettingError(f"{path}: [axes] must be a table with at least `method`")
    known_axes = grid_axes()
    for name, values in axes.items():
        if name not in known_axes:
            raise SettingError(f"{path}: unknown axis {name!r}: expected one of {', '.join(known_axes)}")
        if not isinstance(values, list) or not values:
            raise SettingError(f"{path}: axis {name!r} must be a non-empty list, got {values!r}")
    bad = [m for m in axes.get("model", []) if not isinstance(m, str) or not m]
    if bad:
        raise SettingError(f"{path}: axis 'model' takes model names or paths, got {bad[0]!r}")
    keys = [slug(m) for m in axes.get("model", [])]
    if len(set(keys)) < len(keys):
        raise SettingError(f"{path}: axis 'model' has two models named {next(k for k in keys if keys.count(k) > 1)!r}: "
                           "their cells would share keys; copy or link one under another name")
    for name in ("length", "seed"):
        bad = [v for v in axes.get(name, []) if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "length" else 0)]
        if bad:
            raise SettingError(f"{path}: axis {name!r} takes whole numbers{' >= 1' if name == 'length' else ''}, got {bad[0]!r}")
    grid = SweepGrid(**raw)
    try:
        check_fallback(grid.fallback)
    except ProbeError as e:
        raise SettingError(f"{path}: {str(e).replace('--fallback', 'fallback')}") from None
    if not (grid.relations == "all" or (isinstance(grid.relations, list) and grid.relations)):
        raise SettingError(f"{path}: relations must be \"all\" or a non-empty list of ids, got {grid.relations!r}")
    expand_settings(grid, path)  # every axis value must exist for some method
    methods = [get_method(m) for m in grid.axes["method"]]
    if grid.dtype != "float32" and any(m.trains_lm for m in methods):
        raise SettingError(f"{path}: {', '.join(m.name for m in methods if m.trains_lm)} trains the LM's weights, in float32: "
                           f"set dtype = \"float32\" (the grid has {grid.dtype!r})")
    fields = set().union(*(config_fields(m.fit_config_class) for m in methods)) - {"seed"}
    if not isinstance(grid.train, dict) or set(grid.train) - fields:
        bad = sorted(set(grid.train) - fields) if isinstance(grid.train, dict) else grid.train
        raise SettingError(f"{path}: [train] takes {', '.join(sorted(fields))} for these methods; got {bad!r}")
    for m in methods:  # each method's fit settings, checked now rather than in the first cell
        train = {k: v for k, v in grid.train.items() if k in config_fields(m.fit_config_class)}
        try:
            m.fit_config(**train)
        except (ProbeError, TypeError) as e:
            raise SettingError(f"{path}: [train] for {m.name}: {e}") from None
    return grid


def expand_settings(grid: SweepGrid, source: str | Path = "grid") -> list[dict]:
    """Every distinct (method, length, options, seed) of the grid; options a method lacks become '-'."""
    axes = grid.axes
    settings = []
    for name in axes["method"]:
        try:
            cls = get_method(name)
        except ProbeError as e:
            raise SettingError(f"{source}: {e}") from None
        if not cls.can_fit():
            raise SettingError(f"{source}: method {name!r} has nothing to train, so nothing to sweep")
    takes = {m: [f.name for f in get_method(m).config_class.options()] for m in axes["method"]}
    options_now = grid_options()
    for option in options_now:
        for value in axes.get(option, []):
            takers = [m for m in axes["method"] if option in takes[m]]
            if not takers:
                raise SettingError(f"{source}: axis {option!r} applies to none of the methods {axes['method']}")
            for m in takers:
                try:
                    method_config(m, **{option: value})
                except ProbeError as e:
                    raise SettingError(f"{source}: axis {option} value {value!r} does not exist for {m}: {e}") from None
    for m in axes["method"]:
        choices = [axes.get(o, [None]) if o in takes[m] else [None] for o in options_now]
        for length, *values, seed in itertools.product(axes.get("length", [0]), *choices, axes.get("seed", [13])):
            config = method_config(m, **dict(zip(options_now, values, strict=True)))  # fills in the method's defaults
            try:
                get_method(m).check_settings(config, grid.template is not None or bool(axes.get("length")))
            except ProbeError as e:
                raise SettingError(f"{source}: {m}: {e} (a sweep's template and length axis count as a template)") from None
            options = {o: getattr(config, o) if o in takes[m] else NOT_APPLICABLE for o in options_now}
            settings.append({"method": m, "length": length, "options": options, "seed": seed})
    return list({(s["method"], s["length"], *s["options"].values(), s["seed"]): s for s in settings}.values())


def grid_models(grid: SweepGrid) -> list[str]:
    """The models of a grid: its model axis, else its `model`."""
    return list(dict.fromkeys(grid.axes.get("model", [grid.model])))
