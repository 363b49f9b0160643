"""Shared fixtures: the real LAMA folder, tiny masked/causal LMs built on the spot, fake LAMA folders.

Environment set at import, before anything loads a model:
- PROBE_CACHE points at a test-only cache ($PROBE_TEST_CACHE, else <tmp>/probe-test-cache), so the
  SmolLM2 GGUF -> safetensors conversion (~25 s) happens once per machine and never touches a user's cache;
- HF_HUB_OFFLINE: nothing may reach the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ["PROBE_CACHE"] = os.environ.get("PROBE_TEST_CACHE") or str(Path(tempfile.gettempdir()) / "probe-test-cache")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Words every tiny vocabulary holds; tests use them as subjects, objects and template words.
TEST_WORDS = [
    "was", "born", "in", "is", "the", "of", "a", "capital", "city", "language", "official", "died",
    "Paris", "France", "Rome", "Italy", "Berlin", "Germany", "Madrid", "Spain", "London", "England",
    "Tokyo", "Japan", "Lyon", "Milan", "Dante", "Alighieri", "Florence", "Victor", "Hugo", "Besancon",
    "French", "Italian", "German", "English", "Aaron", "Abbey", "Abraham", "Abel", "Abigail", ".", ",", "'", "s",
]
WORDPIECES = ["##s", "##ing", "##ed", "##ville", "##ton", "##er"]


def lama_root() -> Path:
    """The real LAMA folder: $PROBE_DATA, else shared/lama beside the repository."""
    if os.environ.get("PROBE_DATA"):
        return Path(os.environ["PROBE_DATA"])
    return Path(__file__).parents[1] / ".." / "shared" / "lama"


@pytest.fixture(scope="session")
def lama_dir() -> Path:
    """The real LAMA folder, as an absolute path (subprocesses run from the repository root)."""
    root = lama_root()
    if not (root / "relations" / "relations.jsonl").exists():
        pytest.skip(f"real LAMA data not found at {root} (set PROBE_DATA)")
    return root.resolve()


# ---------------------------------------------------------------------------------------------
# Tiny masked LM with a real WordPiece tokenizer
# ---------------------------------------------------------------------------------------------


COMMON_SLOTS = 300  # rows of the tiny vocabulary for LAMA's common words, whether the data is there or not


def _common_words(taken: list[str]) -> list[str]:
    """LAMA's first common words not already taken, padded with `[unusedN]` to `COMMON_SLOTS` words.

    The test words come first and the size is fixed, so the tiny models' ids and weights do not depend on
    whether the real data is present; only tests that need the data see real words in the other slots.
    """
    path = lama_root() / "vocab" / "common_vocab_cased.txt"
    words = path.read_text(encoding="utf-8").split("\n") if path.exists() else []
    common = [w for w in dict.fromkeys(w.strip() for w in words) if w.isalpha() and w not in taken][:COMMON_SLOTS]
    return common + [f"[unused{i}]" for i in range(COMMON_SLOTS - len(common))]


@pytest.fixture(scope="session")
def wordpiece_vocab_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wordpiece")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    fixed = list(dict.fromkeys([*TEST_WORDS, *WORDPIECES]))
    words = fixed + _common_words(fixed)
    path = folder / "vocab.txt"
    path.write_text("\n".join(specials + words) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def wordpiece_tokenizer(wordpiece_vocab_file):
    from transformers import BertTokenizer

    # a local folder holding vocab.txt: the real WordPiece loading path, cased
    return BertTokenizer.from_pretrained(str(wordpiece_vocab_file.parent), do_lower_case=False)


@pytest.fixture(scope="session")
def tiny_masked_dir(tmp_path_factory, wordpiece_tokenizer) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(wordpiece_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=wordpiece_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    with torch.no_grad():  # a non-zero output bias, so a scorer that forgets it is caught
        model.cls.predictions.bias.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(folder)
    wordpiece_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def masked_backend(tiny_masked_dir):
    from probe.backends import load_backend

    return load_backend(str(tiny_masked_dir))


# ---------------------------------------------------------------------------------------------
# SmolLM2 tokenizer and a tiny causal LM on it
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M folder (converted once into the test cache)."""
    from probe.backends import gguf_cache_folder, smollm2_gguf
    from probe.errors import ProbeError

    try:
        gguf = smollm2_gguf()
    except ProbeError as e:
        pytest.skip(str(e))
    return gguf_cache_folder(gguf)


@pytest.fixture(scope="session")
def bpe_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def save_tiny_llama(folder: Path, tokenizer, seed: int = 0, edit=None, **config_kw) -> Path:
    """A tiny LlamaForCausalLM on the SmolLM2 tokenizer, saved with it; `edit(model)` may change weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    kw.update(config_kw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory, bpe_tokenizer) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), bpe_tokenizer)


@pytest.fixture(scope="session")
def causal_backend(tiny_causal_dir):
    from probe.backends import load_backend

    return load_backend(str(tiny_causal_dir))


# ---------------------------------------------------------------------------------------------
# Fake LAMA folders
# ---------------------------------------------------------------------------------------------

FAKE_RELATIONS = [
    {"relation": "P19", "template": "[X] was born in [Y] .", "label": "place of birth", "type": "N-1"},
    {"relation": "P36", "template": "The capital of [X] is [Y] .", "label": "capital", "type": "1-1"},
    {"relation": "P37", "template": "The official language of [X] is [Y] .", "label": "official language",
     "type": "N-M"},
    {"relation": "P166", "template": "[X] was awarded the [Y] .", "label": "award received", "type": "N-M"},
]
FAKE_FACTS = {
    "P19": [("Dante", "Florence"), ("Victor Hugo", "Besancon"), ("Dante", "Florence"), ("Berlin", "Paris")],
    "P36": [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin")],
    "P37": [("France", "French"), ("Italy", "Italian"), ("Germany", "German"), ("England", "English")],
}
FAKE_VOCAB = ["Paris", "Rome", "Berlin", "Florence", "French", "Italian", "German", "English", "Paris"]


@contextlib.contextmanager
def model_in_dtype(model: torch.nn.Module, dtype: torch.dtype):
    """The shared tiny `model` cast to `dtype` inside the block, then its float32 weights restored bit for bit
    (a cast to bfloat16 and back would leave them rounded for every later test)."""
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(dtype)
    try:
        yield model
    finally:
        model.to(torch.float32)
        model.load_state_dict(weights)


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_fake_lama(root: Path, facts: dict | None = None, vocab: list[str] | None = None,
                   relations: list[dict] | None = None) -> Path:
    """A small LAMA-shaped folder: relations.jsonl, the same facts in every split, a common vocab."""
    facts = FAKE_FACTS if facts is None else facts
    write_jsonl(root / "relations" / "relations.jsonl", FAKE_RELATIONS if relations is None else relations)
    for split in ("test_34k", "test_29k", "train", "dev"):
        (root / "trex" / split).mkdir(parents=True, exist_ok=True)
        for rid, pairs in facts.items():
            rows = [{"predicate_id": rid, "sub_label": s, "obj_label": o} for s, o in pairs]
            write_jsonl(root / "trex" / split / f"{rid}.jsonl", rows)
    (root / "vocab").mkdir(parents=True, exist_ok=True)
    words = FAKE_VOCAB if vocab is None else vocab
    (root / "vocab" / "common_vocab_cased.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def fake_lama(tmp_path) -> Path:
    return make_fake_lama(tmp_path / "lama")


# ---------------------------------------------------------------------------------------------
# Running the CLI as a user does
# ---------------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`probe ARGS` in a fresh interpreter, through cli.main() as the console script runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", *map(str, args)],
        cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def cli_in_process(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`probe ARGS` through cli.main() in this interpreter (no new Python, no second torch import): its exit code,
    stdout and stderr, as `run_cli` returns them. For a test about the process itself, use `run_cli`."""
    import io
    from contextlib import chdir, redirect_stderr, redirect_stdout

    import cli

    out, err = io.StringIO(), io.StringIO()
    argv, code = sys.argv, 0
    sys.argv = ["probe", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err), chdir(cwd or REPO):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["probe", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str, only_line: bool = True) -> str:
    """Exit code 2, one `error:` line on stderr (the only line unless only_line=False), no traceback."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert proc.returncode == 2, (proc.returncode, out)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert lines[-1] == errors[0], proc.stderr
    if only_line:
        assert lines == errors, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture(scope="session")
def sharp_masked_backend(tmp_path_factory, wordpiece_tokenizer):
    """A tiny BERT with a wide initialisation, so that its [MASK] scores move with the prompt (training tests)."""
    from transformers import BertConfig, BertForMaskedLM

    from probe.backends import load_backend

    tok = wordpiece_tokenizer
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                        initializer_range=0.2)
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    folder = tmp_path_factory.mktemp("sharp-bert")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_backend(str(folder))


# ---------------------------------------------------------------------------------------------
# Running a command's own cells on a model already loaded (what `probe train` / `probe eval` run)
# ---------------------------------------------------------------------------------------------


def train_here(backend, data, ids, candidates, run, method, options, config, templates, split="test_34k") -> dict:
    """`probe train`'s cells for the relations `ids`, run in this process on a loaded backend; returns the results."""
    from probe.cells import InProcess, LoadedModel
    from probe.commands.common import execute
    from probe.commands.train import train_cells

    loaded = LoadedModel(backend, data, candidates)
    cells = train_cells(loaded.spec, backend, data, list(ids), run, method, options, config, templates, split)
    (results,) = execute(InProcess(data, loaded=loaded), [run], cells, "train", log=lambda *_: None)
    return results


def eval_here(backend, data, ids, candidates, run, split="test_34k", batch_size=128, prompts=None, control="none",
              from_sentences=False) -> dict:
    """`probe eval`'s cells for the relations `ids`, run in this process on a loaded backend; returns the results."""
    from probe.cells import InProcess, LoadedModel
    from probe.commands.common import execute
    from probe.commands.eval import eval_cells

    loaded = LoadedModel(backend, data, candidates)
    cells = eval_cells(loaded.spec, run, list(ids), split, batch_size, prompts, control, from_sentences)
    (results,) = execute(InProcess(data, loaded=loaded), [run], cells, "eval", log=lambda *_: None)
    return results


def write_relation(run, rid: str, metrics: dict, predictions: list[dict] | None = None) -> None:
    """A finished relation's files in a run folder, as a cell's output is written (predictions, then metrics)."""
    from probe.cells import write_output
    from probe.commands.common import relation_output
    from probe.commands.eval import EvalCell

    run.create() if not (run.root / "config.json").exists() else None
    write_output(EvalCell(rid, None, run.root, "test"), relation_output(rid, metrics, predictions))
