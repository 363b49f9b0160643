"""probe.data: the real LAMA folder, and fake folders for dedup, resolution order and errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import make_fake_lama, write_jsonl

from probe.data import DEFAULT_DATA_DIR, Fact, LamaData, read_jsonl, resolve_data_dir
from probe.errors import ProbeError

# ---- the real folder ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lama(lama_dir):
    return LamaData(lama_dir)


def test_real_folder_has_41_trex_relations_sorted_by_number(lama):
    assert len(lama.relations) == 41
    assert len(lama.all_relations) == 46
    assert set(lama.all_relations) - set(lama.relations) == {"P166", "P69", "P54", "P1923", "P102"}
    numbers = [int(r[1:]) for r in lama.relations]
    assert numbers == sorted(numbers)
    assert next(iter(lama.relations)) == "P17"


def test_real_relation_types(lama):
    assert Counter(r.type for r in lama.relations.values()) == {"1-1": 2, "N-1": 23, "N-M": 16}


def test_p19_manual_template(lama):
    p19 = lama.relation("P19")
    assert p19.template == "[X] was born in [Y] ."
    assert p19.label == "place of birth"
    assert p19.type == "N-1"


def test_real_p19_facts(lama):
    facts = lama.facts("P19")
    assert len(facts) == 944
    assert facts[0] == Fact("Allan Peiper", "Alexandra")
    assert lama.facts("P19", "test") == facts  # alias of test_34k
    assert len(set(facts)) == len(facts)


def test_real_vocab(lama):
    words = lama.vocab_words("common")
    assert len(words) == 21018
    assert words[:3] == ["#", "%", "&"]
    assert len(lama.vocab_words("29k")) == 18154


# ---- fake folders ---------------------------------------------------------------------------


def test_fake_relations_only_those_with_test_files(fake_lama):
    data = LamaData(fake_lama)
    assert list(data.relations) == ["P19", "P36", "P37"]
    assert "P166" in data.all_relations
    assert data.relation("P36").template == "The capital of [X] is [Y] ."


def test_duplicate_pairs_are_dropped_in_file_order(fake_lama):
    facts = LamaData(fake_lama).facts("P19")
    assert facts == [Fact("Dante", "Florence"), Fact("Victor Hugo", "Besancon"), Fact("Berlin", "Paris")]


def test_same_subject_other_object_is_kept(tmp_path):
    root = make_fake_lama(tmp_path, facts={"P19": [("Dante", "Florence"), ("Dante", "Rome"), ("Dante", "Florence")]})
    assert LamaData(root).facts("P19") == [Fact("Dante", "Florence"), Fact("Dante", "Rome")]


def test_every_split_and_missing_split_file(tmp_path):
    root = make_fake_lama(tmp_path)
    (root / "trex" / "dev" / "P36.jsonl").unlink()
    data = LamaData(root)
    for split in ("train", "test_29k", "test_34k"):
        assert len(data.facts("P36", split)) == 3
    assert data.facts("P36", "dev") == []


def test_vocab_words_are_deduplicated_and_stripped(tmp_path):
    root = make_fake_lama(tmp_path, vocab=["Paris", " Rome ", "", "Paris", "Berlin"])
    assert LamaData(root).vocab_words() == ["Paris", "Rome", "Berlin"]


# ---- resolution order -----------------------------------------------------------------------


def test_resolve_order(monkeypatch, tmp_path):
    monkeypatch.delenv("PROBE_DATA", raising=False)
    assert resolve_data_dir(None) == DEFAULT_DATA_DIR == Path("data/lama")
    monkeypatch.setenv("PROBE_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "opt") == tmp_path / "opt"
    assert resolve_data_dir(str(tmp_path / "opt")) == tmp_path / "opt"
    monkeypatch.setenv("PROBE_DATA", "")
    assert resolve_data_dir(None) == Path("data/lama")


def test_lama_data_uses_env_when_no_option(monkeypatch, tmp_path):
    root = make_fake_lama(tmp_path / "env")
    monkeypatch.setenv("PROBE_DATA", str(root))
    assert LamaData().root == root
    other = make_fake_lama(tmp_path / "opt", facts={"P36": [("France", "Paris")]})
    assert list(LamaData(other).relations) == ["P36"]


def test_lama_data_default_is_data_lama_in_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("PROBE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProbeError, match="data/lama not found"):
        LamaData()
    make_fake_lama(tmp_path / "data" / "lama")
    assert list(LamaData().relations) == ["P19", "P36", "P37"]


# ---- errors ---------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(ProbeError) as e:
        LamaData(tmp_path / "nope")
    msg = str(e.value)
    assert str(tmp_path / "nope") in msg and "--data" in msg and "PROBE_DATA" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("missing", ["relations/relations.jsonl", "trex/test_34k"])
def test_incomplete_folder(tmp_path, missing):
    root = make_fake_lama(tmp_path)
    target = root / missing
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(ProbeError, match=f"incomplete: {missing} is missing"):
        LamaData(root)


def test_missing_vocab_file(tmp_path):
    root = make_fake_lama(tmp_path)
    (root / "vocab" / "common_vocab_cased.txt").unlink()
    with pytest.raises(ProbeError, match="vocab/common_vocab_cased.txt is missing"):
        LamaData(root).vocab_words()


def test_unknown_vocab(fake_lama):
    with pytest.raises(ProbeError, match="unknown vocab 'big': expected one of common, 29k"):
        LamaData(fake_lama).vocab_words("big")


def test_bad_29k_vocab(fake_lama):
    (fake_lama / "vocab" / "ptuning_29k-vocab.json").write_text('{"roberta-large": []}')
    with pytest.raises(ProbeError, match="bert-base-cased"):
        LamaData(fake_lama).vocab_words("29k")


def test_unknown_relation_lists_known(fake_lama):
    data = LamaData(fake_lama)
    with pytest.raises(ProbeError) as e:
        data.relation("P999")
    assert str(e.value) == "unknown relation 'P999': expected one of the T-REx relations (P19, P36, P37)"
    with pytest.raises(ProbeError, match="unknown relation 'P166'"):  # in relations.jsonl, no test facts
        data.facts("P166")


def test_unknown_split(fake_lama):
    with pytest.raises(ProbeError) as e:
        LamaData(fake_lama).facts("P19", "validation")
    assert "unknown split 'validation'" in str(e.value)
    for name in ("train", "dev", "test_34k", "test_29k", "test"):
        assert name in str(e.value)


def test_malformed_json_line_names_file_and_line(fake_lama):
    path = fake_lama / "trex" / "test_34k" / "P36.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(1, "")  # blank lines are skipped but still counted
    lines.insert(2, '{"sub_label": "Spain", "obj_label": "Madrid"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ProbeError) as e:
        LamaData(fake_lama).facts("P36")
    assert str(e.value).startswith(f"{path}:3: malformed JSON line")
    assert "\n" not in str(e.value)


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ProbeError, match=r"x.jsonl:2: expected a JSON object, got list"):
        read_jsonl(path)


def test_missing_field_names_file_and_line(fake_lama):
    path = fake_lama / "trex" / "test_34k" / "P36.jsonl"
    write_jsonl(path, [{"sub_label": "France", "obj_label": "Paris"}, {"sub_label": "Italy"}])
    with pytest.raises(ProbeError, match=r"P36.jsonl:2: expected a non-empty string field 'obj_label'"):
        LamaData(fake_lama).facts("P36")


def test_relation_without_template(tmp_path):
    root = make_fake_lama(tmp_path, relations=[{"relation": "P19", "label": "x"}])
    with pytest.raises(ProbeError, match=r"relations.jsonl:1: expected a non-empty string field 'template'"):
        _ = LamaData(root).relations


def test_missing_field_after_blank_line_names_the_file_line(fake_lama):
    path = fake_lama / "trex" / "test_34k" / "P36.jsonl"
    path.write_text('{"sub_label": "France", "obj_label": "Paris"}\n\n{"sub_label": "Italy"}\n')
    with pytest.raises(ProbeError, match=r"P36.jsonl:3: "):
        LamaData(fake_lama).facts("P36")
