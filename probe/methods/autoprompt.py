"""AutoPrompt (Shin et al. 2020): real vocabulary tokens (triggers) in the virtual slots, found by a search.

The method holds the trigger ids; `virtual_embeddings()` are the LM's own input-embedding rows of them, so the
shared evaluator needs nothing special. It is fit by `search_triggers` (several relations in step by
`search_together`), not by gradient descent. Each iteration takes one train batch and one trigger slot (the slots in
turn):
1. the gradient of the loss w.r.t. the trigger embeddings (the LM stays frozen);
2. the top-k allowed vocabulary tokens by -(embedding . gradient), the first-order loss decrease;
3. each of them re-scored on the batch; the best replaces the slot's token if it lowers the loss;
4. after a flip, dev P@1 is evaluated; the best-on-dev triggers are kept, with early stopping.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from probe.backends import Backend, PromptInputs
from probe.batching import Batch, make_batches
from probe.data import Fact
from probe.errors import SettingError, check_positive
from probe.evaluator import evaluate_facts
from probe.fit import FitLoop, FitResult, FitTask, Fitted, create_prompt, setting
from probe.methods.base import MethodConfig, PromptMethod, option
from probe.templates import OBJ, SUB, TEXT, VIRTUAL, CompiledTemplate, Template, encode_words, manual_word_slots
from probe.vocab import CandidateVocab

INIT_WORD = "the"  # a trigger starts as this word (as a word start: ' the' for BPE vocabularies)
INITS = ("neutral", "manual")
PACK_ROWS = 4096  # rows of re-scored candidates in one pass when several searches run in step


@dataclass
class AutoPromptConfig(MethodConfig):
    """`neutral`: triggers start as INIT_WORD in the template's virtual slots (Shin et al.). `manual`: the
    relation's manual prompt, its words before [Y] as triggers that start as themselves (AutoPrompt's
    initial-trigger option), so the search starts where the manual prompt stands."""

    init: str = option("neutral", INITS, "where the triggers start: neutral (every trigger 'the') or manual (the "
                                         "relation's manual prompt)")

    def check(self) -> None:
        if self.init not in INITS:
            raise SettingError(f"unknown autoprompt init {self.init!r}: expected one of {', '.join(INITS)}")


@dataclass
class TriggerSearchConfig:
    """How the triggers are searched; the defaults fit a CPU budget (about a minute per relation for SmolLM2-135M).
    `--preset paper` is AutoPrompt's own LAMA budget (its fact-retrieval script: --iters 1000 --num-cand 10 --bsz 20
    --eval-size 100)."""

    presets: ClassVar[dict[str, dict]] = {
        "paper": {"iterations": 1000, "top_k": 10, "batch_size": 20, "dev_size": 100, "patience": 0},
    }

    iterations: int = setting(30, "search iterations, one trigger slot each")
    top_k: int = setting(10, "candidate tokens re-scored per iteration")
    batch_size: int = setting(16, "train facts per step")
    patience: int = setting(10, "iterations without a dev gain before stopping (0: never stop early)")
    capitals: bool = setting(True, "allow capitalised trigger tokens")
    dev_size: int = setting(0, "dev checks on a fixed sample of this many dev facts (0: all)")
    seed: int = setting(13, "random seed")

    def check(self) -> None:
        check_positive(iterations=self.iterations, top_k=self.top_k, batch_size=self.batch_size)
        if self.patience < 0 or self.dev_size < 0:
            raise SettingError(f"--patience and --dev-size must be at least 0, got {self.patience} and {self.dev_size}")


class AutoPrompt(PromptMethod):
    """Trigger token ids, one per virtual slot; `virtual_embeddings()` looks them up in the LM's table."""

    name = "autoprompt"
    summary = "AutoPrompt (Shin et al. 2020): real vocabulary tokens in the virtual slots, found by a gradient-guided search"
    config_class = AutoPromptConfig
    fit_config_class = TriggerSearchConfig
    continuous = False  # its prompt is real tokens
    packable = True  # its searches can run in step, their passes shared (search_together)

    def __init__(self, n_virtual: int, hidden_size: int, config: AutoPromptConfig | None = None,
                 embed: Callable[[torch.Tensor], torch.Tensor] | None = None, trigger_ids: torch.Tensor | None = None):
        super().__init__(n_virtual, hidden_size, config)
        ids = trigger_ids if trigger_ids is not None else torch.zeros(n_virtual, dtype=torch.long)
        self.register_buffer("trigger_ids", ids.clone().long())
        self.embed = embed  # the LM's ids -> input embeddings (a function, so the LM stays out of state_dict)

    @classmethod
    def check_settings(cls, config: AutoPromptConfig, template_given: bool) -> None:
        if config.init == "manual" and template_given:
            raise SettingError("--init manual builds each relation's template from its manual prompt: drop --template")

    @classmethod
    def relation_template(cls, template: Template, manual_template: str, kind: str,
                          config: AutoPromptConfig | None = None) -> Template:
        if config is not None and config.init == "manual":
            return manual_word_slots(manual_template, kind)
        return template

    @classmethod
    def create(cls, backend, compiled: CompiledTemplate, manual_template: str,
               config: AutoPromptConfig | None = None) -> AutoPrompt:
        """Virtual slots start as INIT_WORD, word slots as their own words."""
        neutral = encode_words(backend.tokenizer, INIT_WORD, True, compiled.space_sensitive)[0]
        init = torch.tensor([neutral if s is None else s for s in compiled.start_ids], dtype=torch.long)
        return cls(compiled.n_virtual, backend.hidden_size, config, backend.embed, init)

    def virtual_embeddings(self) -> torch.Tensor:
        return self.embed(self.trigger_ids)

    def fit(self, backend: Backend, task: FitTask) -> FitResult:
        return search_triggers(backend, self, task)

    @classmethod
    def fit_together(cls, backend: Backend, tasks: list[FitTask], slots: int) -> Iterator[tuple[int, Fitted]]:
        return search_together(backend, tasks, slots)

    def saved_info(self, compiled: CompiledTemplate) -> dict:
        """The triggers as ids, tokens, and the template filled with them: `[X] tok tok tok [Y]`."""
        tok = compiled.tokenizer
        ids = self.trigger_ids.tolist()
        tokens = tok.convert_ids_to_tokens(ids)
        decoded = [tok.decode([i]).strip() for i in ids]
        words = iter(d if d and "\ufffd" not in d else t for d, t in zip(decoded, tokens, strict=True))
        text = []
        for kind, value in compiled.parts:
            if kind == VIRTUAL:
                text.extend(next(words) for _ in range(value))
            elif kind == TEXT:
                text.append(tok.decode(value).strip())
            else:
                text.append("[X]" if kind == SUB else "[Y]")
                if kind == OBJ and compiled.kind == "causal":  # a causal model sees nothing after the object
                    break
        return {"triggers": {"ids": ids, "tokens": tokens, "text": " ".join(text)}}


def allowed_tokens(tokenizer, n_rows: int, train_facts: list[Fact], capitals: bool = True) -> torch.Tensor:
    """Bool mask over the embedding rows a trigger may take: no special or added tokens, no train gold
    object (with or without a leading space), no capitalised token unless `capitals`. Sub-words are allowed."""
    allowed = torch.zeros(n_rows, dtype=torch.bool)
    allowed[: min(n_rows, len(tokenizer))] = True
    banned = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    for obj in {f.obj for f in train_facts}:
        for lead in (False, True):
            ids = encode_words(tokenizer, obj, lead, True)
            if len(ids) == 1:
                banned.add(ids[0])
    allowed[[i for i in banned if i < n_rows]] = False
    if not capitals:
        tokens = tokenizer.convert_ids_to_tokens(list(range(min(n_rows, len(tokenizer)))))
        caps = [i for i, t in enumerate(tokens) if t and t.lstrip("Ġ▁#")[:1].isupper()]
        allowed[caps] = False
    return allowed


def batch_loss(backend: Backend, prompt: PromptInputs, batch: Batch, candidates: CandidateVocab) -> torch.Tensor:
    """The mean loss of the gold (`Backend.gold_loss`), as the gradient trainer computes it."""
    return backend.gold_loss(batch, prompt, candidates).mean()


def trigger_gradient(backend: Backend, method: PromptMethod, batch: Batch,
                     candidates: CandidateVocab) -> tuple[float, torch.Tensor]:
    """The batch loss and its gradient w.r.t. the (n_virtual, H) trigger embeddings."""
    leaf = trigger_leaf(method)
    loss = batch_loss(backend, PromptInputs(leaf), batch, candidates)
    loss.backward()
    return loss.item(), leaf.grad


def trigger_leaf(method: PromptMethod) -> torch.Tensor:
    """The trigger embeddings (n_virtual, H) as a float32 leaf whose gradient the search reads."""
    return method.virtual_embeddings().detach().float().requires_grad_(True)


def flip_candidates(table: torch.Tensor, grad: torch.Tensor, allowed: torch.Tensor, current: int, k: int) -> list[int]:
    """The k allowed tokens (not `current`) with the largest first-order loss decrease, -(e . g)."""
    scores = -(table @ grad.to(table.dtype)).float()
    scores[~allowed] = -torch.inf
    scores[current] = -torch.inf
    k = min(k, int(torch.isfinite(scores).sum()))
    return scores.topk(k).indices.tolist()


@torch.no_grad()
def flip_losses(backend: Backend, method: AutoPrompt, batch: Batch, candidates: CandidateVocab, slot: int,
                tokens: list[int], max_rows: int = 256) -> list[float]:
    """The batch loss with `slot` set to each of `tokens`, several trials per forward pass."""
    per_pass = max(1, max_rows // len(batch.facts))
    losses: list[float] = []
    for start in range(0, len(tokens), per_pass):
        chunk = tokens[start : start + per_pass]
        big, virtual = trial_rows(backend, method, batch, slot, chunk)
        loss = backend.gold_loss(big, virtual, candidates).view(len(chunk), -1).mean(dim=1)
        losses.extend(loss.tolist())
    return losses


@torch.no_grad()
def trial_rows(backend: Backend, method: AutoPrompt, batch: Batch, slot: int,
               tokens: list[int]) -> tuple[Batch, PromptInputs]:
    """The batch once per trial token, and per row its triggers with `slot` set to that row's trial: (k * B) rows."""
    trials = method.trigger_ids.repeat(len(tokens), 1)  # (k, n_virtual)
    trials[:, slot] = torch.tensor(tokens, device=trials.device)
    virtual = backend.embed(trials).repeat_interleave(len(batch.facts), dim=0)  # (k * B, n_virtual, H)
    return batch.repeat(len(tokens)), PromptInputs(virtual)


def _batches(compiled: CompiledTemplate, facts: list[Fact], candidates: CandidateVocab, batch_size: int,
             pad: int, generator: torch.Generator) -> Iterator[Batch]:
    """Shuffled train batches, epoch after epoch."""
    while True:
        yield from make_batches(compiled, facts, candidates, batch_size, pad, generator)


@dataclass
class Gradient:
    """A search's request: the loss on `batch` and its gradient w.r.t. the trigger embeddings."""

    batch: Batch


@dataclass
class Flips:
    """A search's request: the loss on `batch` with `slot` set to each of `tokens`."""

    batch: Batch
    slot: int
    tokens: list[int]


def search_triggers(backend: Backend, method: AutoPrompt, task: FitTask) -> FitResult:
    """Search trigger tokens on the task's train facts with early stopping on dev P@1; leaves the best-on-dev triggers
    in `method`."""
    search = _search(backend, method, task)
    answer = None
    try:
        while True:
            request = search.send(answer)
            if isinstance(request, Gradient):
                answer = trigger_gradient(backend, method, request.batch, task.candidates)
            else:
                answer = flip_losses(backend, method, request.batch, task.candidates, request.slot, request.tokens)
    except StopIteration as done:
        return done.value
    finally:
        search.close()


def search_together(backend: Backend, tasks: list[FitTask], slots: int) -> Iterator[tuple[int, Fitted]]:
    """The searches of several tasks in step, at most `slots` at once: each iteration's gradients in one pass of the
    LM and every search's re-scored candidates in another (`Backend.pack_loss`); each search keeps its own batches,
    flips, dev checks, patience and log. Yields (index of the task, its Fitted) as each ends; the next one takes its
    slot."""
    waiting = deque(range(len(tasks)))
    active: dict[int, tuple[Iterator, AutoPrompt, object]] = {}  # index -> (search, its method, its pending request)
    try:
        while waiting or active:
            while waiting and len(active) < slots:
                i = waiting.popleft()
                method = create_prompt(backend, tasks[i])
                search = _search(backend, method, tasks[i])
                active[i] = (search, method, next(search))
            answers = _answer_together(backend, {i: (m, tasks[i], r) for i, (_, m, r) in active.items()})
            for i, answer in answers.items():
                search, method, _ = active[i]
                try:
                    active[i] = (search, method, search.send(answer))
                except StopIteration as done:
                    del active[i]
                    yield i, Fitted(method, done.value)
    finally:
        for search, _, _ in active.values():  # interrupted: close the logs and bars of the searches still running
            search.close()


def _answer_together(backend: Backend, requests: dict[int, tuple]) -> dict[int, object]:
    """Every search's pending request: the gradients in one pass, the re-scored candidates in passes of at most
    PACK_ROWS rows (one search's trials are never split)."""
    answers: dict[int, object] = {}
    grads = {i: r for i, r in requests.items() if isinstance(r[2], Gradient)}
    if grads:
        leaves = {i: trigger_leaf(m) for i, (m, _, _) in grads.items()}
        parts = [(r.batch.to(backend.device), PromptInputs(leaves[i]), t.candidates) for i, (_, t, r) in grads.items()]
        losses = [loss.mean() for loss in backend.pack_loss(parts)]
        torch.stack(losses).sum().backward()
        for (i, leaf), loss in zip(leaves.items(), losses, strict=True):
            answers[i] = (loss.item(), leaf.grad)
    flips = {i: r for i, r in requests.items() if isinstance(r[2], Flips)}
    group: list[tuple[int, int, int, tuple]] = []  # (search, its trials, its rows, its part) of the next pass

    def rescore() -> None:
        with torch.no_grad():
            losses = backend.pack_loss([part for _, _, _, part in group])
        for (i, k, _, _), loss in zip(group, losses, strict=True):
            answers[i] = loss.view(k, -1).mean(dim=1).tolist()
        group.clear()

    for i, (m, t, r) in flips.items():
        big, virtual = trial_rows(backend, m, r.batch, r.slot, r.tokens)
        rows = len(r.tokens) * len(r.batch.facts)
        if group and sum(n for _, _, n, _ in group) + rows > PACK_ROWS:
            rescore()
        group.append((i, len(r.tokens), rows, (big.to(backend.device), virtual, t.candidates)))
    if group:
        rescore()
    return answers


def _search(backend: Backend, method: AutoPrompt, task: FitTask):
    """The search as a generator: it yields its requests (Gradient, Flips), is sent their answers, and returns the
    FitResult; `search_triggers` answers one search, `search_together` several in step."""
    compiled, train_facts, dev_facts, candidates = task.compiled, task.train, task.dev, task.candidates
    config: TriggerSearchConfig = task.config
    if config.dev_size and len(dev_facts) > config.dev_size:  # a fixed sample: every check on the same facts
        dev_facts = sorted(random.Random(config.seed).sample(range(len(dev_facts)), config.dev_size))
        dev_facts = [task.dev[i] for i in dev_facts]
    generator = torch.Generator().manual_seed(config.seed)
    table = backend.model.get_input_embeddings().weight.detach()
    allowed = allowed_tokens(backend.tokenizer, table.shape[0], train_facts, config.capitals).to(table.device)
    stream = _batches(compiled, train_facts, candidates, config.batch_size, backend.pad_id, generator)
    ids = method.trigger_ids
    fit = FitLoop(lambda: evaluate_facts(backend, method, compiled, dev_facts, candidates).metrics, ids.clone,
                  config.patience, task.log_path, {"triggers": ids.tolist(), "config": asdict(config)}, config.iterations,
                  task.desc, "it")
    stopped = False
    with fit:
        for step in range(1, config.iterations + 1):
            batch = next(stream).to(backend.device)
            slot = (step - 1) % method.n_virtual
            loss, grad = yield Gradient(batch)
            current = int(ids[slot])
            best_loss, best_token = loss, current
            tokens = flip_candidates(table, grad[slot], allowed, current, config.top_k)
            trials = (yield Flips(batch, slot, tokens)) if tokens else []
            for token, trial in zip(tokens, trials, strict=True):
                if trial < best_loss:
                    best_loss, best_token = trial, token
            ids[slot] = best_token
            entry = {"step": step, "slot": slot, "loss": round(loss, 5), "new_loss": round(best_loss, 5),
                     "token": best_token, "flipped": best_token != current}
            if best_token != current:  # dev changes only when a trigger does
                fit.check(step, entry)
            else:
                fit.skip()
            fit.done(entry, loss=f"{best_loss:.3f}")
            stopped = fit.exhausted
            if stopped:
                break
    ids.copy_(fit.kept_state)
    method.eval()
    return fit.result(stopped)
