"""How `probe train`'s flags travel: entries into the spec modules and climbs back up the layers (issue 42).

Runs `probe train` in process (probe.api.train_command, what the CLI calls) on a few facts of our own under
sys.setprofile, and follows the flags: every call of probe's own code that is handed the `Options` or a spec made from
it (RunSpec, FitSpec, EvalSpec), as an argument or as `self`. Of those calls it counts
  - entries: a call from outside the spec modules (probe/spec.py, probe/options.py) into them;
  - climbs: a call from a lower layer into a higher one, the layers as README's code map orders them
    (data, templates, backends, evaluator, fit, methods, pack, cells, options, spec, commands, api, cli).
Each is counted per call and per call site (caller function -> callee); a one-relation run makes them the same.

    python benchmarks/spec_calls.py                       # smollm2, the run's folder in a temporary folder
    python benchmarks/spec_calls.py --model DIR -v        # another model; list every call that carries the flags

It reaches probe through probe.api only; at commits before the API's command entries (4de0bf4) or the spec (c1a41fc),
run this script as it was at 05cd761, which fell back to the command and the flags alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [  # (rank, name, paths under the repository): README's code map, each layer using only those above it
    (0, "data", ["probe/errors.py", "probe/files.py", "probe/data/"]),
    (1, "templates", ["probe/templates.py", "probe/template_files.py", "probe/prompt_files.py", "probe/vocab.py",
                      "probe/objects.py"]),
    (2, "backends", ["probe/backends/", "probe/controls.py", "probe/batching.py", "probe/statements.py",
                     "probe/metrics.py"]),
    (3, "evaluator", ["probe/evaluator.py", "probe/consistency.py"]),
    (4, "fit", ["probe/fit.py", "probe/trainer.py"]),
    (5, "methods", ["probe/methods/", "probe/saved_prompts.py"]),
    (6, "pack", ["probe/pack.py"]),
    (7, "cells", ["probe/cells.py", "probe/ray_cells.py", "probe/runs.py", "probe/tracking.py"]),
    (8, "options", ["probe/options.py"]),
    (9, "spec", ["probe/spec.py"]),
    (10, "commands", ["probe/commands/", "probe/sweep/", "probe/comparison.py", "probe/explain.py", "probe/plots.py",
                      "probe/peft_adapters.py", "probe/lama_import.py"]),
    (11, "api", ["probe/api.py", "probe/__init__.py", "probe/flags.py"]),
    (12, "cli", ["cli.py"]),
]
SPEC_MODULES = ("probe/spec.py", "probe/options.py")
FACTS = {  # a few capitals: (subject, object)
    "train": [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Egypt", "Cairo")],
    "dev": [("Germany", "Berlin"), ("Spain", "Madrid")],
    "test": [("Russia", "Moscow"), ("Greece", "Athens"), ("Peru", "Lima")],
}


def layer_of(filename: str) -> tuple[int, str, str] | None:
    """(rank, layer, path in the repository) of a file of probe's code, else None."""
    try:
        rel = Path(filename).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return None
    for rank, name, paths in LAYERS:
        if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in paths):
            return rank, name, rel
    return None


class Follower:
    """A profile function that records the calls of probe's code handed the flags or a spec made from them."""

    def __init__(self, carriers: tuple[type, ...]):
        self.carriers = carriers
        self.layers: dict = {}  # code object -> layer_of its file
        self.calls: list[tuple[str, str, str, str]] = []  # (caller layer, caller, callee layer, callee)
        self.entries: list[tuple[str, str]] = []
        self.any_entries: list[tuple[str, str]] = []  # into the spec modules from outside, whatever the arguments
        self.any_climbs: set[tuple[str, str]] = set()  # up the layers, whatever the arguments (callbacks, cells' run)
        self.climbs: list[tuple[str, str]] = []

    def where(self, code) -> tuple[int, str, str] | None:
        if code not in self.layers:
            self.layers[code] = layer_of(code.co_filename)
        return self.layers[code]

    def carries(self, frame) -> bool:
        code = frame.f_code
        n = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 4) + bool(code.co_flags & 8)
        values = [frame.f_locals.get(name) for name in code.co_varnames[:n]]
        values += [v for given in values if isinstance(given, tuple | list | dict)
                   for v in (given.values() if isinstance(given, dict) else given)]
        return any(isinstance(v, self.carriers) for v in values)

    def __call__(self, frame, event, arg):
        if event != "call":
            return
        callee = self.where(frame.f_code)
        if callee is None or frame.f_back is None:
            return
        caller = self.where(frame.f_back.f_code)
        if caller is None:
            return
        src = f"{caller[2]}:{frame.f_back.f_code.co_name}"
        dst = f"{callee[2]}:{frame.f_code.co_name}"
        if callee[2] in SPEC_MODULES and caller[2] not in SPEC_MODULES:
            self.any_entries.append((src, dst))
        if callee[0] > caller[0]:
            self.any_climbs.add((src, dst))
        if not self.carries(frame):
            return
        self.calls.append((caller[1], src, callee[1], dst))
        if callee[2] in SPEC_MODULES and caller[2] not in SPEC_MODULES:
            self.entries.append((src, dst))
        if callee[0] > caller[0]:
            self.climbs.append((src, dst))


def write_facts(folder: Path) -> dict[str, Path]:
    """The facts files of the run (train, dev and test, one relation) and its candidates (`vocab`: every object)."""
    paths = {"vocab": folder / "vocab.txt"}
    paths["vocab"].write_text("".join(f"{o}\n" for pairs in FACTS.values() for _, o in pairs), encoding="utf-8")
    for split, pairs in FACTS.items():
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps({"relation": "capital", "sub_label": s, "obj_label": o}) + "\n"
                                        for s, o in pairs), encoding="utf-8")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("-v", "--verbose", action="store_true", help="List every call that carries the flags.")
    args = parser.parse_args()

    from probe.api import Options, train_command  # the CLI's entry and the flags it takes

    spec = sys.modules["probe.spec"]  # what the flags become, looked up by module name (the API loads it)
    carriers = (Options, spec.RunSpec, spec.FitSpec, spec.EvalSpec)

    with tempfile.TemporaryDirectory(prefix="spec-calls-") as tmp:
        facts = write_facts(Path(tmp))
        opts = Options(model=[args.model], method="ptuning", facts=facts["test"], train_facts=facts["train"],
                       dev_facts=facts["dev"], vocab=str(facts["vocab"]), out=Path(tmp) / "run",
                       manual_template="The capital of [X] is [Y] .", device="cpu", threads=1, max_train=4, epochs=1,
                       min_steps=1, batch_size=2, eval_every=1, seed=13)
        follower = Follower(carriers)
        t0 = time.time()
        threading.setprofile(follower)
        sys.setprofile(follower)
        try:
            (run,) = train_command(opts, log=lambda line: None).runs
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
        p1 = run.results["relations"][0]["p1"]
    print(f"probe train ({args.model}, ptuning, 1 relation, test P@1 {p1:.1f}) in {time.time() - t0:.1f}s")
    print(f"calls handed the flags or their spec: {len(follower.calls)} ({len(set(follower.calls))} call sites)")
    for name, found in (("entries into the spec modules", follower.entries), ("climbs up the layers", follower.climbs)):
        print(f"{name}: {len(found)} ({len(set(found))} call sites)")
        for (src, dst), n in Counter(found).items():
            print(f"  {src} -> {dst}" + (f"  x{n}" if n > 1 else ""))
    print(f"(any call from outside into the spec modules, whatever it is handed: {len(follower.any_entries)}, "
          f"{len(set(follower.any_entries))} call sites; any call up the layers: {len(follower.any_climbs)} call sites, "
          "the executor running cells and the logs handed down)")
    if args.verbose:
        for (src, dst), n in Counter(follower.any_entries).items():
            print(f"  {src} -> {dst}" + (f"  x{n}" if n > 1 else ""))
        print("calls up the layers, whatever they are handed:")
        for src, dst in sorted(follower.any_climbs):
            print(f"  {src} -> {dst}")
        print("every call handed the flags or their spec:")
        for (src_layer, src, dst_layer, dst), n in Counter(follower.calls).items():
            print(f"  [{src_layer}] {src} -> [{dst_layer}] {dst}" + (f"  x{n}" if n > 1 else ""))


if __name__ == "__main__":
    main()
