"""The one place where protobuf messages and domain types meet."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pydantic import ValidationError

from ..v1 import loramux_pb2 as pb
from .errors import RequestInvalid
from .openai_schema import ChatMessage, first_error
from .prompts import ChatOptions, Prompt
from .requests import (
    ANY_JSON_OBJECT,
    OutputKind,
    SamplingParams,
    StructuredOutput,
    Timing,
    TokenEvent,
    TokenLogprob,
)

if TYPE_CHECKING:  # the registry imports torch; this module must not
    from ..adapters.registry import RegisteredAdapter

TIER_PB = {"disk": pb.ADAPTER_TIER_DISK, "host": pb.ADAPTER_TIER_HOST, "device": pb.ADAPTER_TIER_DEVICE}


def sampling_from_pb(s: pb.SamplingParams, default_max_new_tokens: int) -> SamplingParams:
    """Unset fields take the server's defaults; values are validated by the engine."""
    return SamplingParams(
        max_new_tokens=s.max_new_tokens if s.HasField("max_new_tokens") else default_max_new_tokens,
        fit_max_new_tokens=not s.HasField("max_new_tokens"),
        temperature=s.temperature if s.HasField("temperature") else 0.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        min_p=s.min_p if s.HasField("min_p") else 0.0,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs if s.HasField("logprobs") else None,
        presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else 0.0,
        frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else 0.0,
        logit_bias=tuple(sorted(s.logit_bias.items())),
        prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
        min_new_tokens=s.min_new_tokens,
        structured_output=structured_from_pb(s.structured_output) if s.HasField("structured_output") else None,
        skip_special_tokens=s.skip_special_tokens if s.HasField("skip_special_tokens") else True,
        spaces_between_special_tokens=s.spaces_between_special_tokens
        if s.HasField("spaces_between_special_tokens") else True,
        include_stop_str_in_output=s.include_stop_str_in_output,
        allowed_token_ids=tuple(s.allowed_token_ids),
        bad_words=tuple(s.bad_words),
    )


def structured_from_pb(s: pb.StructuredOutput) -> StructuredOutput:
    which = s.WhichOneof("constraint")
    if which is None or (which == "json_object" and not s.json_object):
        raise RequestInvalid("structured_output sets no constraint: set one of json_schema, json_object (true), "
                             "regex, choice, grammar")
    if which == "json_object":
        return ANY_JSON_OBJECT
    if which == "choice":
        return StructuredOutput(OutputKind.CHOICE, json.dumps(list(s.choice.choices)))
    return StructuredOutput(OutputKind(which), getattr(s, which))


def prompt_from_pb(req: pb.GenerateRequest | pb.TokenizeRequest) -> Prompt:
    ids = tuple(getattr(req, "prompt_token_ids", ()))  # TokenizeRequest has none
    chat = ChatOptions(req.add_generation_prompt if req.HasField("add_generation_prompt") else None,
                       req.continue_final_message, template_kwargs(req.chat_template_kwargs), req.chat_template,
                       documents(req.documents))
    return Prompt(req.prompt, ids, tuple(turn_from_pb(i, m) for i, m in enumerate(req.messages)), chat=chat,
                  add_special_tokens=req.add_special_tokens if req.HasField("add_special_tokens") else None,
                  truncate_prompt_tokens=req.truncate_prompt_tokens if req.HasField("truncate_prompt_tokens") else None)


def turn_from_pb(index: int, m: pb.ChatMessage) -> tuple:
    """A chat message as the domain Prompt's turn: (role, content), or with its tool-call fields
    read as OpenAI's chat messages are (server/openai_schema.py), so both APIs render them alike."""
    if not (m.name or m.tool_call_id or m.tool_calls or m.reasoning_content):
        return (m.role, m.content)
    calls = json_field(m.tool_calls, f"messages[{index}].tool_calls", "messages") if m.tool_calls else None
    try:
        message = ChatMessage(role=m.role, content=m.content, name=m.name or None, tool_call_id=m.tool_call_id or None,
                              tool_calls=calls, reasoning_content=m.reasoning_content or None)
    except ValidationError as e:
        raise RequestInvalid(f"messages[{index}].{first_error(e.errors())[1]}", param="messages") from None
    return message.turn(index)


def json_field(text: str, name: str, param: str | None = None):
    """The value of a field that carries JSON text; text that is not JSON is INVALID_ARGUMENT
    naming the field."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise RequestInvalid(f"{name} is not JSON", param=param or name) from None


def template_kwargs(text: str) -> dict:
    """chat_template_kwargs: a JSON object, or empty for none."""
    if not text:
        return {}
    value = json_field(text, "chat_template_kwargs")
    if not isinstance(value, dict):
        raise RequestInvalid(f"chat_template_kwargs must be a JSON object, not {type(value).__name__}",
                             param="chat_template_kwargs")
    return value


def documents(text: str) -> tuple[dict[str, str], ...]:
    """documents: a JSON list of objects of strings, or empty for none."""
    if not text:
        return ()
    value = json_field(text, "documents")
    if not isinstance(value, list) or not all(
            isinstance(d, dict) and all(isinstance(v, str) for v in d.values()) for d in value):
        raise RequestInvalid("documents must be a JSON list of objects whose values are strings", param="documents")
    return tuple(value)


def timing_to_pb(t: Timing | None) -> pb.Timing:
    if t is None:
        return pb.Timing()
    return pb.Timing(queue_seconds=t.queue_seconds, adapter_load_seconds=t.adapter_load_seconds,
                     time_to_first_token_seconds=t.time_to_first_token_seconds, total_seconds=t.total_seconds)


def logprob_to_pb(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def usage_to_pb(last: TokenEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                    cached_prompt_tokens=last.cached_prompt_tokens,
                    accepted_prediction_tokens=last.accepted_prediction_tokens,
                    rejected_prediction_tokens=last.rejected_prediction_tokens)


def set_stop_reason(msg, reason: str | int | None) -> None:
    """A response's stop_reason oneof: the stop string, or the stop token id."""
    if isinstance(reason, str):
        msg.stop_string = reason
    elif reason is not None:
        msg.stop_token_id = reason


def stream_event_to_pb(ev: TokenEvent) -> pb.GenerateStreamResponse:
    msg = pb.GenerateStreamResponse(request_id=ev.request_id, token_id=ev.token_id, text=ev.text)
    if ev.logprob is not None:
        msg.logprob.CopyFrom(logprob_to_pb(ev.logprob))
    if ev.prompt_logprobs:
        msg.prompt_logprobs.extend(logprob_to_pb(lp) for lp in ev.prompt_logprobs)
    if ev.finish_reason is not None:
        msg.finish_reason = ev.finish_reason.value
        msg.usage.CopyFrom(usage_to_pb(ev))
        msg.timing.CopyFrom(timing_to_pb(ev.timing))
        set_stop_reason(msg, ev.stop_reason)
    return msg


def response_to_pb(events: list[TokenEvent]) -> pb.GenerateResponse:
    last = events[-1]
    msg = pb.GenerateResponse(
        request_id=last.request_id, text="".join(e.text for e in events), token_ids=[e.token_id for e in events],
        finish_reason=last.finish_reason.value,
        usage=usage_to_pb(last),
        timing=timing_to_pb(last.timing),
        logprobs=[logprob_to_pb(e.logprob) for e in events if e.logprob is not None],
        prompt_logprobs=[logprob_to_pb(lp) for lp in events[0].prompt_logprobs or ()],
    )
    set_stop_reason(msg, last.stop_reason)
    return msg


def adapter_to_pb(entry: RegisteredAdapter, tier: str, show_path: bool) -> pb.AdapterInfo:
    """``show_path``: server filesystem paths are for admin callers only."""
    spec = entry.manifest.spec
    return pb.AdapterInfo(
        adapter_id=entry.adapter_id, path=str(entry.path) if show_path and not entry.combine else "",
        rank=entry.manifest.lora_rank,
        lora_alpha=spec.lora_alpha,
        target_modules=spec.target_names, size_bytes=entry.manifest.size_bytes, tier=TIER_PB[tier],
        requests_served=entry.requests_served, content_hash=entry.manifest.content_hash, weight=entry.weight,
        keep_resident=entry.keep_resident,
        combine=[pb.WeightedAdapter(adapter_id=part.adapter_id, weight=w) for part, w in entry.combine],
        use_dora=entry.manifest.magnitude,
        trainable_token_ids=spec.trainable_tokens or spec.folded_tokens,
        modules_to_save=sorted(entry.manifest.saved),
        vocab_size=entry.manifest.vocab_size or 0, own_tokenizer=entry.manifest.tokenizer is not None,
    )
