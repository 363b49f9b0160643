"""Facts of one's own and LAMA's other corpora: facts files, facts folders, cloze sentences, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_user_error, cli_in_process, write_jsonl
from typer.testing import CliRunner

import cli
from probe.data import Fact, FactFiles, FactsFolder, infer_type, open_data
from probe.errors import ProbeError
from probe.evaluator import evaluate_facts
from probe.methods.manual import ManualPrompt
from probe.templates import ClozeTemplate, compile_template
from probe.vocab import build_candidates

GOOGLE_RE = REPO / "tests" / "fixtures" / "google_re"
CAPITALS = "country,capital\nFrance,Paris\nItaly,Rome\nGermany,Berlin\nEngland,London\nSpain,Madrid\n"


def invoke(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def error_of(*args) -> str:
    res = invoke(*args)
    assert isinstance(res.exception, ProbeError), (res.exit_code, res.output, res.exception)
    return str(res.exception)


# ---- reading --------------------------------------------------------------------------------


def test_relation_type_is_inferred_from_the_facts():
    assert infer_type([Fact("a", "x"), Fact("b", "y")]) == "1-1"
    assert infer_type([Fact("a", "x"), Fact("b", "x")]) == "N-1"
    assert infer_type([Fact("a", "x"), Fact("a", "y")]) == "N-M"


def test_a_csv_with_named_fields_is_one_relation_named_after_the_file(tmp_path):
    path = tmp_path / "capitals.csv"
    path.write_text(CAPITALS)
    with pytest.raises(ProbeError, match=r"capitals.csv:2: expected a subject and an object \(sub_label/subject"):
        FactFiles(path)
    data = open_data(facts=path, fields="country,capital")
    (rel,) = data.relations.values()
    assert (rel.id, rel.type, rel.type_inferred, rel.template) == ("capitals", "1-1", True, "")
    assert data.facts("capitals") == [Fact("France", "Paris"), Fact("Italy", "Rome"), Fact("Germany", "Berlin"),
                                      Fact("England", "London"), Fact("Spain", "Madrid")]
    assert data.facts("capitals", "train") == [] and data.split_name(None) == "test"
    assert data.vocab_words("objects") == ["Paris", "Rome", "Berlin", "London", "Madrid"]
    assert data.spec() == {"facts": {"test": str(path.resolve())}, "fields": ["country", "capital"], "dev_split": None,
                           "seed": 13}


def test_google_re_records_as_they_are(tmp_path):
    data = open_data(facts=GOOGLE_RE / "place_of_birth_test.jsonl")
    assert list(data.relations) == ["place_of_birth"]  # the last segment of pred
    facts = data.facts("place_of_birth")
    assert [(f.sub, f.obj) for f in facts] == [("Dante", "Florence"), ("Victor Hugo", "Besancon"), ("Milan", "Paris"),
                                               ("Hugo", "Paris")]  # the repeated (Dante, Florence) dropped
    assert facts[0].sentence == "Dante, the poet of the Commedia, was born in [MASK] in 1265."  # the first one kept
    assert data.relation("place_of_birth").type == "N-1"


def test_a_folder_with_any_relation_names_and_only_a_test_split(tmp_path):
    root = tmp_path / "mine"
    write_jsonl(root / "test" / "place_of_birth.jsonl", [{"subject": "Dante", "object": "Florence"},
                                                         {"subject": "Victor Hugo", "object": "Paris"}])
    write_jsonl(root / "test" / "PlaceOfDeath.jsonl", [{"sub_label": "Dante", "obj_label": "Ravenna"}])
    write_jsonl(root / "relations.jsonl", [{"relation": "place_of_birth", "template": "[X] was born in [Y] .",
                                           "label": "born in", "type": "N-1"}])
    data = open_data(root)
    assert isinstance(data, FactsFolder) and list(data.relations) == ["PlaceOfDeath", "place_of_birth"]
    assert data.relation("place_of_birth").template == "[X] was born in [Y] ."
    assert not data.relation("place_of_birth").type_inferred and data.relation("PlaceOfDeath").type_inferred
    assert data.facts("place_of_birth", "train") == []
    with pytest.raises(ProbeError) as e:
        data.relation("P19")
    assert str(e.value) == "unknown relation 'P19': expected one of the relations (PlaceOfDeath, place_of_birth)"
    res = invoke("data", "info", "--data", root)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-1] == f"2 relations in {root.resolve()}; facts (deduplicated): train 0, dev 0, test 3"
    assert "1-1*" in res.stdout  # PlaceOfDeath's type, inferred
    # no template for PlaceOfDeath: one error line naming it, before any model loads
    assert error_of("eval", "--data", root, "--all", "--model", tmp_path / "no-model") == (
        "relation 'PlaceOfDeath' has no template: give --template '[X] ... [Y] .' (one for every relation) or a "
        "template file with a 'PlaceOfDeath: [X] ... [Y]' line")
    assert "unknown split 'test_34k'" in error_of("eval", "--data", root, "-r", "place_of_birth", "--split", "test_34k")



def test_everything_downstream_runs_on_a_folder_of_named_relations(tmp_path, tiny_masked_dir):
    """eval --all and --relation, then compare, on relations not named like P19 and with only a test split."""
    root = tmp_path / "mine"
    write_jsonl(root / "test" / "born_in.jsonl", [{"subject": "Dante", "object": "Florence"},
                                                  {"subject": "Victor Hugo", "object": "Paris"}])
    write_jsonl(root / "test" / "capital_of.jsonl", [{"subject": "France", "object": "Paris"},
                                                     {"subject": "Italy", "object": "Rome"}])
    templates = tmp_path / "t.txt"
    templates.write_text("born_in: [X] was born in [Y] .\ncapital_of: The capital of [X] is [Y] .\n")
    runs = []
    for name, args in (("all", ["--all"]), ("one", ["--relation", "capital_of"])):
        out = tmp_path / name
        res = invoke("eval", "--data", root, *args, "--template", templates, "--model", tiny_masked_dir, "--vocab",
                     "objects", "--out", out)
        assert res.exit_code == 0, res.output
        runs.append(out)
    rows = json.loads((runs[0] / "results.json").read_text())["relations"]
    assert [(r["relation"], r["n_facts"], r["template"]) for r in rows] == [
        ("born_in", 2, "[X] was born in [Y] ."), ("capital_of", 2, "The capital of [X] is [Y] .")]
    one = json.loads((runs[1] / "results.json").read_text())["relations"]
    assert one == [rows[1]]  # the same relation, the same figures
    res = invoke("compare", *runs, "--out", tmp_path / "cmp")
    assert res.exit_code == 0, res.output
    assert "macro/micro over the 1 relations present in all 2 runs" in res.stdout
    assert f"left out: born_in (not in {runs[1]})" in res.stdout


# ---- evaluating ------------------------------------------------------------------------------


def test_a_five_line_csv_of_ones_own_facts_in_one_command(tmp_path, tiny_causal_dir):
    path = tmp_path / "capitals.csv"
    path.write_text(CAPITALS.replace("country,capital", "subject,object"))
    out = tmp_path / "run"
    res = invoke("eval", "--facts", path, "--template", "The capital of [X] is [Y] .", "--model", tiny_causal_dir,
                 "--vocab", "objects", "--out", out, "--dtype", "float32")
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    assert cfg["data"] == str(path.resolve()) and cfg["data_spec"]["facts"] == {"test": str(path.resolve())}
    assert cfg["vocab"] == "objects" and cfg["n_candidates"] == 5 and cfg["split"] == "test"
    (row,) = results["relations"]
    assert (row["relation"], row["n_facts"], row["template"], row["type"], row["type_inferred"]) == (
        "capitals", 5, "The capital of [X] is [Y] .", "1-1", True)
    # the same figures as the evaluator run by hand on these facts
    from probe.backends import load_backend

    b = load_backend(str(tiny_causal_dir))
    cands = build_candidates(b.tokenizer, ["Paris", "Rome", "Berlin", "London", "Madrid"])
    facts = open_data(facts=path).facts("capitals")
    by_hand = evaluate_facts(b, ManualPrompt(0, b.hidden_size), compile_template("The capital of [X] is [Y] .",
                                                                                  b.tokenizer, "causal"), facts, cands)
    assert (row["p1"], row["mrr"]) == (by_hand.metrics["p1"], by_hand.metrics["mrr"])


def test_google_re_through_facts_with_the_shipped_templates(tmp_path, tiny_masked_dir):
    out = tmp_path / "run"
    res = invoke("eval", "--facts", GOOGLE_RE / "place_of_birth_test.jsonl", "--model", tiny_masked_dir,
                 "--vocab", "objects", "--out", out)
    assert res.exit_code == 0, res.output
    (row,) = json.loads((out / "results.json").read_text())["relations"]
    assert row["relation"] == "place_of_birth" and row["template"] == "[X] was born in [Y] ."  # templates/google_re.txt
    assert row["n_facts"] == 4


def test_cloze_sentences_are_the_inputs(tmp_path, masked_backend, causal_backend, tiny_masked_dir):
    fact = Fact("Dante", "Florence", "Dante was born in [MASK] , a city .")
    masked = ClozeTemplate.compile(masked_backend.tokenizer, "masked").encode_fact(fact)
    tok = masked_backend.tokenizer
    assert tok.convert_ids_to_tokens(masked.input_ids) == ["[CLS]", "Dante", "was", "born", "in", "[MASK]", ",", "a",
                                                           "city", ".", "[SEP]"]
    assert masked.target == 5 and masked.virtual_positions == []
    causal = ClozeTemplate.compile(causal_backend.tokenizer, "causal").encode_fact(fact)
    assert causal.input_ids == causal_backend.tokenizer.encode("Dante was born in", add_special_tokens=False)
    assert causal.target == len(causal.input_ids) - 1  # only the text before [MASK]
    out = tmp_path / "run"
    res = invoke("eval", "--facts", GOOGLE_RE / "place_of_birth_test.jsonl", "--from-sentences", "--model",
                 tiny_masked_dir, "--vocab", "objects", "--out", out)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["from_sentences"] is True
    preds = [json.loads(x) for x in (out / "place_of_birth" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["sub"] for p in preds) == ["Dante", "Hugo", "Milan", "Victor Hugo"]
    # each fact ran its own sentence: the scores of a fact equal the model's at its sentence's [MASK]
    cands = build_candidates(tok, open_data(facts=GOOGLE_RE / "place_of_birth_test.jsonl").vocab_words("objects"))
    facts = open_data(facts=GOOGLE_RE / "place_of_birth_test.jsonl").facts("place_of_birth")
    for f in facts:
        ids = torch.tensor([tok.encode(f.sentence)])
        with torch.no_grad():
            logits = masked_backend.model(input_ids=ids).logits[0, int((ids[0] == tok.mask_token_id).nonzero())]
        scores = logits[cands.token_ids]
        rank = int((scores > scores[cands.index[f.obj]]).sum()) + 1
        assert next(p["rank"] for p in preds if p["sub"] == f.sub) == rank, f


# ---- training ----------------------------------------------------------------------------------


def test_training_on_ones_own_files_with_a_dev_share(tmp_path, tiny_causal_dir):
    pairs = [(s, o) for s, o in zip(["Dante", "Victor", "Hugo", "Alighieri", "Besancon", "Aaron", "Abbey", "Abraham",
                                     "Abel", "Abigail"], ["Paris", "Rome"] * 5, strict=True)]
    train = tmp_path / "train.jsonl"
    write_jsonl(train, [{"subject": s, "object": o, "relation": "lives_in"} for s, o in pairs])
    test = tmp_path / "test.jsonl"
    write_jsonl(test, [{"subject": "Victor Hugo", "object": "Paris", "relation": "lives_in"},
                       {"subject": "Milan", "object": "Rome", "relation": "lives_in"}])
    out = tmp_path / "run"
    res = invoke("train", "--train-facts", train, "--facts", test, "--dev-split", "0.2", "--manual-template",
                 "[X] lives in [Y] .", "--model", tiny_causal_dir, "--dtype", "float32", "--vocab", "objects",
                 "--epochs", "1", "--min-steps", "0", "--batch-size", "4", "--out", out, "--all")
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["data_spec"]["dev_split"] == 0.2 and results["config"]["split"] == "test"
    cfg = json.loads((out / "lives_in" / "config.json").read_text())
    assert (cfg["n_train"], cfg["n_dev"], cfg["manual_template"]) == (8, 2, "[X] lives in [Y] .")
    (row,) = results["relations"]
    assert row["n_facts"] == 2 and "manual_p1" in row
    again = invoke("eval", "--prompts", out)  # the prompts reload from the recorded files
    assert again.exit_code == 0, again.output
    assert "1 of 1 relations reproduce the saved test figures exactly" in again.stdout


# ---- errors: one line, exit 2 -------------------------------------------------------------------


def test_bad_facts_files_are_one_error_line(tmp_path, fake_lama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"subject": "Dante", "object": "Florence"}\n{"subject": "Rome"}\n')
    assert_user_error(cli_in_process("eval", "--facts", bad, "--template", "[X] is [Y] ."),
                      f"{bad}:2: expected a subject and an object")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert_user_error(cli_in_process("data", "info", "--facts", empty), f"facts file {empty} is empty")
    other = tmp_path / "facts.xlsx"
    other.write_bytes(b"PK\x03\x04 not a text file")
    assert_user_error(cli_in_process("data", "info", "--facts", other), "expected JSONL (one JSON object a line) or CSV")
    binary = tmp_path / "sheet.xlsx"
    binary.write_bytes(b"PK\x03\x04\x14\x00\x06\x00\x08\x00\xff\xfe\x9c")  # not UTF-8: still one line, no traceback
    assert_user_error(cli_in_process("data", "info", "--facts", binary), "or CSV with a header row, as UTF-8 text")
    ok = tmp_path / "ok.csv"
    ok.write_text("subject,object\nDante,Florence\n")
    assert error_of("eval", "--facts", ok, "--template", "[X] was born in .", "--all") == (
        "template '[X] was born in .': expected a shape '(...)' or a manual template with [X] and [Y]")
    assert error_of("eval", "--facts", ok, "--data", fake_lama, "--all") == (
        "give either --data (a folder) or facts files (--facts, --train-facts, --dev-facts), not both")
    assert error_of("eval", "--facts", ok, "--fields", "subject", "--all") == (
        "--fields 'subject': expected SUBJECT,OBJECT, the two field names, e.g. sub_label,obj_label")
    assert error_of("eval", "--facts", ok, "--template", "[X] is [Y] .", "--vocab", tmp_path / "none.txt", "--all") == (
        f"unknown vocab '{tmp_path / 'none.txt'}': expected one of common, 29k, objects, or a file of one candidate "
        "word a line")
    assert error_of("train", "--facts", ok, "--dev-split", "0.2", "--all") == (
        "--dev-split holds out a share of --train-facts: give --train-facts too")


def test_a_vocabulary_file_of_ones_own(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("Paris\nRome\n\nParis\n")
    data = open_data(facts=GOOGLE_RE / "place_of_birth_test.jsonl")
    assert data.vocab_words(str(words)) == ["Paris", "Rome"]


def test_the_shipped_google_re_templates():
    from probe.template_files import parse_template_file

    entries = parse_template_file(Path(REPO / "templates" / "google_re.txt")).entries
    assert {k: t.source for k, t in entries.items()} == {
        "place_of_birth": "[X] was born in [Y] .", "date_of_birth": "[X] (born [Y]).", "place_of_death": "[X] died in [Y] ."}


def test_an_imported_folder_is_listed_and_evaluated(tmp_path, tiny_masked_dir):
    """`probe data import` on LAMA's layout, then `data info` and `eval` on what it built."""
    out = tmp_path / "lama"
    res = invoke("data", "import", REPO / "tests" / "fixtures" / "lama_data" / "data", "--out", out)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].split() == ["corpus", "relations", "records", "files", "read", "files", "written"]
    info = invoke("data", "info", "--data", out / "google_re")
    assert info.exit_code == 0, info.output
    rows = [ln.split()[0] for ln in info.stdout.splitlines()[1:] if ln.strip() and not ln.startswith("3 relations")]
    assert rows == ["date_of_birth", "place_of_birth", "place_of_death"]
    assert info.stdout.splitlines()[-1] == (f"3 relations in {(out / 'google_re').resolve()}; facts (deduplicated): "
                                            "train 0, dev 0, test 5")
    run = tmp_path / "run"
    res = invoke("eval", "--data", out / "google_re", "--all", "--model", tiny_masked_dir, "--vocab", "objects",
                 "--from-sentences", "--out", run)
    assert res.exit_code == 0, res.output
    # the fixture's objects (Tromsø, Porto, ...) are no single token of the tiny BERT: skipped, each said so
    for rid in ("date_of_birth", "place_of_birth", "place_of_death"):
        assert f"warning: {rid} has no test facts left after filtering; skipped" in res.stderr
    first = "HasSubevent"  # the first ConceptNet relation by name: ConceptNet has no templates
    assert error_of("eval", "--data", out / "conceptnet", "--all", "--model", tiny_masked_dir).startswith(
        f"relation '{first}' has no template: give --template")
