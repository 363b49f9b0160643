"""The one trainer for gradient methods (dev selection is `probe.fit.FitLoop`, shared by every fit).

The LM stays frozen; only the method's parameters are optimised, on the backend's loss of the gold
(`Backend.gold_loss`: cross-entropy among single-token candidates, or the gold object's negative log-likelihood).
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from tqdm import tqdm

from probe.backends import Backend
from probe.batching import make_batches
from probe.errors import SettingError, check_positive
from probe.evaluator import evaluate_facts, evaluate_pack
from probe.fit import FitLoop, FitResult, FitTask, Fitted, create_prompt, setting

MAX_LR = 1e30  # AdamW's first step scales the lr by 10 in float32 (max 3.4e38); anything near that is no learning rate


@dataclass
class TrainConfig:
    """How a gradient method is fit; defaults chosen on the dev split (see BENCHMARKS.md)."""

    lr: float = setting(1e-3, "AdamW learning rate (each method's default chosen on dev)")
    weight_decay: float = 0.0
    batch_size: int = setting(16, "train facts per step")
    epochs: int = setting(2, "passes over the train facts")
    min_steps: int = setting(100, "at least this many steps, so small relations get more passes")
    warmup: float = 0.1  # share of steps with a linear warm-up, then linear decay to 0
    eval_every: int = setting(25, "steps between dev evaluations")
    patience: int = setting(4, "dev checks without a gain before stopping")
    max_train: int = setting(0, "at most this many train facts (0: all)")
    seed: int = setting(13, "random seed")
    retries: int = 1  # a fit whose dev figures never rise above their start is run again, at a lower lr
    retry_lr_factor: float = 0.1  # the lr of each retry, times the one before

    def check(self) -> None:
        if not 0 < self.lr < MAX_LR:
            raise SettingError(f"--lr must be a positive number{' below ' + format(MAX_LR, 'g') if self.lr > 0 else ''}, "
                               f"got {self.lr}")
        if self.weight_decay < 0:
            raise SettingError(f"weight_decay must be at least 0, got {self.weight_decay}")
        if not 0 <= self.warmup < 1:
            raise SettingError(f"warmup must be a share of the steps in [0, 1), got {self.warmup}")
        if self.retries < 0 or not 0 < self.retry_lr_factor < 1:
            raise SettingError(f"retries must be at least 0 and retry_lr_factor in (0, 1), got {self.retries} and "
                               f"{self.retry_lr_factor}")
        if self.min_steps < 0 or self.max_train < 0:
            raise SettingError(f"--min-steps and --max-train must be at least 0, got {self.min_steps} and {self.max_train}")
        check_positive(batch_size=self.batch_size, epochs=self.epochs, eval_every=self.eval_every, patience=self.patience)


class Trainee:
    """One prompt's fit inside a pass that may serve several: its own batches, AdamW, lr schedule, dev selection
    (FitLoop), patience, retries at a lower lr, and log. `attempt()` starts (again) from the prompt's state."""

    def __init__(self, backend: Backend, prompt: nn.Module, task: FitTask, retry: bool = True):
        self.backend, self.prompt, self.task, self.retry = backend, prompt, task, retry
        self.config: TrainConfig = task.config
        self.attempts: list[dict] = []
        self.kept: tuple[dict, FitResult] | None = None  # the best attempt on dev so far that rose above its start
        self.result: FitResult | None = None  # set once the last attempt ends
        self.attempt()

    def attempt(self) -> None:
        config, task, prompt = self.config, self.task, self.prompt
        generator = torch.Generator().manual_seed(config.seed)
        facts = task.train
        if config.max_train and len(facts) > config.max_train:
            keep = torch.randperm(len(facts), generator=generator)[: config.max_train].tolist()
            facts = [facts[i] for i in sorted(keep)]
        params = [p for p in prompt.parameters() if p.requires_grad]
        # foreach: fewer calls a step than one tensor at a time, the same updates bit for bit
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
        steps_per_epoch = math.ceil(len(facts) / config.batch_size)
        self.total = total = max(1, steps_per_epoch * config.epochs, config.min_steps)
        epochs = math.ceil(total / steps_per_epoch)
        warm = max(1, int(config.warmup * total))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
        )
        self.fit = FitLoop(lambda: evaluate_facts(self.backend, prompt, task.compiled, task.dev, task.candidates).metrics,
                           lambda: copy.deepcopy(prompt.state_dict()), config.patience, task.log_path,
                           {"config": asdict(config)}, total, task.desc, "step")
        prompt.train()
        self.batches = ((epoch, batch) for epoch in range(epochs)
                        for batch in make_batches(task.compiled, facts, task.candidates, config.batch_size,
                                                  self.backend.pad_id, generator))
        self.step, self.stopped = 0, False

    def next_part(self) -> tuple:
        """The next train batch, as a part of the pass: (batch, the prompt's inputs, candidates)."""
        self.epoch, batch = next(self.batches)
        return batch, self.prompt.prompt_inputs(), self.task.candidates

    def stepped(self, loss: torch.Tensor) -> dict:
        """After the backward pass: the optimizer's step; returns the step's log entry (the loss stays a tensor, read
        when the log is written)."""
        self.optimizer.step()
        self.schedule.step()
        self.step += 1
        return {"step": self.step, "epoch": self.epoch, "loss": loss.detach(), "lr": self.schedule.get_last_lr()[0]}

    @property
    def due(self) -> bool:
        """Whether this step ends with a dev check."""
        return self.step % self.config.eval_every == 0 or self.step == self.total

    def after(self, entry: dict) -> None:
        """The step is over (its dev check done): log it; at the end of an attempt keep the best on dev, and retry at a
        lower lr when dev never rose above the start (see `train_with_retries`)."""
        self.fit.done(entry, loss=entry["loss"])
        self.stopped = self.fit.exhausted
        if not (self.stopped or self.step == self.total):
            return
        self.prompt.load_state_dict(self.fit.kept_state)
        self.prompt.eval()
        result = self.fit.result(self.stopped)
        self.fit.close()
        self.attempts.append({"lr": self.config.lr, "steps": result.steps, "best_step": result.best_step,
                              "dev_p1": result.best_dev["p1"]})
        baseline = self.task.baseline
        below = baseline is not None and result.best_dev["p1"] < baseline["p1"]
        if not result.failed and (self.kept is None or _dev_key(result) > _dev_key(self.kept[1])):
            self.kept = (copy.deepcopy(self.prompt.state_dict()), result)  # the best attempt on dev that rose
        if self.retry and (result.failed or below) and len(self.attempts) <= self.config.retries:
            why = "never rose above its start" if result.failed else f"is below the manual prompt's {baseline['p1']:.1f}"
            self.config = replace(self.config, lr=self.config.lr * self.config.retry_lr_factor)
            tqdm.write(f"{self.task.desc}: dev P@1 {why}; retrying at lr {self.config.lr:g}")
            self.prompt.load_state_dict(self.fit.start_state)  # every attempt starts where the first did
            self.attempt()
            return
        if self.kept is not None and (result.failed or _dev_key(self.kept[1]) > _dev_key(result)):
            self.prompt.load_state_dict(self.kept[0])  # an earlier attempt did better on dev: it is kept
            result = self.kept[1]
        self.result = replace(result, attempts=self.attempts)


def _dev_key(result: FitResult) -> tuple[float, float]:
    return result.best_dev["p1"], result.best_dev["mrr"]


def train_together(backend: Backend, trainees: list[Trainee]) -> None:
    """One training step of every unfinished trainee, their batches in one pass of the LM (`Backend.pack_loss`), each
    prompt stepped on its own mean loss; the dev checks that fall due run as one call (`evaluate_pack`)."""
    active = [t for t in trainees if t.result is None]
    parts = [t.next_part() for t in active]
    with torch.autocast(backend.device.type, dtype=torch.bfloat16, enabled=backend.device.type == "cuda"):
        losses = [loss.mean() for loss in backend.pack_loss(parts)]
    for t in active:
        t.optimizer.zero_grad(set_to_none=True)
    (losses[0] if len(losses) == 1 else torch.stack(losses).sum()).backward()
    entries = [t.stepped(loss) for t, loss in zip(active, losses, strict=True)]
    due = [(t, e) for t, e in zip(active, entries, strict=True) if t.due]
    if due:
        devs = evaluate_pack(backend, [(t.prompt, t.task.compiled, t.task.dev, t.task.candidates) for t, _ in due])
        for (t, entry), dev in zip(due, devs, strict=True):
            t.fit.check(t.step, entry, dev.metrics)
    for t, entry in zip(active, entries, strict=True):
        t.after(entry)


def train_prompt(backend: Backend, method: nn.Module, task: FitTask) -> FitResult:
    """Train `method` (a PromptMethod) on the task's train facts with early stopping on dev P@1, once (no retry);
    leaves the best-on-dev weights in it."""
    trainee = Trainee(backend, method, task, retry=False)
    while trainee.result is None:
        train_together(backend, [trainee])
    return replace(trainee.result, attempts=[])


def train_with_retries(backend: Backend, method: nn.Module, task: FitTask) -> FitResult:
    """`train_prompt`, run again from the same start at `retry_lr_factor` times the lr (up to `retries` times) while
    dev P@1 never rises above its start, or stays below the task's `baseline` (the manual prompt's dev figures); the
    attempt best on dev is kept. The log holds every attempt, each opened by its config."""
    trainee = Trainee(backend, method, task)
    while trainee.result is None:
        train_together(backend, [trainee])
    return trainee.result


def train_pack(backend: Backend, tasks: list[FitTask], slots: int) -> Iterator[tuple[int, Fitted]]:
    """Train the tasks' prompts, at most `slots` at once (`train_together`), each new one taking the slot of one that
    finished; yields (index of the task, its Fitted) as each finishes."""
    waiting = deque(enumerate(tasks))
    active: dict[int, Trainee] = {}
    try:
        while waiting or active:
            while waiting and len(active) < slots:
                i, task = waiting.popleft()
                active[i] = Trainee(backend, create_prompt(backend, task), task)
            train_together(backend, list(active.values()))
            for i in [i for i, t in active.items() if t.result is not None]:
                trainee = active.pop(i)
                yield i, Fitted(trainee.prompt, trainee.result)
    finally:
        for trainee in active.values():  # interrupted: close the logs and bars of the fits still running
            trainee.fit.close()
