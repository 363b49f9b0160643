"""probe.templates: parsing shapes and manual templates, compiling them per tokenizer, template files."""

from __future__ import annotations

from pathlib import Path

import pytest

from probe.data import LamaData
from probe.errors import ProbeError
from probe.template_files import parse_template_file
from probe.templates import (
    DEFAULT_SHAPES,
    MANUAL,
    OBJ,
    SUB,
    TEXT,
    VIRTUAL,
    Part,
    TemplateError,
    compile_template,
    expand_manual,
    manual_relation_words,
    manual_word_slots,
    parse_template,
)

REPO = Path(__file__).resolve().parents[1]
P19 = "[X] was born in [Y] ."


def kinds(template):
    return [p.kind for p in template.parts]


# ---- parsing --------------------------------------------------------------------------------


def test_parse_default_masked_shape():
    t = parse_template("(3, sub, 3, obj, 3)")
    assert t.parts == (Part(VIRTUAL, n=3), Part(SUB), Part(VIRTUAL, n=3), Part(OBJ), Part(VIRTUAL, n=3))
    assert t.n_virtual == 9
    assert t.source == "(3, sub, 3, obj, 3)"


def test_parse_shape_with_words():
    t = parse_template('  (3, sub, "was born in", 2, obj)  ')
    assert t.parts == (Part(VIRTUAL, n=3), Part(SUB), Part(TEXT, text="was born in"), Part(VIRTUAL, n=2), Part(OBJ))
    assert t.n_virtual == 5
    assert t.source == '(3, sub, "was born in", 2, obj)'
    assert parse_template("(3,sub,'was born in',2,obj)").parts == t.parts
    assert parse_template("(3, SUB, ' was born in ', 2, Obj)").parts == t.parts


def test_parse_manual_template():
    t = parse_template(P19)
    assert t.parts == (
        Part(SUB, space=False), Part(TEXT, text="was born in", space=True), Part(OBJ, space=True),
        Part(TEXT, text=".", space=True),
    )
    assert t.n_virtual == 0


def test_parse_manual_template_spacing():
    t = parse_template("[X]'s father is [Y] .")
    assert t.parts[1] == Part(TEXT, text="'s father is", space=False)
    t = parse_template("The capital of [X] is [Y] .")
    assert t.parts[:3] == (Part(TEXT, text="The capital of", space=False), Part(SUB, space=True),
                           Part(TEXT, text="is", space=True))


def test_parse_manual_template_with_stray_bracket():
    t = parse_template("[X] is [a] thing [Y] .")
    assert kinds(t) == [SUB, TEXT, OBJ, TEXT]
    assert t.parts[1].text == "is [a] thing"


def test_parse_shape_with_manual_and_expand():
    t = parse_template("(3, sub, manual, 3, obj, 3)")
    assert kinds(t) == [VIRTUAL, SUB, MANUAL, VIRTUAL, OBJ, VIRTUAL]
    e = expand_manual(t, P19)
    assert e.parts[2] == Part(TEXT, text="was born in")
    assert kinds(e) == [VIRTUAL, SUB, TEXT, VIRTUAL, OBJ, VIRTUAL]
    assert e.n_virtual == 9
    assert e.source == t.source
    # nothing between [X] and [Y]: the manual part disappears
    assert kinds(expand_manual(t, "[X] [Y] .")) == [VIRTUAL, SUB, VIRTUAL, OBJ, VIRTUAL]
    # templates without `manual` are returned as they are
    plain = parse_template("(3, sub, obj)")
    assert expand_manual(plain, None) is plain


def test_manual_needs_a_relation_and_x_before_y():
    t = parse_template("(sub, manual, obj)")
    with pytest.raises(TemplateError, match="uses 'manual' but no relation was given"):
        expand_manual(t, None)
    with pytest.raises(TemplateError, match=r"needs \[X\] before \[Y\]"):
        manual_relation_words("[Y] participated in the [X] .")
    assert manual_relation_words("The capital of [X] is [Y] .") == "is"


@pytest.mark.parametrize(
    "source, column, fragment",
    [
        ("(3, sub; obj)", 8, "expected ',' between items"),
        ("(3, sub, foo, obj)", 10, "unknown word 'foo'"),
        ("(0, sub, obj)", 2, "at least 1"),
        ("()", 2, "expected a count, sub, obj, manual, a quoted string or [a quoted string]"),
        ("(3, sub, obj,)", 14, "expected a count"),
        ("(3 sub, obj)", 4, "expected ','"),
    ],
)
def test_parse_errors_say_where(source, column, fragment):
    with pytest.raises(TemplateError) as e:
        parse_template(source)
    msg = str(e.value)
    assert f"at column {column} " in msg
    assert fragment in msg
    assert repr(source) in msg
    assert "\n" not in msg
    assert source[column - 1] in msg.split("here: ")[1]


@pytest.mark.parametrize("source", ["(3, sub, -1, obj)", "(3, sub, '', obj)"])
def test_parse_error_column_points_at_the_item_not_the_space_before(source):
    with pytest.raises(TemplateError) as e:
        parse_template(source)
    assert "at column 10 " in str(e.value)


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("", "empty template"),
        ("   ", "empty template"),
        ("(3, sub, obj", "expected ')' at the end"),
        ("[X] was born in", "with [X] and [Y]"),
        ("was born in", "with [X] and [Y]"),
        ("(3, sub, '', obj)", "empty quoted string"),
        ("(3, sub, 3)", "must hold the object exactly once (obj or [Y]), found 0"),
        ("(3, sub, obj, obj)", "must hold the object exactly once (obj or [Y]), found 2"),
        ("(3, 3, obj)", "must hold the subject exactly once (sub or [X]), found 0"),
        ("[X] and [X] are [Y]", "must hold the subject exactly once"),
    ],
)
def test_parse_errors(source, fragment):
    with pytest.raises(TemplateError) as e:
        parse_template(source)
    assert fragment in str(e.value)
    assert isinstance(e.value, ProbeError)


# ---- compiling: masked LM with WordPiece ----------------------------------------------------


def test_masked_manual_template(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    c = compile_template(P19, tok, "masked")
    assert not c.space_sensitive
    enc = c.encode("Victor Hugo")
    words = tok.encode("Victor Hugo was born in", add_special_tokens=False)
    dot = tok.encode(".", add_special_tokens=False)
    assert enc.input_ids == [tok.cls_token_id, *words, tok.mask_token_id, *dot, tok.sep_token_id]
    assert tok.unk_token_id not in enc.input_ids
    assert enc.target == 1 + len(words)
    assert enc.input_ids[enc.target] == tok.mask_token_id
    assert enc.input_ids.count(tok.mask_token_id) == 1
    assert enc.virtual_positions == []
    assert c.describe("Victor Hugo") == "[CLS] Victor Hugo was born in >[MASK]< . [SEP]"


def test_masked_shape_virtual_positions(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    c = compile_template("(3, sub, 3, obj, 3)", tok, "masked")
    enc = c.encode("Dante Alighieri")
    sub = tok.encode("Dante Alighieri", add_special_tokens=False)
    assert len(sub) == 2
    n = len(sub)
    assert enc.virtual_positions == [1, 2, 3, 4 + n, 5 + n, 6 + n, 8 + n, 9 + n, 10 + n]
    assert enc.target == 7 + n
    assert enc.input_ids[enc.target] == tok.mask_token_id
    assert enc.input_ids[4:4 + n] == sub
    assert enc.input_ids[0] == tok.cls_token_id and enc.input_ids[-1] == tok.sep_token_id
    assert len(enc.input_ids) == 12 + n
    assert {enc.input_ids[p] for p in enc.virtual_positions} == {c.placeholder_id}
    assert c.n_virtual == 9
    assert c.describe("Dante Alighieri") == (
        "[CLS] [V1] [V2] [V3] Dante Alighieri [V4] [V5] [V6] >[MASK]< [V7] [V8] [V9] [SEP]"
    )


def test_masked_words_split_into_pieces(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    c = compile_template('(sub, "was born in", obj)', tok, "masked")
    enc = c.encode("Parisville")
    assert tok.convert_ids_to_tokens(enc.input_ids[1:3]) == ["Paris", "##ville"]
    assert enc.target == 6


def test_masked_needs_a_mask_token(bpe_tokenizer):
    with pytest.raises(TemplateError, match="no mask token"):
        compile_template(P19, bpe_tokenizer, "masked")


def test_unknown_kind(wordpiece_tokenizer):
    with pytest.raises(ValueError, match="kind must be 'masked' or 'causal'"):
        compile_template(P19, wordpiece_tokenizer, "seq2seq")


# ---- compiling: causal LM with byte-level BPE -----------------------------------------------


def test_causal_manual_template_ends_before_object(bpe_tokenizer):
    tok = bpe_tokenizer
    c = compile_template(P19, tok, "causal")
    assert c.space_sensitive
    assert c.lead_ids == [] and c.tail_ids == []
    enc = c.encode("Victor Hugo")
    assert enc.input_ids == tok.encode("Victor Hugo was born in", add_special_tokens=False)
    assert enc.target == len(enc.input_ids) - 1
    assert tok.convert_ids_to_tokens(enc.input_ids[-1:]) == ["Ġin"]
    assert tok.encode(" .", add_special_tokens=False)[0] not in enc.input_ids  # text after obj is dropped
    assert c.describe("Victor Hugo").endswith("Ġin<-target")


def test_causal_shape_virtual_tokens_and_subject_space(bpe_tokenizer):
    tok = bpe_tokenizer
    c = compile_template("(3, sub, 3, obj)", tok, "causal")
    enc = c.encode("Dante Alighieri")
    sub = tok.encode(" Dante Alighieri", add_special_tokens=False)
    assert sub != tok.encode("Dante Alighieri", add_special_tokens=False)
    n = len(sub)
    assert enc.input_ids[3:3 + n] == sub  # leading space: something precedes the subject
    assert enc.virtual_positions == [0, 1, 2, 3 + n, 4 + n, 5 + n]
    assert len(enc.input_ids) == 6 + n
    assert enc.target == len(enc.input_ids) - 1 == 5 + n
    assert c.describe("Dante Alighieri").split()[-1] == "[V6]<-target"


def test_causal_subject_space_only_when_something_precedes(bpe_tokenizer):
    tok = bpe_tokenizer
    first = compile_template("[X] was born in [Y] .", tok, "causal").encode("Paris")
    assert first.input_ids[:1] == tok.encode("Paris", add_special_tokens=False)
    later = compile_template("The capital of [X] is [Y] .", tok, "causal").encode("Paris")
    assert later.input_ids == tok.encode("The capital of Paris is", add_special_tokens=False)
    assert tok.encode(" Paris", add_special_tokens=False)[0] in later.input_ids
    shape = compile_template('(sub, "is in", obj)', tok, "causal").encode("Paris")
    assert shape.input_ids == tok.encode("Paris is in", add_special_tokens=False)


def test_causal_text_after_words_gets_space(bpe_tokenizer):
    tok = bpe_tokenizer
    enc = compile_template('(2, sub, "was born in", 1, obj)', tok, "causal").encode("Dante")
    words = tok.encode(" Dante was born in", add_special_tokens=False)
    assert enc.input_ids == [0, 0, *words, 0]
    assert enc.virtual_positions == [0, 1, 2 + len(words)]


def test_causal_trailing_text_is_dropped(bpe_tokenizer):
    with_text = compile_template('(3, sub, 3, obj, "is a city")', bpe_tokenizer, "causal").encode("Paris")
    without = compile_template("(3, sub, 3, obj)", bpe_tokenizer, "causal").encode("Paris")
    assert with_text == without


@pytest.mark.parametrize("source, after", [("(3, sub, 3, obj, 3)", "virtual"), ("(3, obj, sub)", "sub"),
                                           ("[Y] is the home of [X] .", "sub")])
def test_causal_obj_must_be_last(bpe_tokenizer, source, after):
    with pytest.raises(TemplateError) as e:
        compile_template(source, bpe_tokenizer, "causal")
    assert "obj must be last for a causal model" in str(e.value)
    assert f"found {after} after it" in str(e.value)
    compile_template(source, _FakeMaskTokenizer(bpe_tokenizer), "masked")  # fine for a masked model


class _FakeMaskTokenizer:
    """The BPE tokenizer with a mask id, to show a shape is only wrong for causal models."""

    def __init__(self, tok):
        self._tok = tok
        self.mask_token_id = 3

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_causal_on_wordpiece_keeps_cls_and_no_sep(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    enc = compile_template(P19, tok, "causal").encode("Dante")
    assert enc.input_ids == [tok.cls_token_id, *tok.encode("Dante was born in", add_special_tokens=False)]
    assert enc.target == len(enc.input_ids) - 1


def test_manual_shape_compiles_with_relation_words(bpe_tokenizer, wordpiece_tokenizer):
    c = compile_template("(3, sub, manual, 3, obj)", bpe_tokenizer, "causal", manual=P19)
    enc = c.encode("Dante")
    words = bpe_tokenizer.encode(" Dante was born in", add_special_tokens=False)
    assert enc.input_ids == [0, 0, 0, *words, 0, 0, 0]
    m = compile_template("(3, sub, manual, 3, obj, 3)", wordpiece_tokenizer, "masked", manual=P19).encode("Dante")
    assert m.input_ids[4:8] == wordpiece_tokenizer.encode("Dante was born in", add_special_tokens=False)
    assert m.target == 11 and m.input_ids[11] == wordpiece_tokenizer.mask_token_id


def test_every_real_manual_template_compiles(lama_dir, bpe_tokenizer, wordpiece_tokenizer):
    data = LamaData(lama_dir)
    for rel in data.relations.values():
        causal = compile_template(rel.template, bpe_tokenizer, "causal").encode("Dante")
        assert causal.target == len(causal.input_ids) - 1, rel.id
        masked = compile_template(rel.template, wordpiece_tokenizer, "masked").encode("Dante")
        assert masked.input_ids[masked.target] == wordpiece_tokenizer.mask_token_id, rel.id
        words = rel.template[rel.template.index("[X]") + 3:rel.template.index("[Y]")].strip()
        pt = compile_template("(3, sub, manual, 3, obj)", bpe_tokenizer, "causal", manual=rel.template)
        assert pt.encode("Dante").input_ids[3:] == [
            *bpe_tokenizer.encode(f" Dante {words}".rstrip(), add_special_tokens=False), 0, 0, 0
        ], rel.id
        compile_template("(3, sub, manual, 3, obj, 3)", wordpiece_tokenizer, "masked", manual=rel.template)


# ---- template files -------------------------------------------------------------------------


def test_template_file_lookup(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(
        "# P-tuning-like templates\n"
        "\n"
        "default: (2, sub, 2, obj, 2)      # for everything\n"
        "default.causal: (3, sub, 3, obj)\n"
        "P19: (3, sub, \"was # born in\", 2, obj)  # the '#' inside quotes is text\n"
        "P19.masked: [X] was born in [Y] .\n"
        "P37: (3, sub, manual, 3, obj, 3)\n"
    )
    tf = parse_template_file(path)
    assert list(tf.entries) == ["default", "default.causal", "P19", "P19.masked", "P37"]
    assert tf.entries["P19"].parts[2] == Part(TEXT, text="was # born in")
    assert tf.template_for("P19", "masked").source == P19
    assert tf.template_for("P19", "causal").source == '(3, sub, "was # born in", 2, obj)'
    assert tf.template_for("P36", "causal").source == "(3, sub, 3, obj)"
    assert tf.template_for("P36", "masked").source == "(2, sub, 2, obj, 2)"
    assert tf.template_for("P37", "causal").source == "(3, sub, manual, 3, obj, 3)"


def test_template_file_builtin_defaults(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("P19: (1, sub, obj)\n")
    tf = parse_template_file(path)
    assert tf.template_for("P36", "masked").source == DEFAULT_SHAPES["masked"] == "(3, sub, 3, obj, 3)"
    assert tf.template_for("P36", "causal").source == DEFAULT_SHAPES["causal"] == "(3, sub, 3, obj)"


def test_repo_template_files_parse():
    examples = parse_template_file(REPO / "templates" / "examples.txt")
    assert examples.template_for("P19", "causal").source == '(3, sub, "was born in", 2, obj)'
    assert examples.template_for("P37", "masked").source == '("The official language of", sub, 3, obj, 3)'
    assert examples.template_for("P37", "causal").source == "(3, sub, 3, obj)"
    ptuning = parse_template_file(REPO / "templates" / "ptuning.txt")
    assert ptuning.template_for("P19", "masked").n_virtual == 9
    assert ptuning.template_for("P19", "causal").n_virtual == 6
    manual = parse_template_file(REPO / "templates" / "ptuning_manual.txt")
    assert kinds(manual.template_for("P19", "causal")) == [VIRTUAL, SUB, MANUAL, VIRTUAL, OBJ]


@pytest.mark.parametrize(
    "lines, lineno, fragment",
    [
        (["default: (3, sub, 3, obj)", "P19 (3, sub, obj)"], 2, "expected 'KEY: TEMPLATE'"),
        (["# c", "", "P 19: (3, sub, obj)"], 3, "expected 'KEY: TEMPLATE'"),
        (["default.seq2seq: (3, sub, obj)"], 1, "expected 'KEY: TEMPLATE'"),
        (["P19: (3, sub, obj)", "P19: (2, sub, obj)"], 2, "P19 is set twice"),
        (["default: (3, sub, 3)"], 1, "must hold the object exactly once"),
        (["P19: (3, sub; obj)"], 1, "at column 8"),
        (["P19:"], 1, "empty template"),
    ],
)
def test_template_file_errors_name_file_and_line(tmp_path, lines, lineno, fragment):
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TemplateError) as e:
        parse_template_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{lineno}: ")
    assert fragment in msg
    assert "\n" not in msg


def test_template_file_not_found(tmp_path):
    with pytest.raises(TemplateError, match="template file .*nope.txt not found"):
        parse_template_file(tmp_path / "nope.txt")
    with pytest.raises(TemplateError, match="not found"):
        parse_template_file(tmp_path)  # a folder is not a template file


# ---- word slots -----------------------------------------------------------------------------


def test_word_slots_parse_and_compile_to_virtual_tokens_that_start_as_their_words(bpe_tokenizer, wordpiece_tokenizer):
    t = parse_template('(2, sub, ["was born in"], obj)')
    assert [p.kind for p in t.parts] == ["virtual", "sub", "words", "obj"]
    assert t.parts[2].text == "was born in" and t.n_virtual == 2  # a word slot's count needs the tokenizer
    words = bpe_tokenizer.encode(" was born in", add_special_tokens=False)
    c = compile_template(t, bpe_tokenizer, "causal")
    assert c.n_virtual == 2 + len(words)
    assert c.start_ids == [None, None, *words]
    enc = c.encode("Dante")
    assert enc.virtual_positions == [0, 1, *range(len(enc.input_ids) - len(words), len(enc.input_ids))]
    assert enc.target == len(enc.input_ids) - 1
    m = compile_template("(sub, ['is'], obj, [\".\"])", wordpiece_tokenizer, "masked")
    dot, is_ = (wordpiece_tokenizer.convert_tokens_to_ids(w) for w in (".", "is"))
    assert m.start_ids == [is_, dot]
    enc = m.encode("Dante")
    assert [enc.input_ids[p] for p in enc.virtual_positions] == [m.placeholder_id] * 2
    assert enc.virtual_positions[1] == enc.target + 1


def test_manual_word_slots_start_exactly_as_the_manual_prompt(lama_dir, bpe_tokenizer, wordpiece_tokenizer):
    assert manual_word_slots("The capital of [X] is [Y] .", "causal").source == '(["The capital of"], sub, ["is"], obj)'
    assert manual_word_slots("The capital of [X] is [Y] .", "masked").source == '(["The capital of"], sub, ["is"], obj, ".")'
    data = LamaData(lama_dir)
    for rel in data.relations.values():
        for tok, kind in ((bpe_tokenizer, "causal"), (wordpiece_tokenizer, "masked")):
            slots = manual_word_slots(rel.template, kind)
            manual = compile_template(rel.template, tok, kind).encode("Dante")
            for template in (slots, parse_template(slots.source)):  # the saved source compiles the same way
                c = compile_template(template, tok, kind)
                enc = c.encode("Dante")
                filled = list(enc.input_ids)
                for pos, start in zip(enc.virtual_positions, c.start_ids, strict=True):
                    filled[pos] = start
                assert (filled, enc.target) == (manual.input_ids, manual.target), (rel.id, kind)
                assert None not in c.start_ids


def test_word_slots_after_the_object_are_refused_for_a_causal_model(bpe_tokenizer):
    with pytest.raises(TemplateError, match="obj must be last"):
        compile_template('(sub, obj, ["."])', bpe_tokenizer, "causal")
    with pytest.raises(TemplateError, match="empty quoted string"):
        parse_template('(sub, [""], obj)')
    with pytest.raises(TemplateError, match="glued"):
        manual_word_slots("[X]'s home is [Y] .", "causal")
