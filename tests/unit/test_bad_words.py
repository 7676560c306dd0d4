"""bad_words.py: a word's tokenizations, and which token each forbids after what was generated."""

from hypothesis import given
from hypothesis import strategies as st

from loramux.server.bad_words import BadWord, banned, tokenize

from helpers import build_tokenizer


def test_a_word_is_tokenized_as_written_and_after_a_space(tmp_path):
    tok = build_tokenizer(tmp_path, extra_specials=("[EXTRA]",))
    spaced = tuple(tok.encode(" the", add_special_tokens=False))
    bare = tuple(tok.encode("the", add_special_tokens=False))
    got = tokenize(tok, ("  the", "the"), 384)  # leading spaces dropped; the same word twice, its variants once
    assert [w.prefix + (w.last,) for w in got] == [bare, spaced] and spaced != bare
    # a variant with a token the model has no row for (an added token past the vocabulary) cannot be written
    extra = tok.convert_tokens_to_ids("[EXTRA]")
    assert extra >= 384 and tokenize(tok, ("[EXTRA]",), 384) == ()
    assert tokenize(tok, ("[EXTRA]",), extra + 1)[0] == BadWord((), extra)


def test_only_generated_tokens_complete_a_word():
    words = (BadWord((7, 8), 9), BadWord((), 4), BadWord((8,), 5))
    prompt = [1, 7, 8]
    assert banned(words, prompt, 3) == [4]  # the prompt's 7 8 does not count (vLLM's rule)
    assert banned(words, prompt + [7, 8], 3) == [9, 4, 5]
    assert banned(words, prompt + [8], 3) == [4, 5]
    assert banned(words, prompt + [7, 8, 2], 3) == [4]


@given(st.lists(st.integers(0, 4), max_size=12), st.integers(0, 12),
       st.lists(st.tuples(st.lists(st.integers(0, 4), max_size=3), st.integers(0, 4)), max_size=5))
def test_banned_is_every_word_whose_prefix_ends_the_generated_tokens(ids, num_prompt, spec):
    num_prompt = min(num_prompt, len(ids))
    words = tuple(BadWord(tuple(p), last) for p, last in spec)
    generated = ids[num_prompt:]
    expected = [w.last for w in words
                if len(w.prefix) <= len(generated) and generated[len(generated) - len(w.prefix):] == list(w.prefix)]
    assert banned(words, ids, num_prompt) == expected
