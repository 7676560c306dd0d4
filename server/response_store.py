"""Responses kept for the Responses API: a later request continues one by ``previous_response_id``,
and ``GET`` / ``DELETE /v1/responses/{id}`` read or drop one.

Each kept response holds its response object and its whole conversation as input items (the
conversation it continued, its own input, its output), so a chain is read in one lookup and
outlives its ancestors' eviction. The store is least recently used first, bounded by the bytes of
those items and objects as JSON (--responses-store-bytes; 0 keeps none). It lives in memory: a
restart forgets it, as vLLM's store does.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

from .errors import NotStored, clip

UNFINISHED = ("queued", "in_progress")  # a background response's states before it is done


@dataclass(frozen=True)
class StoredResponse:
    response: dict  # the response object, as it was returned
    conversation: tuple[dict, ...]  # input items: what it continued, its input, its output
    size: int  # bytes, as JSON
    inputs: int  # the conversation's items before its output: what it was given
    events: tuple[dict, ...] | None = None  # a background response's stream events, kept for GET ?stream=true

    def input_items(self) -> list[dict]:
        """Its input items (what it continued, then its own input) in OpenAI's listed form, oldest
        first, each with an id of its own."""
        out = []
        for i, item in enumerate(self.conversation[: self.inputs]):
            kind, at = item.get("type", "message"), f"{self.response['id']}_{i}"
            if kind == "message":
                text = "input_text" if item.get("role") != "assistant" else "output_text"
                content = item.get("content")
                parts = [{"type": text, "text": content or ""}] if not isinstance(content, list) else content
                out.append({"id": f"msg_{at}", "type": "message", "role": item.get("role"), "content": parts,
                            "status": "completed"})
            else:
                out.append({"id": f"{'fc' if kind == 'function_call' else 'fco'}_{at}", **item, "status": "completed"})
        return out


class ResponseStore:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.unfinished = 0  # kept background responses queued or in progress
        self._kept: OrderedDict[str, StoredResponse] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, response: dict, conversation: list[dict], inputs: int | None = None,
            events: list[dict] | None = None) -> bool:
        """Keep ``response`` (a later one with its id replaces it), evicting the least recently
        used; False, keeping nothing, when it alone is over the bound. ``inputs``: the
        conversation's items before the response's output (None: all); ``events``: its stream
        events, counted in its bytes."""
        size = len(json.dumps([response, conversation, events], separators=(",", ":"), default=str))
        self._drop(response["id"])
        if size > self.max_bytes:
            return False
        self._kept[response["id"]] = StoredResponse(response, tuple(conversation), size,
                                                    len(conversation) if inputs is None else inputs,
                                                    None if events is None else tuple(events))
        self.bytes += size
        self.unfinished += response.get("status") in UNFINISHED
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._kept)))
        return True

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """``param``: the request field that named it, for the error."""
        kept = self._kept.get(response_id)
        if kept is None:
            why = "" if self.enabled else " (the server keeps none: --responses-store-bytes is 0)"
            raise NotStored(f"response {clip(response_id)} is not stored here{why}", param=param)
        self._kept.move_to_end(response_id)
        return kept

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        self._drop(response_id)

    def _drop(self, response_id: str) -> None:
        kept = self._kept.pop(response_id, None)
        if kept is not None:
            self.bytes -= kept.size
            self.unfinished -= kept.response.get("status") in UNFINISHED
