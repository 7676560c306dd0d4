"""Domain types of the engine's Python API (no gRPC, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .sampling import SamplingParams


class FinishReason(Enum):
    LENGTH = 1
    EOS = 2
    STOP = 3


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    adapter_id: str | None = None  # None: the base model
    deadline: float | None = None  # time.monotonic() after which the request fails


@dataclass(frozen=True)
class Timing:
    queue_seconds: float = 0.0
    adapter_load_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int
    text: str  # text delta; empty while a character or a possible stop string is incomplete
    finish_reason: FinishReason | None = None  # set on the last event only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timing: Timing | None = None  # last event only
