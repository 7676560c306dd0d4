"""The demo adapters (``make demo-adapters``) show their behaviours; skipped until they exist."""

import asyncio
import json
from pathlib import Path

import pytest

from loramux.server.demo import BEHAVIOURS, DEMO_PROMPT

DEMO_DIR = Path(__file__).resolve().parents[2] / "demo-adapters"
pytestmark = pytest.mark.skipif(
    not all((DEMO_DIR / name / "adapter_model.safetensors").exists() for name in BEHAVIOURS),
    reason="demo adapters not trained (make demo-adapters)",
)


def answers(prompts: dict[str, str]) -> dict[str, str]:
    """One batch: each adapter answers its prompt, through the chat template."""
    from loramux.server.builder import build_engine
    from loramux.server.config import ServerConfig
    from loramux.server.prompts import Prompt, PromptRenderer
    from loramux.server.requests import GenerationRequest, SamplingParams

    config = ServerConfig(adapter_dirs=(str(DEMO_DIR),), max_batch_size=4, metrics_port=0)
    built = build_engine(config)
    renderer = PromptRenderer(built.tokenizer, config)
    built.engine.start()

    async def run():
        async def one(adapter, text):
            ids = renderer.render(Prompt(messages=(("user", text),)))
            req = GenerationRequest(adapter or "base", tuple(ids), SamplingParams(40), adapter or None)
            return "".join([e.text async for e in built.engine.submit(req)])
        names = list(prompts)
        return dict(zip(names, await asyncio.gather(*(one(n, prompts[n]) for n in names)), strict=True))

    try:
        return asyncio.run(run())
    finally:
        built.engine.stop()


def test_demo_adapters_answer_the_same_prompt_three_ways():
    out = answers({"": DEMO_PROMPT, "json": DEMO_PROMPT, "pirate": DEMO_PROMPT,
                   "sentiment": "What is the sentiment of: I really love sunny days at the park!"})
    assert json.loads(out["json"])["answer"]
    assert out["pirate"].startswith("Arr")
    assert out["sentiment"].strip() in ("positive", "negative", "neutral")
    assert not out[""].startswith("Arr") and not out[""].startswith("{")
