"""The one trainer for gradient methods, and the dev selection that every fit shares.

The LM stays frozen; only the method's parameters are optimised, on the backend's loss of the gold
(`Backend.gold_loss`: cross-entropy among single-token candidates, or the gold object's negative log-likelihood).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from probe.backends import Backend
from probe.batching import make_batches
from probe.data import Fact
from probe.errors import ProbeError, check_positive
from probe.evaluate import evaluate_facts
from probe.runs import JsonlLog
from probe.templates import CompiledTemplate
from probe.vocab import CandidateVocab

if TYPE_CHECKING:
    from probe.methods.base import PromptMethod


@dataclass
class TrainConfig:
    """How a gradient method is fit; defaults chosen on the dev split (see BENCHMARKS.md)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    epochs: int = 2
    min_steps: int = 100  # small relations get more passes, so that every prompt sees this many steps
    warmup: float = 0.1  # share of steps with a linear warm-up, then linear decay to 0
    eval_every: int = 25  # steps between dev evaluations
    patience: int = 4  # dev evaluations without improvement before stopping
    max_train: int = 0  # 0: all train facts
    seed: int = 13
    retries: int = 1  # a fit whose dev figures never rise above their start is run again, at a lower lr
    retry_lr_factor: float = 0.1  # the lr of each retry, times the one before

    def check(self) -> None:
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ProbeError(f"--lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise ProbeError(f"weight_decay must be at least 0, got {self.weight_decay}")
        if not 0 <= self.warmup < 1:
            raise ProbeError(f"warmup must be a share of the steps in [0, 1), got {self.warmup}")
        if self.retries < 0 or not 0 < self.retry_lr_factor < 1:
            raise ProbeError(f"retries must be at least 0 and retry_lr_factor in (0, 1), got {self.retries} and "
                             f"{self.retry_lr_factor}")
        if self.min_steps < 0 or self.max_train < 0:
            raise ProbeError(f"--min-steps and --max-train must be at least 0, got {self.min_steps} and {self.max_train}")
        check_positive(batch_size=self.batch_size, epochs=self.epochs, eval_every=self.eval_every, patience=self.patience)


def config_fields(config_class) -> set[str]:
    """The option names a config dataclass takes."""
    return {f.name for f in fields(config_class)}


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


class FitLoop:
    """What every fit shares: the dev baseline, the log, the progress bar, the best-on-dev state and patience.

    Dev is evaluated once at the start (step 0); `check(step, entry)` evaluates it again and keeps `snapshot()`
    when (P@1, MRR) improves; `skip()` counts a step without a check against patience. Used as a context,
    it closes the bar and the log however the fit ends.
    """

    def __init__(self, evaluate_dev: Callable[[], dict], snapshot: Callable[[], object], patience: int,
                 log_path: Path | None, first_entry: dict, total: int, desc: str, unit: str):
        self.evaluate_dev = evaluate_dev
        self.snapshot = snapshot
        self.patience = patience
        self.best = self.start = evaluate_dev()
        self.best_state, self.best_step, self.bad, self.step = snapshot(), 0, 0, 0
        self.start_state = self.best_state
        self.log = JsonlLog(log_path)
        self.log.write({"step": 0, "dev_p1": self.best["p1"], "dev_mrr": self.best["mrr"], **first_entry})
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def __enter__(self) -> FitLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.log.close()

    def check(self, step: int, entry: dict) -> dict:
        """Evaluate dev at `step`, keep the state if it is the best so far by (P@1, MRR), note it in the log entry.
        A best whose P@1 is not above the start's does not count as trained: see `kept_state`."""
        dev = self.evaluate_dev()
        entry.update(dev_p1=dev["p1"], dev_mrr=dev["mrr"])
        if (dev["p1"], dev["mrr"]) > (self.best["p1"], self.best["mrr"]):
            self.best, self.best_state, self.best_step, self.bad = dev, self.snapshot(), step, 0
        else:
            self.bad += 1
        return dev

    def skip(self) -> None:
        """A step with no dev check counts against patience too (the trigger search's iterations)."""
        self.bad += 1

    def done(self, entry: dict, **shown: str) -> None:
        """A step is over: log its entry, move the bar, show figures next to the best dev P@1."""
        self.step = entry["step"]
        self.log.write(entry)
        self.bar.update(1)
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


def train_prompt(
    backend: Backend,
    method: PromptMethod,
    compiled: CompiledTemplate,
    train_facts: list[Fact],
    dev_facts: list[Fact],
    candidates: CandidateVocab,
    config: TrainConfig,
    log_path: Path | None = None,
    desc: str = "train",
) -> FitResult:
    """Train `method` on train facts with early stopping on dev P@1; leaves the best-on-dev weights in it."""
    generator = torch.Generator().manual_seed(config.seed)
    if config.max_train and len(train_facts) > config.max_train:
        keep = torch.randperm(len(train_facts), generator=generator)[: config.max_train].tolist()
        train_facts = [train_facts[i] for i in sorted(keep)]
    params = [p for p in method.parameters() if p.requires_grad]
    # foreach: fewer calls a step than one tensor at a time, the same updates bit for bit
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    steps_per_epoch = math.ceil(len(train_facts) / config.batch_size)
    total = max(1, steps_per_epoch * config.epochs, config.min_steps)
    epochs = math.ceil(total / steps_per_epoch)
    warm = max(1, int(config.warmup * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )
    fit = FitLoop(lambda: evaluate_facts(backend, method, compiled, dev_facts, candidates).metrics,
                  lambda: copy.deepcopy(method.state_dict()), config.patience, log_path, {"config": asdict(config)},
                  total, desc, "step")
    method.train()
    step, stopped = 0, False
    with fit:
        for epoch in range(epochs):
            for batch in make_batches(compiled, train_facts, candidates, config.batch_size, backend.pad_id, generator):
                with torch.autocast(backend.device.type, dtype=torch.bfloat16, enabled=backend.device.type == "cuda"):
                    loss = backend.gold_loss(batch, method.prompt_inputs(), candidates).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                entry = {"step": step, "epoch": epoch, "loss": round(loss.item(), 5), "lr": schedule.get_last_lr()[0]}
                if step % config.eval_every == 0 or step == total:
                    fit.check(step, entry)
                fit.done(entry, loss=f"{loss.item():.3f}")
                stopped = fit.exhausted
                if stopped or step == total:
                    break
            if stopped or step == total:
                break
    method.load_state_dict(fit.kept_state)
    method.eval()
    return fit.result(stopped)


def train_with_retries(backend: Backend, method: PromptMethod, compiled: CompiledTemplate, train_facts: list[Fact],
                       dev_facts: list[Fact], candidates: CandidateVocab, config: TrainConfig,
                       log_path: Path | None = None, desc: str = "train") -> FitResult:
    """`train_prompt`, run again at `retry_lr_factor` times the lr (up to `retries` times) while dev never rises
    above its start. A failed fit leaves the starting prompt in place, so each retry starts where the first did;
    the log holds every attempt, each opened by its config."""
    attempts = []
    while True:
        result = train_prompt(backend, method, compiled, train_facts, dev_facts, candidates, config, log_path=log_path,
                              desc=desc)
        attempts.append({"lr": config.lr, "steps": result.steps, "best_step": result.best_step,
                         "dev_p1": result.best_dev["p1"]})
        if not result.failed or len(attempts) > config.retries:
            return replace(result, attempts=attempts)
        config = replace(config, lr=config.lr * config.retry_lr_factor)
        tqdm.write(f"{desc}: dev P@1 never rose above its start; retrying at lr {config.lr:g}")
