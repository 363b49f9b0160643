"""Templates: parse P-tuning shapes, mixes and manual LAMA templates; compile them per tokenizer.

A template is a sequence of parts:
- `3`: three virtual (trainable) tokens,
- `sub` / `obj`: the subject and the object slot,
- `"was born in"`: real words,
- `manual`: the relation's manual template words between [X] and [Y],
- `["was born in"]`: word slots, virtual tokens that start as these words (one per token of them).

Shapes are written `(3, sub, "was born in", 2, obj)`; manual templates `[X] was born in [Y] .`.
A word slot's count is known only once compiled for a tokenizer; AutoPrompt starts its triggers there
as the words, prompt-tuning and prefix-tuning (vocab or template init) their vectors.
For a masked LM the object slot becomes the mask token and is the target. For a causal LM the
input ends just before the object and the target is the next-token prediction at the last input
position; real text after the object is dropped, since a causal model cannot see it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from probe.errors import TemplateError

VIRTUAL, SUB, OBJ, TEXT, MANUAL, WORDS = "virtual", "sub", "obj", "text", "manual", "words"
DEFAULT_SHAPES = {"masked": "(3, sub, 3, obj, 3)", "causal": "(3, sub, 3, obj)"}
MAX_COUNT = 1024  # virtual tokens in one count of a shape: more than any prompt of the papers, far less than 10**20


@dataclass(frozen=True)
class Part:
    """One part of a template; `space` is whether a space separates it from what precedes it."""

    kind: str
    n: int = 0
    text: str = ""
    space: bool = True


@dataclass(frozen=True)
class Template:
    """A parsed template: its source text and parts."""

    source: str
    parts: tuple[Part, ...]

    @property
    def n_virtual(self) -> int:
        """Virtual tokens from counts; word slots add theirs when compiled (see CompiledTemplate.n_virtual)."""
        return sum(p.n for p in self.parts if p.kind == VIRTUAL)


_ITEM = re.compile(
    r"""\s*(?:(?P<int>\d+)|(?P<word>[A-Za-z_]+)|"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'"""
    r"""|\[\s*(?:"(?P<wdq>[^"]*)"|'(?P<wsq>[^']*)')\s*\])\s*"""
)


def _where(source: str, pos: int) -> str:
    return f"{source!r} at column {pos + 1} (here: {source[pos:pos + 12]!r})"


def parse_template(source: str) -> Template:
    """Parse a shape `(3, sub, "was born in", 2, obj)` or a manual template `[X] was born in [Y] .`."""
    text = source.strip()
    if not text:
        raise TemplateError("empty template: expected a shape like (3, sub, 3, obj) or '[X] ... [Y]'")
    parts = _parse_shape(text) if text.startswith("(") else _parse_manual(text)
    kinds = [p.kind for p in parts]
    if kinds.count(SUB) != 1:
        raise TemplateError(f"template {text!r} must hold the subject exactly once (sub or [X]), found {kinds.count(SUB)}")
    if kinds.count(OBJ) != 1:
        raise TemplateError(f"template {text!r} must hold the object exactly once (obj or [Y]), found {kinds.count(OBJ)}")
    return Template(source=text, parts=tuple(parts))


def _parse_shape(text: str) -> list[Part]:
    if not text.endswith(")"):
        raise TemplateError(f"template {text!r}: expected ')' at the end of the shape")
    body_start, body = 1, text[1:-1]
    parts: list[Part] = []
    pos = 0
    while True:
        m = _ITEM.match(body, pos)
        if not m or m.end() == pos:
            pos += len(body[pos:]) - len(body[pos:].lstrip())
            raise TemplateError(
                f"template {_where(text, body_start + pos)}: expected a count, sub, obj, manual, a quoted string or [a quoted string]"
            )
        if m.group("int") is not None:
            n = int(m.group("int"))
            if not 1 <= n <= MAX_COUNT:
                raise TemplateError(f"template {_where(text, body_start + m.start('int'))}: a virtual-token count must be at "
                                    f"least 1 and at most {MAX_COUNT:,}")
            parts.append(Part(VIRTUAL, n=n))
        elif m.group("word") is not None:
            word = m.group("word").lower()
            if word not in (SUB, OBJ, MANUAL):
                raise TemplateError(
                    f"template {_where(text, body_start + m.start('word'))}: unknown word {m.group('word')!r}, "
                    "expected sub, obj, manual, a count or a quoted string"
                )
            parts.append(Part(word))
        else:
            quoted = [m.group(g) for g in ("dq", "sq", "wdq", "wsq")]
            words = next(q for q in quoted if q is not None)
            if not words.strip():
                at = body_start + m.start() + len(m.group()) - len(m.group().lstrip())
                raise TemplateError(f"template {_where(text, at)}: empty quoted string")
            slot = m.group("wdq") is not None or m.group("wsq") is not None
            parts.append(Part(WORDS if slot else TEXT, text=words.strip()))
        pos = m.end()
        if pos == len(body):
            return parts
        if body[pos] != ",":
            raise TemplateError(f"template {_where(text, body_start + pos)}: expected ',' between items")
        pos += 1


def _parse_manual(text: str) -> list[Part]:
    if "[X]" not in text or "[Y]" not in text:
        raise TemplateError(f"template {text!r}: expected a shape '(...)' or a manual template with [X] and [Y]")
    parts = []
    for m in re.finditer(r"\[X\]|\[Y\]|[^\[]+|\[", text):
        piece = m.group()
        space = m.start() > 0 and text[m.start() - 1].isspace()
        if piece == "[X]":
            parts.append(Part(SUB, space=space))
        elif piece == "[Y]":
            parts.append(Part(OBJ, space=space))
        elif piece.strip():
            lead = piece[0].isspace() or space
            if parts and parts[-1].kind == TEXT:  # a stray '[' splits text: glue it back
                prev = parts.pop()
                parts.append(Part(TEXT, text=prev.text + (" " if lead else "") + piece.strip(), space=prev.space))
            else:
                parts.append(Part(TEXT, text=piece.strip(), space=lead))
    return parts


def manual_relation_words(manual: str) -> str:
    """The words of a manual template between [X] and [Y] (`was born in`)."""
    i, j = manual.find("[X]"), manual.find("[Y]")
    if i < 0 or j < i:
        raise TemplateError(f"manual template {manual!r}: 'manual' needs [X] before [Y]")
    return manual[i + 3:j].strip()


def expand_manual(template: Template, manual: str | None) -> Template:
    """Replace the `manual` part by the relation's words between [X] and [Y]."""
    if not any(p.kind == MANUAL for p in template.parts):
        return template
    if manual is None:
        raise TemplateError(f"template {template.source!r} uses 'manual' but no relation was given")
    words = manual_relation_words(manual)
    parts = tuple(Part(TEXT, text=words, space=p.space) if p.kind == MANUAL else p for p in template.parts)
    return Template(source=template.source, parts=tuple(p for p in parts if p.kind != TEXT or p.text))


def spread_virtual(template: Template, n: int) -> Template:
    """The template with n virtual tokens in all, spread over its virtual slots in order (earlier slots get the
    remainder); a slot left with none is dropped. `(3, sub, 3, obj)` with n=1 is `(1, sub, obj)`, n=12 `(6, sub, 6, obj)`."""
    slots = [i for i, p in enumerate(template.parts) if p.kind == VIRTUAL]
    if not slots:
        raise TemplateError(f"template {template.source!r} has no virtual slots to spread {n} tokens over")
    if n < 1:
        raise TemplateError(f"a prompt length must be at least 1, got {n}")
    counts = {i: n // len(slots) + (k < n % len(slots)) for k, i in enumerate(slots)}
    parts = tuple(Part(VIRTUAL, counts[i], space=p.space) if i in counts else p for i, p in enumerate(template.parts))
    kept = tuple(p for p in parts if p.kind != VIRTUAL or p.n > 0)
    return Template(source=shape_source(kept), parts=kept)


def shape_source(parts: tuple[Part, ...]) -> str:
    """The shape that parses back to these parts: `(3, sub, "was born in", ["is"], obj)`."""
    def show(p: Part) -> str:
        if p.kind == VIRTUAL:
            return str(p.n)
        if p.kind in (SUB, OBJ, MANUAL):
            return p.kind
        quoted = f"'{p.text}'" if '"' in p.text else f'"{p.text}"'
        return f"[{quoted}]" if p.kind == WORDS else quoted
    return f"({', '.join(show(p) for p in parts)})"


def manual_word_slots(manual: str, kind: str) -> Template:
    """A manual template with its words before [Y] as word slots, to search or train from the manual prompt.

    `The capital of [X] is [Y] .` becomes `(["The capital of"], sub, ["is"], obj, ".")` for a masked LM and
    `(["The capital of"], sub, ["is"], obj)` for a causal one (which cannot see text after the object).
    """
    parts = parse_template(manual).parts
    obj_at = [p.kind for p in parts].index(OBJ)
    glued = {i for i, p in enumerate(parts) if p.kind == TEXT and not p.space and i and parts[i - 1].kind == SUB}
    if glued:
        raise TemplateError(f"manual template {manual!r}: text glued to [X] cannot become word slots")
    before = [Part(WORDS, text=p.text) if p.kind == TEXT else p for p in parts[:obj_at]]
    after = list(parts[obj_at:]) if kind == "masked" else [parts[obj_at]]
    kept = tuple(before + after)
    return Template(source=shape_source(kept), parts=kept)


@dataclass
class Encoded:
    """One fact as the model sees it: token ids, virtual-token positions, and the target position."""

    input_ids: list[int]
    virtual_positions: list[int]
    target: int


@dataclass
class CompiledTemplate:
    """A template compiled for one tokenizer and model kind. `encode(sub)` builds one input."""

    template: Template
    kind: str
    parts: list[tuple[str, list[int] | int | tuple[bool, str]]]
    lead_ids: list[int]  # the special tokens a tokenizer puts before a text ([CLS], a BOS)
    tail_ids: list[int]  # and after it ([SEP]; masked LMs only)
    placeholder_id: int
    tokenizer: object = field(repr=False)
    space_sensitive: bool = True
    start_ids: list[int | None] = field(default_factory=list)  # per virtual token: a word slot's token, else None

    @property
    def n_virtual(self) -> int:
        return sum(value for kind, value in self.parts if kind == VIRTUAL)

    def encode(self, sub: str) -> Encoded:
        ids = list(self.lead_ids)
        virtual, target = [], -1
        for kind, value in self.parts:
            if kind == VIRTUAL:
                virtual.extend(range(len(ids), len(ids) + value))
                ids.extend([self.placeholder_id] * value)
            elif kind == TEXT:
                ids.extend(value)
            elif kind == SUB:
                space, glued = value
                lead = space and len(ids) > len(self.lead_ids)
                ids.extend(encode_words(self.tokenizer, sub + glued, lead, self.space_sensitive))
            elif kind == OBJ:
                if self.kind == "causal":
                    target = len(ids) - 1
                    break
                target = len(ids)
                ids.append(value)
        if self.kind == "masked":
            ids.extend(self.tail_ids)
        return Encoded(ids, virtual, target)

    def encode_fact(self, fact) -> Encoded:
        """The input of a fact: the template filled with its subject."""
        return self.encode(fact.sub)

    def input_key(self, fact) -> str:
        """Facts with the same key have the same input (here: the same subject), so it runs once for all of them."""
        return fact.sub

    def describe(self, sub: str = "[X]") -> str:
        """What the model sees for a subject, with virtual tokens as [V1]..[Vn] and the target marked."""
        enc = self.encode(sub)
        tokens = self.tokenizer.convert_ids_to_tokens(enc.input_ids)
        vpos = {p: i for i, p in enumerate(enc.virtual_positions, 1)}
        out = []
        for pos, tok in enumerate(tokens):
            shown = f"[V{vpos[pos]}]" if pos in vpos else tok
            if pos == enc.target:
                shown = f"{shown}<-target" if self.kind == "causal" else f">{shown}<"
            out.append(shown)
        return " ".join(out)


MASK = "[MASK]"


@dataclass
class ClozeTemplate:
    """Each fact's own cloze sentence (LAMA's `masked_sentences`) as the input, with [MASK] where the object goes.

    A masked LM reads the sentence as written, the [MASK] being the target. A causal LM sees only the text
    before the [MASK]: the input ends there and the target is the next-token prediction at its last token.
    """

    kind: str
    tokenizer: object = field(repr=False)
    lead_ids: list[int] = field(default_factory=list)
    tail_ids: list[int] = field(default_factory=list)
    mask_id: int | None = None
    space_sensitive: bool = True
    n_virtual: int = 0
    start_ids: list[int | None] = field(default_factory=list)

    @classmethod
    def compile(cls, tokenizer, kind: str) -> ClozeTemplate:
        if kind == "masked" and tokenizer.mask_token_id is None:
            raise TemplateError("this tokenizer has no mask token: a masked LM's cloze sentence needs one")
        lead, tail = special_tokens_around(tokenizer)
        return cls(kind, tokenizer, lead, tail, tokenizer.mask_token_id, is_space_sensitive(tokenizer))

    def encode_fact(self, fact) -> Encoded:
        sentence = fact.sentence or ""
        if sentence.count(MASK) != 1:
            raise TemplateError(f"cloze sentence {sentence!r} of ({fact.sub}, {fact.obj}): expected exactly one {MASK}")
        before, after = sentence.split(MASK)
        ids = list(self.lead_ids) + self.tokenizer.encode(before.rstrip(), add_special_tokens=False)
        if self.kind == "causal":
            return Encoded(ids, [], len(ids) - 1)
        target = len(ids)
        rest = encode_words(self.tokenizer, after.strip(), after[:1].isspace(), self.space_sensitive) if after.strip() else []
        return Encoded([*ids, self.mask_id, *rest, *self.tail_ids], [], target)

    def input_key(self, fact) -> str:
        return fact.sentence or ""


def is_space_sensitive(tokenizer) -> bool:
    """True for BPE-style vocabularies where ' word' and 'word' are different tokens."""
    a = tokenizer.encode("the", add_special_tokens=False)
    b = tokenizer.encode(" the", add_special_tokens=False)
    return a != b and len(b) == 1


def encode_words(tokenizer, text: str, lead_space: bool, space_sensitive: bool) -> list[int]:
    """Token ids of real words, with a leading space where the vocabulary marks word starts."""
    space = " " if (lead_space and space_sensitive) else ""
    return tokenizer.encode(space + text, add_special_tokens=False)


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] ... [SEP], or a BOS)."""
    bare = tokenizer.encode("the", add_special_tokens=False)
    full = tokenizer.encode("the")
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


def compile_template(template: Template | str, tokenizer, kind: str, manual: str | None = None) -> CompiledTemplate:
    """Compile a template for a tokenizer and model kind ('masked' or 'causal')."""
    if isinstance(template, str):
        template = parse_template(template)
    template = expand_manual(template, manual)
    if kind not in ("masked", "causal"):
        raise ValueError(f"kind must be 'masked' or 'causal', not {kind!r}")
    kinds = [p.kind for p in template.parts]
    obj_at = kinds.index(OBJ)
    if kind == "causal":
        after = [p for p in template.parts[obj_at + 1:] if p.kind != TEXT]
        if after:
            raise TemplateError(
                f"template {template.source!r}: obj must be last for a causal model "
                f"(found {after[0].kind} after it; only text after obj is allowed and it is dropped)"
            )
        if obj_at == 0:
            raise TemplateError(f"template {template.source!r}: a causal model needs something before obj")
    mask_id = tokenizer.mask_token_id
    if kind == "masked" and mask_id is None:
        raise TemplateError("this tokenizer has no mask token: a masked-LM template needs one")
    space_sensitive = is_space_sensitive(tokenizer)
    lead_ids, tail_ids = special_tokens_around(tokenizer)
    parts: list[tuple[str, list[int] | int | tuple[bool, str]]] = []
    start_ids: list[int | None] = []
    for i, p in enumerate(template.parts):
        lead = p.space and i > 0
        if p.kind == VIRTUAL:
            parts.append((VIRTUAL, p.n))
            start_ids.extend([None] * p.n)
        elif p.kind == WORDS:
            ids = encode_words(tokenizer, p.text, lead, space_sensitive)
            parts.append((VIRTUAL, len(ids)))
            start_ids.extend(ids)
        elif p.kind == TEXT and not p.space and parts and parts[-1][0] == SUB:
            # text glued to the subject (AutoPrompt's `[X]vik`) is tokenized with it, as in the filled-in sentence
            parts[-1] = (SUB, (parts[-1][1][0], p.text))
        elif p.kind == TEXT:
            parts.append((TEXT, encode_words(tokenizer, p.text, lead, space_sensitive)))
        elif p.kind == SUB:
            parts.append((SUB, (p.space, "")))
        elif p.kind == OBJ:
            parts.append((OBJ, mask_id if kind == "masked" else 0))
    placeholder = next(
        (t for t in (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0
    )
    return CompiledTemplate(template, kind, parts, lead_ids, tail_ids, placeholder, tokenizer, space_sensitive, start_ids)
