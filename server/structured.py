"""Structured outputs: a request's text must match a JSON schema, a regex, one of a list of
strings, or a grammar (Lark or GBNF).

Each such request holds an llguidance matcher over the model's tokenizer. Before its token is
sampled, the tokens that cannot continue the text toward a match are masked (logits set to -inf,
after penalties and biases, so sampling never picks one); the sampled token then advances the
matcher, and once nothing but the end of text can follow, the request finishes (STOP). Logprobs
stay raw, as for every request.

Grammars come from clients, so they are compiled by llguidance, whose parser and lexer run within
bounded work per token (its default ParserLimits); what it refuses is a clear INVALID_ARGUMENT.
llguidance is a dependency of the package; where it is missing (a hand-made environment), a
request for structured output is refused with FAILED_PRECONDITION and every other request is
served as usual. The service compiles a request's constraint off the event loop (the first one
also builds the tokenizer's index: about 0.4 s for a 49k vocabulary, not paid at start-up); the
engine copies the compiled matcher for each request.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .errors import RequestFailed, RequestInvalid, Unsupported, clip
from .reasoning import HarmonyGate, ReasoningGate
from .requests import MAX_STRUCTURED_OUTPUT_CHARS, OutputKind, StructuredOutput
from .sampling import with_banned

# byte value -> the masks of its 8 tokens (bit j set: token j allowed, 0; else -inf)
_BYTE_BIAS = torch.where(((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool(), 0.0, float("-inf"))
# JSON as OpenAI's json modes write it: fixed separators, no free whitespace (with it, a model can
# emit whitespace until max_tokens); a schema's "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False}
# llguidance's errors when a grammar outgrows its lexer or parser limits as it is followed ("lexer
# error: too many expressions constructed" for a regex of a{1000000}, fuel exhausted, too many items)
_LIMIT_REACHED = re.compile(r"too many|fuel|limit|too large", re.IGNORECASE)
_GRAMMAR_CACHE = 64  # compiled matchers kept, by (kind, spec): a request's n choices, and repeated schemas


def int32_bit(bit: int) -> int:
    """1 << bit as the int32 word that holds it (bit 31 is the sign)."""
    return (1 << bit) - (1 << 32 if bit == 31 else 0)


def any_bit_below(bitmask: torch.Tensor, n: int) -> torch.Tensor:
    """[R] bool: whether each row of ``bitmask`` ([R, W] int32 words) allows a token below ``n``;
    on the words, 30x faster than on the unpacked [R, n] masks."""
    whole, rest = divmod(n, 32)
    alive = (bitmask[:, :whole] != 0).any(-1)
    if rest:
        alive |= (bitmask[:, whole] & ((1 << rest) - 1)) != 0
    return alive


class Grammar:
    """One request's matcher: where its text stands in the grammar. With a reasoning ``gate``,
    the grammar constrains the answer only: the thinking before it is free."""

    def __init__(self, matcher, gate: ReasoningGate | HarmonyGate | None = None):
        self.matcher, self.gate = matcher, gate
        self.spelled: int | None = None  # an added token its text spells next, which it refuses (Grammars._bitmasks)

    @property
    def constrains(self) -> bool:
        """Whether the next token is masked."""
        return self.gate is None or self.gate.constrains

    def advance(self, token: int) -> bool:
        """Take the sampled token; True when nothing but the end of text can follow it."""
        if self.gate is not None and not self.gate.take(token):
            return False
        if not self.matcher.consume_token(token):
            raise failure(self.matcher, f"token {token} does not continue the structured output")
        return self.matcher.is_stopped()


def failure(matcher, what: str) -> Exception:
    """Why ``matcher`` can go no further: the request's own mistake where its grammar outgrew
    llguidance's limits as it was followed, else an internal fault (``what`` happened)."""
    error = matcher.get_error() if matcher.is_error() else ""
    if _LIMIT_REACHED.search(error):
        return RequestInvalid(f"the structured output is beyond llguidance's limits: {clip(error.splitlines()[0], 200)}; "
                              "simplify it")
    return RequestFailed(what + (f": {clip(error, 200)}" if error else ""))


class Grammars:
    """Compiles structured outputs into matchers over one tokenizer, and computes the masks of a
    step's constrained rows. Thread-safe: constraints are compiled off the event loop (``prepare``),
    copied for each request on it (``matcher``), and masked on the engine thread."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int], threads: int = 1):
        self._hf, self.vocab_size, self._eos, self._threads = tokenizer, vocab_size, sorted(eos_token_ids), threads
        self._n_vocab = vocab_size  # the matchers' vocabulary: the model's, or the tokenizer's if larger
        self._lock = threading.Lock()
        self._tokenizer = None
        self._executor = None
        self._pool = None
        self._special: torch.Tensor | None = None  # [S] ids llguidance matches only by id (added tokens): see _bitmasks
        self._compiled: OrderedDict[tuple[OutputKind, str], object] = OrderedDict()  # LRU of prepared matchers

    def _llguidance(self):
        """The module and the tokenizer, built once."""
        try:
            import llguidance
            import llguidance.hf
        except ImportError:
            raise Unsupported("structured output needs the llguidance package, which is not installed") from None
        with self._lock:
            if self._tokenizer is None:
                self._n_vocab = max(self.vocab_size, len(self._hf))
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf, n_vocab=self._n_vocab, eos_token=self._eos or None)
                except ValueError as e:  # a slow (Python) tokenizer
                    raise Unsupported(f"structured output needs a fast tokenizer: {clip(str(e), 200)}") from None
                special = [t for t in range(self._n_vocab) if t not in self._eos and self._tokenizer.is_special_token(t)]
                self._special = torch.tensor(special) if special else None
                self._executor = llguidance.LLExecutor(num_threads=max(1, self._threads))
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return llguidance

    def _compile(self, llguidance, output: StructuredOutput):
        """A matcher at the start of ``output``'s grammar; RequestInvalid names what is wrong."""
        what = f"structured output ({output.kind.value})"
        try:
            if output.kind is OutputKind.JSON_SCHEMA:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(output.spec, defaults=JSON_OPTIONS)
            elif output.kind is OutputKind.REGEX:
                grammar = llguidance.LLMatcher.grammar_from_regex(output.spec)
            elif output.kind is OutputKind.CHOICE:
                choices = json.loads(output.spec)
                if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
                    raise RequestInvalid(f"{what}: the choices must be a non-empty list of strings", param=output.asked_by)
                grammar = llguidance.grammar_from("choice", choices)
            else:
                grammar = llguidance.grammar_from("grammar", output.spec)
        except ValueError as e:  # not JSON, or a grammar llguidance cannot convert
            raise RequestInvalid(f"{what}: {clip(str(e), 300)}", param=output.asked_by) from None
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RequestInvalid(f"{what}: {clip(matcher.get_error(), 300)}", param=output.asked_by)
        return matcher

    def prepare(self, output: StructuredOutput):
        """Compile ``output`` (and, the first time, the tokenizer's index) into a matcher kept for
        the requests that ask for it next: call it off the event loop, as both can take a while.
        Returns that matcher, which must not be advanced (``matcher`` copies it)."""
        if len(output.spec) > MAX_STRUCTURED_OUTPUT_CHARS:
            raise RequestInvalid(f"the structured output's {output.kind.value} is {len(output.spec)} characters; "
                                 f"the limit is {MAX_STRUCTURED_OUTPUT_CHARS}")
        llguidance = self._llguidance()
        key = (output.kind, output.spec)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        matcher = self._compile(llguidance, output)
        with self._lock:
            self._compiled[key] = matcher
            while len(self._compiled) > _GRAMMAR_CACHE:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, output: StructuredOutput, gate: ReasoningGate | HarmonyGate | None = None) -> Grammar:
        """A fresh matcher for one request (a copy of the prepared one)."""
        return Grammar(self.prepare(output).deep_copy(), gate)

    def start(self, grammars: list[Grammar]) -> Future:
        """Compute the next-token bitmasks of ``grammars`` on a thread of their own, while the step's
        forward pass runs (llguidance drops the GIL): nothing advances a matcher before the step
        samples. The future gives ``masks`` its ``computed`` rows."""
        return self._pool.submit(self._bitmasks, grammars)

    def _bitmasks(self, grammars: list[Grammar]) -> dict[int, torch.Tensor]:
        """id(grammar) -> its bitmask row (int32 words, bit t of word t // 32 set: token t allowed)."""
        from llguidance.torch import fill_next_token_bitmask_par

        bitmask = torch.zeros((len(grammars), (self._n_vocab + 31) // 32), dtype=torch.int32)
        fill_next_token_bitmask_par(self._executor, [(g.matcher, j) for j, g in enumerate(grammars)], bitmask)
        for g in grammars:
            g.spelled = None
        if self._special is not None:
            # llguidance's masks allow an added token where the grammar's text may spell it
            # (Qwen's <think>, <tool_call>), and its matcher then refuses the token, matched by id
            # only (as in a Lark grammar's <[id]>): such tokens are masked out unless it takes them
            special = self._special
            for j, s in ((bitmask[:, special // 32] >> (special % 32)) & 1).nonzero().tolist():
                token = int(special[s])
                if not grammars[j].matcher.validate_tokens([token]):
                    word, bit = divmod(token, 32)
                    bitmask[j, word] &= ~int32_bit(bit)
                    grammars[j].spelled = token
        for j, g in enumerate(grammars):
            if g.gate is not None and g.gate.undecided:  # the model may open its thinking instead
                word, bit = divmod(g.gate.start_id, 32)
                bitmask[j, word] |= int32_bit(bit)
        return {id(g): bitmask[j] for j, g in enumerate(grammars)}

    def masks(self, grammars: list[Grammar | None], banned: list[list[int] | None],
              computed: dict[int, torch.Tensor] | None = None
              ) -> tuple[list[torch.Tensor | None], list[list[int] | None], dict[int, Exception]]:
        """For a step's sampling rows: each constrained row's mask ([vocab] float32 on the CPU: 0
        for the tokens its grammar allows next, -inf for the others), with its banned tokens
        (min_new_tokens) folded in unless that would leave none (the grammar wins: its text must be
        able to end); the rows' banned lists, emptied where folded; and the rows whose grammar
        failed (its matcher in error, or no token allowed), each with its error: those rows are
        sampled unmasked and then failed, alone. ``computed``: the bitmasks ``start`` computed for
        these grammars, if it did. A grammar waiting for the answer masks nothing."""
        rows = [i for i, g in enumerate(grammars) if g is not None and g.constrains]
        if not rows:
            return [None] * len(grammars), list(banned), {}
        missing = [grammars[i] for i in rows if computed is None or id(grammars[i]) not in computed]
        if missing:
            computed = {**(computed or {}), **self._bitmasks(missing)}
        bitmask = torch.stack([computed[id(grammars[i])] for i in rows])
        # each byte of the (little-endian) words holds 8 tokens' bits: one gather from the table
        bias = _BYTE_BIAS.index_select(0, bitmask.view(torch.uint8).view(-1).long()).view(len(rows), -1)
        bias = bias[:, : self.vocab_size]
        alive = any_bit_below(bitmask, self.vocab_size).tolist()
        out: list[torch.Tensor | None] = [None] * len(grammars)
        banned = list(banned)
        failed: dict[int, Exception] = {}
        for j, i in enumerate(rows):
            matcher = grammars[i].matcher
            if matcher.is_error() or not alive[j]:
                spelled = grammars[i].spelled
                failed[i] = failure(matcher, "the structured output allows no next token") \
                    if matcher.is_error() or spelled is None else RequestInvalid(
                    f"the structured output's text spells the added token {self._hf.convert_ids_to_tokens(spelled)!r} "
                    f"(id {spelled}), which it matches by id only: write it <[{spelled}]> in a grammar")
                continue
            try:  # one row's fault fails that row alone, never the step
                out[i], banned[i] = with_banned(bias[j], banned[i]), None
            except Exception as error:  # noqa: BLE001
                failed[i] = error
        return out, banned, failed
