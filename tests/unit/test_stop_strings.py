"""Stop strings over streamed text, token by token (output_processor.py), against the rule stated
on the text as a whole: the output ends with the first token whose text completes a stop string,
cut at the earliest stop string in it (the longest of those starting there, kept with
``include_stop_str_in_output``); nothing after it is ever sent, and every delta is sent once. The processor keeps only the unsent text and what a stop string can reach
back into, so long outputs and stops found late are where it could go wrong."""

import asyncio
import types

from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.server.output_processor import Finished, OutputProcessor
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams
from loramux.server.sampling import SamplerState
from loramux.server.sequence import Sequence


class Pieces:
    """A detokenizer whose token i decodes to pieces[i]."""

    def __init__(self, pieces):
        self.pieces = pieces

    def add(self, token: int) -> str:
        return self.pieces[token]

    def flush(self) -> str:
        return ""


def reference(pieces: list[str], stops: tuple[str, ...], include: bool) -> tuple[str, str | None]:
    """The text of the tokens up to the first whose text completes a stop string, cut there: at the
    earliest stop string in it, the longest of those starting there (kept if ``include``)."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [(text.find(s), -len(s), s) for s in stops if s in text]
        if hits:
            at, _, stop = min(hits)
            return text[: at + len(stop) if include else at], stop
    return text, None


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.text(alphabet="abc ", max_size=4), min_size=1, max_size=60),
       stops=st.lists(st.text(alphabet="abc ", min_size=1, max_size=5), max_size=3).map(tuple),
       include=st.booleans())
def test_streamed_text_stops_as_the_whole_text_says(pieces, stops, include):
    params = SamplingParams(len(pieces), stop=stops, include_stop_str_in_output=include, ignore_eos=True)
    seq = Sequence(request=GenerationRequest("r", (0,), params, None), adapter=None, adapter_entry=None, identity=b"",
                   weight=1.0, sampler=SamplerState(params), detok=Pieces(pieces), queue=asyncio.Queue(), loop=None,
                   ids=[0], num_prompt=1, arrival=0.0, vocab=types.SimpleNamespace(eos_token_ids=set()))
    output = OutputProcessor([])
    sent = []
    for token in range(len(pieces)):
        out = output.on_token(seq, token)
        if isinstance(out, Finished):
            sent.append(out.delta)
            break
        sent.append(out.text)
    expected, stop = reference(pieces, stops, include)
    assert isinstance(out, Finished) and "".join(sent) == expected
    assert out.reason is (FinishReason.STOP if stop is not None else FinishReason.LENGTH) and out.stop_reason == stop
    assert len(seq.text) <= len(seq.text[seq.emitted:]) + max(map(len, stops), default=0)  # the sent text is dropped
