"""PEFT adapters out and in (issue 43): a trained prompt exported as a PEFT adapter scores the same through PEFT's
own forward pass as through probe; PEFT's own adapters evaluate in probe as PEFT scores them; the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, cli_in_process
from test_train import default_splits, make_lama

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402

from probe.data import Fact  # noqa: E402
from probe.metrics import ranks_of, relation_metrics  # noqa: E402
from probe.options import Options  # noqa: E402
from probe.peft_adapters import eval_peft  # noqa: E402

FAST = ("--dtype", "float32", "--epochs", "2", "--min-steps", "0", "--batch-size", "4", "--eval-every", "2",
        "--lr", "0.05")


@pytest.fixture(scope="module")
def lama(tmp_path_factory) -> Path:
    return make_lama(tmp_path_factory.mktemp("peft") / "lama", default_splits())


def train(tmp_path: Path, model: Path, lama: Path, method: str, template: str, *extra: str) -> Path:
    out = tmp_path / f"run-{method}"
    proc = cli_in_process("train", "--model", model, "--data", lama, "-r", "P19,P36", "--method", method,
                          "--template", template, "--out", out, *FAST, *extra)
    assert proc.returncode == 0, proc.stderr
    return out


def export(run: Path, out: Path) -> Path:
    proc = cli_in_process("export", run, "--to", "peft", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def peft_scoring(model_dir: Path, adapter: Path, facts: list[Fact], candidates) -> tuple[dict, torch.Tensor]:
    """P@1, P@10 and MRR, and the candidates' logits per fact, through PeftModel's own forward pass, the input being
    probe_prompt.json's input template filled with each subject (or ' [X]' fed with the tokenizer's special tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    meta_file = adapter / "probe_prompt.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {"input_template": " [X]",
                                                                         "add_special_tokens": True}
    facts = [f for f in facts if f.obj in candidates.index]
    rows = []
    with torch.no_grad():
        for fact in facts:
            text = meta["input_template"].replace("[X]", fact.sub)
            ids = torch.tensor([tok(text, add_special_tokens=meta["add_special_tokens"]).input_ids])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            rows.append(logits[candidates.token_ids].float())
    scores = torch.stack(rows)
    gold = torch.tensor([candidates.index[f.obj] for f in facts])
    return relation_metrics(ranks_of(scores, gold).tolist()), scores


def probe_logits(backend, run: Path, rid: str, facts: list[Fact], candidates) -> torch.Tensor:
    """probe's own candidate scores of each fact with the run's saved prompt and template."""
    from probe.evaluate import scored_batches
    from probe.saved_prompts import load_prompt
    from probe.templates import compile_template

    cfg = json.loads((run / rid / "config.json").read_text())
    compiled = compile_template(cfg["template"], backend.tokenizer, "causal", manual=cfg["manual_template"])
    prompt = load_prompt(run / rid / "prompt.safetensors").prompt_inputs()
    facts = [f for f in facts if f.obj in candidates.index]
    with torch.no_grad():
        return torch.cat([s for f in facts for _, s in scored_batches(backend, prompt, compiled, [f], candidates, 1)])


def imported(folder: Path, lama: Path, **kw) -> dict[str, dict]:
    rows = eval_peft(Options(prompts=folder, data=str(lama), dtype="float32", device="cpu", **kw), log=lambda *_: None)
    return {r["relation"]: r for r in rows}


@pytest.mark.parametrize(("method", "template", "peft_type"), [
    ("prompt-tuning", "(10, sub, obj)", "PROMPT_TUNING"),
    ("ptuning", "(6, sub, obj)", "PROMPT_TUNING"),
    ("prefix-tuning", "(6, sub, obj)", "PREFIX_TUNING"),
    ("prompt-tuning", '(4, sub, "was born in", obj)', "PROMPT_TUNING"),
])
def test_an_exported_prompt_scores_the_same_through_peft(method, template, peft_type, tmp_path, lama, tiny_causal_dir,
                                                         causal_backend):
    from probe.vocab import CandidateChoice

    run = train(tmp_path, tiny_causal_dir, lama, method, template)
    out = export(run, tmp_path / "peft")
    assert sorted(p.name for p in out.iterdir()) == ["P19", "P36", "probe_export.json"]
    from probe.data import open_data

    data = open_data(str(lama))
    candidates = CandidateChoice("common").build(causal_backend.tokenizer, data)
    again = imported(out, lama)
    for rid in ("P19", "P36"):
        config = json.loads((out / rid / "adapter_config.json").read_text())
        meta = json.loads((out / rid / "probe_prompt.json").read_text())
        assert config["peft_type"] == peft_type and config["base_model_name_or_path"] == str(Path(tiny_causal_dir).resolve())
        assert meta["relation"] == rid and meta["add_special_tokens"] is False and "[X]" in meta["input_template"]
        if peft_type == "PREFIX_TUNING":  # grouped-query attention: 2 key/value heads of 16, not 4 heads of 64
            assert (config["num_attention_heads"], config["token_dim"], config["num_layers"]) == (2, 32, 2)
        saved = json.loads((run / rid / "metrics.json").read_text())
        facts = data.facts(rid, "test_34k")
        via_peft, peft_logits = peft_scoring(tiny_causal_dir, out / rid, facts, candidates)
        ours = probe_logits(causal_backend, run, rid, facts, candidates)
        assert (peft_logits - ours).abs().max().item() < 1e-5
        assert via_peft["p1"] == saved["p1"] and via_peft["mrr"] == pytest.approx(saved["mrr"], abs=1e-12)
        assert {k: again[rid][k] for k in ("p1", "mrr")} == {k: saved[k] for k in ("p1", "mrr")}
        assert again[rid]["n_facts"] == saved["n_facts"]
