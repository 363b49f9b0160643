"""The one trainer: any trainable method, any backend. The LM stays frozen; only the method is optimised."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from probe.backends import LMBackend
from probe.batching import make_batches
from probe.data import Fact
from probe.evaluate import candidate_scores, evaluate_facts, pad_id
from probe.methods.base import PromptMethod
from probe.runs import JsonlLog
from probe.templates import CompiledTemplate
from probe.vocab import CandidateVocab


@dataclass
class TrainConfig:
    """Optimisation settings; defaults chosen on the dev split (see BENCHMARKS.md)."""

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


@dataclass
class TrainResult:
    best_dev: dict
    best_step: int
    steps: int
    stopped_early: bool


def train_prompt(
    backend: LMBackend,
    method: PromptMethod,
    compiled: CompiledTemplate,
    train_facts: list[Fact],
    dev_facts: list[Fact],
    candidates: CandidateVocab,
    config: TrainConfig,
    log_path: Path | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train `method` on train facts with early stopping on dev P@1; leaves the best-on-dev weights in it."""
    generator = torch.Generator().manual_seed(config.seed)
    if config.max_train and len(train_facts) > config.max_train:
        keep = torch.randperm(len(train_facts), generator=generator)[: config.max_train].tolist()
        train_facts = [train_facts[i] for i in sorted(keep)]
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_facts) / config.batch_size)
    total = max(1, steps_per_epoch * config.epochs, config.min_steps)
    epochs = math.ceil(total / steps_per_epoch)
    warm = max(1, int(config.warmup * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )
    best = evaluate_facts(backend, method, compiled, dev_facts, candidates).metrics
    best_state, best_step, bad, step = copy.deepcopy(method.state_dict()), 0, 0, 0
    log = JsonlLog(log_path)
    log.write({"step": 0, "dev_p1": best["p1"], "dev_mrr": best["mrr"], "config": asdict(config)})
    method.train()
    stopped = False
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False)
    try:
        for epoch in range(epochs):
            batches = make_batches(compiled, train_facts, candidates, config.batch_size, pad_id(backend), generator)
            for batch in batches:
                batch = batch.to(backend.device)
                with torch.autocast(backend.device.type, dtype=torch.bfloat16, enabled=backend.device.type == "cuda"):
                    scores = candidate_scores(backend, method, batch, candidates)
                loss = F.cross_entropy(scores.float(), batch.gold)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                bar.update(1)
                entry = {"step": step, "epoch": epoch, "loss": round(loss.item(), 5), "lr": schedule.get_last_lr()[0]}
                if step % config.eval_every == 0 or step == total:
                    dev = evaluate_facts(backend, method, compiled, dev_facts, candidates).metrics
                    entry.update(dev_p1=dev["p1"], dev_mrr=dev["mrr"])
                    if (dev["p1"], dev["mrr"]) > (best["p1"], best["mrr"]):
                        best, best_state, best_step, bad = dev, copy.deepcopy(method.state_dict()), step, 0
                    else:
                        bad += 1
                    bar.set_postfix(loss=f"{loss.item():.3f}", dev_p1=f"{dev['p1']:.1f}", best=f"{best['p1']:.1f}")
                log.write(entry)
                stopped = bad >= config.patience
                if stopped or step == total:
                    break
            if stopped or step == total:
                break
    finally:
        bar.close()
        log.close()
    method.load_state_dict(best_state)
    method.eval()
    return TrainResult(best, best_step, step, stopped)
