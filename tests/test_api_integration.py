"""The Python API on SmolLM2 and the real LAMA, each in a fresh Python process: the CLI's figures, and the README's
example as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, lama_root, run_cli

pytestmark = pytest.mark.integration


def run_python(code: str, cwd, timeout: float = 1200) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that imports this checkout's probe, with PROBE_DATA the real LAMA folder as an
    absolute path (make test gives it relative to the checkout, and the code runs elsewhere)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PROBE_DATA": str(lama_root().resolve())}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_evaluate_all_relations_gives_probe_evals_figures(tmp_path, lama_dir, smollm2_dir):
    """Manual prompts on all 41 relations from Python, two torch threads (torch's own on the 2-core machine): macro
    P@1 14.60247 on 27,865 facts, the figure `probe eval --all --threads 2` gives (the issue's 14.6025; BENCHMARKS.md,
    on an AMX and an EPYC CPU alike). `probe eval` then runs four of the relations: the same
    figures, relation by relation (the whole 41 once more would double the test's time)."""
    code = f"""
import json, probe
model = probe.load_model("smollm2", device="cpu")
res = probe.evaluate(model, relations="all", method="manual", data={str(lama_dir)!r}, threads=2)
print(json.dumps({{"macro_p1": res.macro_p1, "n_facts": res.n_facts,
                  "rows": {{r["relation"]: r for r in res.rows}}}}))
"""
    ours = last_json(run_python(code, tmp_path))
    assert not any(tmp_path.iterdir())  # nothing written without out=
    assert (round(ours["macro_p1"], 5), ours["n_facts"]) == (14.60247, 27865)
    some = ["P1376", "P138", "P19", "P1412"]
    cli = run_cli("eval", "-r", ",".join(some), "--threads", "2", "--data", lama_dir, "--out", tmp_path / "cli",
                  timeout=1200)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    rows = json.loads((tmp_path / "cli" / "results.json").read_text())["relations"]
    assert sorted(r["relation"] for r in rows) == sorted(some)
    for row in rows:
        for key in ("n_facts", "p1", "p10", "mrr"):
            assert ours["rows"][row["relation"]][key] == row[key], (row["relation"], key)


FIT = ["--max-train", "96", "--epochs", "1", "--min-steps", "0", "--eval-every", "2"]  # a short fit: 6 steps


def test_train_gives_probe_trains_figures(tmp_path, lama_dir, smollm2_dir):
    """ptuning on P1376, seed 13, two threads, a short fit: the same test P@1, dev figures and prompt from Python as
    from `probe train` with the same flags (the default fit gave byte-equal prompts too: BENCHMARKS.md, issue 42)."""
    code = f"""
import json, probe
model = probe.load_model("smollm2", device="cpu")
res = probe.train(model, relations=["P1376"], method="ptuning", seed=13, data={str(lama_dir)!r}, threads=2,
                  max_train=96, epochs=1, min_steps=0, eval_every=2)
res.prompts["P1376"].save("prompt")
print(json.dumps(res.relations.iloc[0].to_dict(), default=str))
"""
    ours = last_json(run_python(code, tmp_path))
    cli = run_cli("train", "--method", "ptuning", "-r", "P1376", "--seed", "13", "--threads", "2", "--data", lama_dir,
                  *FIT, "--out", tmp_path / "cli", timeout=1200)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    (row,) = json.loads((tmp_path / "cli" / "results.json").read_text())["relations"]
    for key in ("p1", "p10", "mrr", "dev_p1", "manual_p1", "n_facts"):
        assert ours[key] == row[key], key
    assert (tmp_path / "prompt" / "prompt.safetensors").read_bytes() == (tmp_path / "cli" / "P1376" /
                                                                          "prompt.safetensors").read_bytes()


def test_the_readme_example_runs_as_written(tmp_path, lama_dir, smollm2_dir):
    """README.md's "Use from Python" example, copied from the README, in a fresh process (PROBE_DATA names the data)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Use from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "macro P@1" in proc.stdout and (tmp_path / "runs" / "ptuning-p36" / "results.json").is_file()
    assert (tmp_path / "p36-prompt" / "prompt.safetensors").is_file()
