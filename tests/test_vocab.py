"""probe.vocab: which words are single-token candidates (the 16,342 SmolLM2 invariant is in test_integration)."""

from __future__ import annotations

import torch

from probe.templates import is_space_sensitive
from probe.vocab import build_candidates


def test_wordpiece_candidates_without_leading_space(wordpiece_tokenizer):
    tok = wordpiece_tokenizer
    assert not is_space_sensitive(tok)
    words = ["Paris", "Parisville", "Xylophonia", "Rome", "[MASK]", "Paris", "France", "##s"]
    cands = build_candidates(tok, words)
    # Parisville is two pieces, Xylophonia is [UNK] (a special id), [MASK] is special, Paris is a duplicate,
    # and the text "##s" is split into '#', '#', 's' (only the vocabulary entry is a piece)
    assert cands.words == ["Paris", "Rome", "France"]
    assert cands.token_ids.tolist() == tok.convert_tokens_to_ids(["Paris", "Rome", "France"])
    assert cands.token_ids.dtype == torch.long
    assert cands.index == {"Paris": 0, "Rome": 1, "France": 2}
    assert cands.n_source == len(words) == 8
    assert len(cands) == 3


def test_bpe_candidates_use_the_leading_space_token(bpe_tokenizer):
    tok = bpe_tokenizer
    assert is_space_sensitive(tok)
    words = ["Paris", "France", "Madrid", "Besancon", "Alighieri", "<|im_end|>", "Lyon"]
    cands = build_candidates(tok, words)
    # " Madrid" and " Lyon" are one token although "Madrid" and "Lyon" are not; " Besancon" is three
    assert cands.words == ["Paris", "France", "Madrid", "Lyon"]
    expected = [tok.encode(" " + w, add_special_tokens=False)[0] for w in cands.words]
    assert cands.token_ids.tolist() == expected
    assert tok.convert_ids_to_tokens(cands.token_ids.tolist()) == ["ĠParis", "ĠFrance", "ĠMadrid", "ĠLyon"]
    assert cands.n_source == 7


def test_two_words_with_the_same_token_keep_the_first(wordpiece_tokenizer):
    cands = build_candidates(wordpiece_tokenizer, ["Rome", "Paris", "Rome"])
    assert cands.words == ["Rome", "Paris"]
    assert len(set(cands.token_ids.tolist())) == 2


def test_empty_word_list(wordpiece_tokenizer):
    cands = build_candidates(wordpiece_tokenizer, [])
    assert len(cands) == 0 and cands.token_ids.shape == (0,) and cands.n_source == 0
