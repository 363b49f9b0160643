"""Packed fitting (probe/pack.py): a pack of prompts trained together gives each prompt what its fit alone gives.

Each prompt's gradient in a pack is exactly its own (the LM is frozen, rows are independent), but float32 sums come
out in another order when a product has more rows (K prompts' rows in one pass), so losses, dev MRR and the saved
prompts agree within TOL = 1e-5 over these few steps at moderate learning rates, not bit for bit (AdamW divides each
step by the gradient's running scale, so a component near zero moves by what its rounding decides: an encoder's own
weights get 10 x TOL); dev P@1, best steps, early stops and retries, decided on those figures, are equal. A pack of
one is the fit alone, bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load
from test_train import CANDIDATES, MANUAL, SUBJECTS, candidates_for

from probe.backends.llama_forward import SDPA_GQA
from probe.data import Fact
from probe.fit import FitTask, fit
from probe.methods import get_method
from probe.pack import Pack, fit_pack, packed
from probe.saved_prompts import prompt_bytes
from probe.templates import compile_template
from probe.trainer import TrainConfig

TOL = 1e-5
SHAPES = {"masked": "(2, sub, 2, obj, 1)", "causal": "(2, sub, 2, obj)"}


def tasks_for(backend, method: str, tmp_path, tag: str) -> list[FitTask]:
    """Three fits that end differently: one learns and runs its steps out, one stops early on patience, and one whose
    lr is too small to move dev P@1 is retried and flagged. Their templates differ (so do their virtual tokens)."""
    cands = candidates_for(backend)
    cls = get_method(method)
    shape = SHAPES[backend.kind] if method != "prefix-tuning" else cls.default_shapes[backend.kind]
    learn = [Fact(s, CANDIDATES[i % 3]) for i, s in enumerate(SUBJECTS[:12])]
    other = [Fact(s, CANDIDATES[3 + i % 2]) for i, s in enumerate(SUBJECTS[4:14])]
    settings = [
        (shape, learn, learn[:6], TrainConfig(lr=0.01, batch_size=4, epochs=2, min_steps=0, eval_every=1, patience=50,
                                               seed=3)),
        ("(1, sub, 3, obj)" if backend.kind == "causal" and method != "prefix-tuning" else shape, other, other[:5],
         TrainConfig(lr=0.01, batch_size=3, epochs=4, min_steps=0, eval_every=1, patience=2, seed=5)),
        (shape, learn[:4], learn[:4], TrainConfig(lr=1e-9, batch_size=4, epochs=1, min_steps=0, eval_every=1,
                                                   patience=50, seed=7)),
    ]
    out = []
    for k, (template, train, dev, config) in enumerate(settings):
        compiled = compile_template(template, backend.tokenizer, backend.kind, manual=MANUAL)
        out.append(FitTask(compiled, train, dev, cands, config, cls, None, MANUAL, tmp_path / f"{tag}-{k}.jsonl",
                           f"{tag}{k}"))
    return out


def log_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("slots", [1, 3])
@pytest.mark.parametrize("method", ["ptuning", "prompt-tuning", "prefix-tuning"])
@pytest.mark.parametrize("which", ["causal_backend", "sharp_masked_backend"])
def test_a_pack_gives_each_prompt_its_fit_alone(request, which, method, slots, tmp_path):
    if method == "prefix-tuning" and slots > 1 and which == "causal_backend" and not SDPA_GQA:
        # torch < 2.5 has no enable_gqa: the pack's fused attention repeats the KV heads, and its sums round otherwise;
        # every loss and dev figure still agree, a saved key drifts past the bound (seen on torch 2.4.0 and 2.4.1)
        request.applymarker(pytest.mark.xfail(reason="torch < 2.5: prefix keys of a pack round past the bound",
                                              strict=False))
    backend = request.getfixturevalue(which)
    tol = TOL if slots > 1 else 0.0
    alone = [fit(backend, task) for task in tasks_for(backend, method, tmp_path, "alone")]
    together = dict(fit_pack(backend, tasks_for(backend, method, tmp_path, "pack"), slots=slots))
    assert sorted(together) == [0, 1, 2]
    steps = set()
    for k, solo in enumerate(alone):
        pack = together[k]
        a, b = solo.result, pack.result
        assert (a.best_step, a.steps, a.stopped_early) == (b.best_step, b.steps, b.stopped_early), k
        assert [(x["lr"], x["steps"], x["best_step"], x["dev_p1"]) for x in a.attempts] == \
            [(x["lr"], x["steps"], x["best_step"], x["dev_p1"]) for x in b.attempts]
        assert a.best_dev["p1"] == b.best_dev["p1"] and a.best_dev["mrr"] == pytest.approx(b.best_dev["mrr"], abs=tol)
        logs = log_of(tmp_path / f"alone-{k}.jsonl"), log_of(tmp_path / f"pack-{k}.jsonl")
        assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]]
        for x, y in zip(*logs, strict=True):
            assert x.get("dev_p1") == y.get("dev_p1")
            for key in ("loss", "dev_mrr"):
                # the log rounds to 5 decimals: within TOL plus one rounding step
                assert x.get(key) == pytest.approx(y.get(key), abs=2 * tol), (k, x["step"], key)
        saved = load(prompt_bytes(solo.prompt)), load(prompt_bytes(pack.prompt))
        assert saved[0].keys() == saved[1].keys()
        for name in saved[0]:
            # the encoder's own weights (ptuning's biLSTM, ...) are AdamW's steps on gradients whose tiny components
            # round differently: 10 x TOL. What evaluation uses (the vectors, keys and values) is the encoder's output,
            # those weights' differences carried through its layers, so it is bounded relative to its scale: 100 x TOL
            # x its largest value. How closely the two agree depends on the kernels: on this machine's defaults
            # within TOL, but under ATen's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2) a pack's sums round differently
            # from a lone fit's, and prefix-tuning's keys (values up to 7.7) then differed by up to 9e-4, with every
            # loss and dev figure still equal; BENCHMARKS.md, "The test suite, on this machine's kernels and on two
            # others"
            scale = max(1.0, float(saved[1][name].abs().max()))
            bound = 10 * tol if name.startswith("method.") else 100 * tol * scale
            assert torch.allclose(saved[0][name], saved[1][name], atol=bound, rtol=0), (k, name)
        steps.add(a.steps)
    assert len(steps) == 3  # the three stopped at different steps
    assert alone[1].result.stopped_early and alone[2].result.failed and len(alone[2].result.attempts) == 2


def test_slots_pace_a_pack_and_its_order_is_kept(causal_backend, tmp_path):
    """With fewer slots than tasks, the next task takes the slot of one that finished; every task is fit once."""
    tasks = tasks_for(causal_backend, "prompt-tuning", tmp_path, "slots")
    order = [i for i, _ in fit_pack(causal_backend, tasks, slots=2)]
    assert sorted(order) == [0, 1, 2] and order[-1] == 2  # task 2 waits for a slot


def test_packs_are_the_same_whatever_runs_them():
    """Cells become packs of `size` by model and method, in order: the partition depends on nothing else."""
    from dataclasses import dataclass

    @dataclass
    class Cell:
        key: str
        model: str
        method: str

    cells = [Cell(f"c{i}", "m", "ptuning" if i < 5 else "prompt-tuning") for i in range(7)]
    packs = packed(cells, 2)
    assert all(isinstance(p, Pack) for p in packs)
    assert [[c.key for c in p.cells] for p in packs] == [["c0", "c1"], ["c2", "c3"], ["c4"], ["c5", "c6"]]
    assert packed(cells, 1) == cells
