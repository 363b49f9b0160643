"""The one trainer for gradient methods (dev selection is `probe.fit.FitLoop`, shared by every fit).

The LM stays frozen; only the method's parameters are optimised, on the backend's loss of the gold
(`Backend.gold_loss`: cross-entropy among single-token candidates, or the gold object's negative log-likelihood).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from tqdm import tqdm

from probe.backends import Backend
from probe.batching import make_batches
from probe.errors import ProbeError, check_positive
from probe.evaluate import evaluate_facts
from probe.fit import FitLoop, FitResult, FitTask


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


def train_prompt(backend: Backend, method: nn.Module, task: FitTask) -> FitResult:
    """Train `method` (a PromptMethod) on the task's train facts with early stopping on dev P@1; leaves the best-on-dev
    weights in it."""
    compiled, train_facts, dev_facts, candidates = task.compiled, task.train, task.dev, task.candidates
    config: TrainConfig = task.config
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
                  lambda: copy.deepcopy(method.state_dict()), config.patience, task.log_path, {"config": asdict(config)},
                  total, task.desc, "step")
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


def train_with_retries(backend: Backend, method: nn.Module, task: FitTask) -> FitResult:
    """`train_prompt`, run again at `retry_lr_factor` times the lr (up to `retries` times) while dev never rises
    above its start. A failed fit leaves the starting prompt in place, so each retry starts where the first did;
    the log holds every attempt, each opened by its config."""
    attempts = []
    config = task.config
    while True:
        result = train_prompt(backend, method, replace(task, config=config))
        attempts.append({"lr": config.lr, "steps": result.steps, "best_step": result.best_step,
                         "dev_p1": result.best_dev["p1"]})
        if not result.failed or len(attempts) > config.retries:
            return replace(result, attempts=attempts)
        config = replace(config, lr=config.lr * config.retry_lr_factor)
        tqdm.write(f"{task.desc}: dev P@1 never rose above its start; retrying at lr {config.lr:g}")
