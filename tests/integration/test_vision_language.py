"""A vision-language checkpoint served for text through the real server and the official `openai`
client: loaded as its image-text-to-text model, its chat template (which loops over a message's
content parts, as SmolVLM's does) given the text as parts, an adapter trained on the whole model
served, and an image part refused, naming what is served."""

import openai
import pytest

from helpers import build_adapter, build_family_model
from server import ServerProcess

# SmolVLM's chat template, as its checkpoints ship it (images left out)
TEMPLATE = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
            "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
            "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}{% endif %}"
            "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    model = build_family_model("smolvlm", root / "model")
    (model / "chat_template.jinja").write_text(TEMPLATE)  # where transformers saves and reads it
    adapter = build_adapter(model, root / "whole", seed=1, r=4, lora_alpha=8, target_modules="all-linear")
    proc = ServerProcess(["--model", str(model), "--max-model-len", "128", "--default-max-new-tokens", "8",
                          "--base-linear", "torch", "--adapter", f"whole={adapter}"],
                         tmp_path_factory.mktemp("logs") / "server.log")
    proc.wait_ready()
    proc.model = proc.client.server_info().model
    yield proc
    proc.stop()


def test_chat_reaches_a_template_that_reads_content_parts(vlm):
    oa = vlm.openai()
    ask = [{"role": "user", "content": "the quick brown fox"}]
    shown = vlm.client.detokenize(vlm.client.tokenize(messages=[("user", "the quick brown fox")]).token_ids)
    assert shown == "<|im_start|>User: the quick brown fox<end_of_utterance>\nAssistant:"
    for model in (vlm.model, "whole"):
        got = oa.chat.completions.create(model=model, messages=ask, max_tokens=4, temperature=0)
        assert got.usage.prompt_tokens == len(vlm.client.tokenize(messages=[("user", "the quick brown fox")]).token_ids)
        assert got.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError, match="message content of type 'image_url' is not supported; only text"):
        oa.chat.completions.create(model=vlm.model, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
