"""A fit is an object: `FitTask` holds everything one prompt's fit needs, `fit` runs it (probe/pack.py runs several
at once); the cells that own fits (a relation of `probe train`, a sweep cell) prepare the task and test what it gives.

Every fit, whatever its method, shares the dev selection of `FitLoop`: dev evaluated at the start and at each
check, the best state by (P@1, MRR) kept, patience, and the rule that a fit whose dev P@1 never rose above its
start is not a trained prompt. Several tasks of one method kind can be fit in one pass (probe/pack.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from probe.backends import Backend
from probe.data import Fact
from probe.files import JsonlLog
from probe.templates import CompiledTemplate


def config_fields(config_class) -> set[str]:
    """The option names a config dataclass takes."""
    return {f.name for f in fields(config_class)}


def setting(default: Any, help: str) -> Any:
    """A fit setting users set, declared once in a method's fit config class (a dataclass): it becomes a flag of
    `probe train` (--NAME), a key of a sweep grid's [train] table and a keyword of `probe.train`, with this help."""
    return field(default=default, metadata={"setting": True, "help": help})


def settings_of(config_class) -> list:
    """The fields of a fit config class made with `setting(...)`, in declaration order."""
    return [f for f in fields(config_class) if f.metadata.get("setting")] if config_class is not None else []


@dataclass
class FitTask:
    """One prompt to fit against a loaded LM: a method and its options on one relation's compiled template, the train
    facts, the dev facts it is selected on, the candidates, the fit settings, and where its log goes."""

    compiled: CompiledTemplate
    train: list[Fact]
    dev: list[Fact]
    candidates: Any  # CandidateVocab, or ObjectCandidates for objects of any length
    config: Any  # the method's fit settings (its `fit_config_class`)
    method: type | None = None  # the PromptMethod class `fit` creates (the fit hooks are handed the prompt instead)
    options: Any = None  # the method's options (its MethodConfig)
    manual_template: str = ""  # the relation's [X] ... [Y] template (template and vocab inits, the manual baseline)
    log_path: Path | None = None
    desc: str = "train"  # the progress bar's label
    relation: str = ""
    baseline: dict | None = None  # dev metrics a fit should not stay below (the manual prompt's): else it is retried


@dataclass
class FitResult:
    best_dev: dict
    best_step: int
    steps: int
    stopped_early: bool
    attempts: list[dict] = field(default_factory=list)  # one per run of the fit: its lr, steps, best step and dev P@1

    @property
    def failed(self) -> bool:
        """Dev P@1 never rose above where the prompt started: not a trained prompt."""
        return self.best_step == 0


@dataclass
class Fitted:
    """A fit's prompt (left at its best-on-dev state) and how the fit went."""

    prompt: nn.Module  # a PromptMethod
    result: FitResult


class FitLoop:
    """What every fit shares: the dev baseline, the log, the progress bar, the best-on-dev state and patience.

    Dev is evaluated once at the start (step 0); `check(step, entry)` evaluates it again and keeps `snapshot()`
    when (P@1, MRR) improves; `skip()` counts a step without a check against patience. Used as a context,
    it closes the bar and the log however the fit ends.
    """

    def __init__(self, evaluate_dev: Callable[[], dict], snapshot: Callable[[], object], patience: int,
                 log_path: Path | None, first_entry: dict, total: int, desc: str, unit: str,
                 start: dict | None = None):
        self.evaluate_dev = evaluate_dev
        self.snapshot = snapshot
        self.patience = patience
        self.best = self.start = start if start is not None else evaluate_dev()
        self.best_state, self.best_step, self.bad, self.step = snapshot(), 0, 0, 0
        self.start_state = self.best_state
        self.log = JsonlLog(log_path)
        self.log.write({"step": 0, "dev_p1": self.best["p1"], "dev_mrr": self.best["mrr"], **first_entry})
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
        self.pending: list[tuple[dict, dict]] = []  # steps whose losses are still tensors on the device

    def __enter__(self) -> FitLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.flush()
        self.bar.close()
        self.log.close()

    def flush(self) -> None:
        """Write the pending steps, their tensors read from the device at once (one host sync, not one a step)."""
        if not self.pending:
            return
        tensors = [v for entry, _ in self.pending for v in entry.values() if isinstance(v, torch.Tensor)]
        values = iter(torch.stack([t.float() for t in tensors]).tolist()) if tensors else iter(())
        for entry, shown in self.pending:
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    entry[key] = round(next(values), 5)
            self.log.write(entry)
            if shown:
                self.bar.set_postfix(**{k: f"{entry[k]:.3f}" if k in entry else v for k, v in shown.items()},
                                     best=f"{self.best['p1']:.1f}")
        self.pending.clear()

    def check(self, step: int, entry: dict, dev: dict | None = None) -> dict:
        """Evaluate dev at `step` (or take `dev`, evaluated elsewhere), keep the state if it is the best so far by
        (P@1, MRR), note it in the log entry. A best whose P@1 is not above the start's does not count as trained:
        see `kept_state`."""
        dev = self.evaluate_dev() if dev is None else dev
        self.flush()
        entry.update(dev_p1=dev["p1"], dev_mrr=dev["mrr"])
        if (dev["p1"], dev["mrr"]) > (self.best["p1"], self.best["mrr"]):
            self.best, self.best_state, self.best_step, self.bad = dev, self.snapshot(), step, 0
        else:
            self.bad += 1
        return dev

    def skip(self) -> None:
        """A step with no dev check counts against patience too (the trigger search's iterations)."""
        self.bad += 1

    def done(self, entry: dict, **shown) -> None:
        """A step is over: log its entry, move the bar, show figures next to the best dev P@1. An entry that holds
        tensors (a loss still on the device) is written at the next dev check or at the end (`flush`), so that the
        training loop never waits for the device; `shown` then names the entry's keys to show."""
        self.step = entry["step"]
        self.bar.update(1)
        if any(isinstance(v, torch.Tensor) for v in entry.values()):
            self.pending.append((entry, shown))
            return
        self.log.write(entry)
        self.bar.set_postfix(**shown, best=f"{self.best['p1']:.1f}")

    @property
    def exhausted(self) -> bool:
        """Patience is used up (0: never)."""
        return bool(self.patience) and self.bad >= self.patience

    @property
    def rose(self) -> bool:
        """Whether dev P@1 rose above the start's (a gain in MRR alone is not a trained prompt)."""
        return self.best["p1"] > self.start["p1"]

    @property
    def kept_state(self) -> object:
        """The state to keep: the best on dev, or the starting one where dev P@1 never rose."""
        return self.best_state if self.rose else self.start_state

    def result(self, stopped: bool) -> FitResult:
        if not self.rose:  # a failed fit: the untrained prompt's figures, best step 0
            return FitResult(self.start, 0, self.step, stopped)
        return FitResult(self.best, self.best_step, self.step, stopped)


_SEEDED = threading.Lock()  # torch's global generator: one prompt is seeded and drawn at a time (fits on threads)


def create_prompt(backend: Backend, task: FitTask) -> nn.Module:
    """The task's method, created for its template (seeded by its fit settings), on the backend's device."""
    with _SEEDED:
        torch.manual_seed(task.config.seed)
        return task.method.create(backend, task.compiled, task.manual_template, task.options).to(backend.device)


def fit(backend: Backend, task: FitTask) -> Fitted:
    """Create the task's method and fit it on train with selection on dev; the prompt is left at its best on dev.
    A method that trains the LM puts it back if the fit fails."""
    prompt = create_prompt(backend, task)
    try:
        result = prompt.fit(backend, task)
    except BaseException:
        prompt.release()
        raise
    return Fitted(prompt, result)
