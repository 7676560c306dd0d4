"""Incremental detokenization never splits a multi-byte character."""

from loramux.server.detokenizer import IncrementalDetokenizer

from helpers import build_tokenizer


def test_streamed_text_equals_full_decode_and_never_holds_broken_characters(tmp_path):
    tok = build_tokenizer(tmp_path)
    text = "Ünïcödé wörds, 東京 and emoji 🚀 too. The quick brown fox 🚀🚀."
    ids = tok(text)["input_ids"]
    prompt, rest = ids[:3], ids[3:]
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(t) for t in rest] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(rest)
    # Byte-level BPE splits 🚀 over several tokens: some steps must have held text back.
    assert any(p == "" for p in pieces[:-1])


def test_one_decode_per_token_and_a_window_that_slides(tmp_path):
    """A long output streams exactly, with at most one decode per token (plus one per slide of the
    window), each over a bounded number of tokens."""
    from loramux.server import detokenizer

    tok = build_tokenizer(tmp_path)
    rest = tok(" ".join(["Ünïcödé 🚀 wörds 東京"] * 30))["input_ids"]
    calls = []
    original = tok.decode

    def counting(ids, **kw):
        calls.append(len(ids))
        return original(ids, **kw)

    tok.decode = counting
    detok = IncrementalDetokenizer(tok, [5, 6, 7])
    pieces = [detok.add(t) for t in rest] + [detok.flush()]
    tok.decode = original
    assert "".join(pieces) == tok.decode(rest)
    slides = len(rest) // (detokenizer.WINDOW - detokenizer.CONTEXT_TOKENS) + 1
    assert len(calls) <= 1 + len(rest) + 1 + slides  # start, one per token, flush, slides
    assert max(calls) <= detokenizer.WINDOW + 8  # a window plus the tokens held back inside one character


def test_special_tokens_are_skipped_unless_asked_to_be_kept(tmp_path):
    """skip_special_tokens (the default) leaves chat and tool-call markers out of the text, as
    decode(skip_special_tokens=True); kept, their text streams like any other token's."""
    tok = build_tokenizer(tmp_path)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    words = tok(" hi there")["input_ids"]
    rest = [start, *words, start]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, [5, start, 6], skip_special_tokens=skip)
        streamed = "".join([detok.add(t) for t in rest] + [detok.flush()])
        assert streamed == tok.decode(rest, skip_special_tokens=skip)
    assert streamed == "<|im_start|> hi there<|im_start|>"


class SlowLike:
    """A tokenizer whose decode, like a slow tokenizer's, puts a space between special tokens'
    texts unless told not to (``spaces_between_special_tokens``)."""

    texts = {0: "<a>", 1: "<b>", 2: "x"}

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=None,
               spaces_between_special_tokens=True):
        parts = [self.texts[i] for i in ids if not (skip_special_tokens and i < 2)]
        return (" " if spaces_between_special_tokens else "").join(parts)


def test_spaces_between_special_tokens_reaches_the_tokenizers_decode():
    def streamed(spaces: bool) -> str:
        detok = IncrementalDetokenizer(SlowLike(), [2], skip_special_tokens=False,
                                       spaces_between_special_tokens=spaces)
        return "".join([detok.add(t) for t in (0, 1, 0, 2)] + [detok.flush()])

    assert streamed(False) == "<a><b><a>x" and streamed(True) == " <a> <b> <a> x"


def _metaspace_tokenizer():
    """A Llama-style tokenizer: unigram pieces over "▁"-joined words with byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"], unk_token="<unk>",
                                      byte_fallback=True)
    tok.train_from_iterator(["Ünïcödé wörds, 東京 and emoji 🚀 too.", "The quick brown fox jumps."] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_tokens(["<think>"])
    return fast


def _decodes_alike(tok, fast):
    from hypothesis import given
    from hypothesis import strategies as st

    @given(st.lists(st.integers(0, len(tok) - 1), max_size=24), st.booleans())
    def check(ids, skip):
        assert fast(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip,
                                                                  clean_up_tokenization_spaces=False)
    return check


def test_the_rust_decode_is_taken_only_where_it_is_transformers_decode_exactly(tmp_path):
    """Where the detokenizer skips transformers' decode for the Rust tokenizer's own, every id
    sequence (special and added tokens, broken UTF-8, either skip setting) decodes the same; a
    tokenizer whose decode is replaced or overridden keeps transformers' path."""
    from loramux.server.detokenizer import backend_decode

    tokenizers = [build_tokenizer(tmp_path / "bpe", extra_specials=("[TOOL_CALLS]",), extra_tokens=("<think>",)),
                  _metaspace_tokenizer()]
    for tok in tokenizers:
        fast = backend_decode(tok)
        assert fast is not None

        _decodes_alike(tok, fast)()
    tok = tokenizers[0]
    tok.decode = lambda ids, **kw: "patched"
    assert backend_decode(tok) is None

    class Custom(type(tokenizers[1])):
        def _decode(self, token_ids, **kw):
            return "custom"

    tokenizers[1].__class__ = Custom
    assert backend_decode(tokenizers[1]) is None
    assert IncrementalDetokenizer(tokenizers[1], [1, 2]).prefix_text == "custom"
