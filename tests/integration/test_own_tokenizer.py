"""An adapter with added tokens and its own tokenizer, through the real server: gRPC and the
official `openai` client tokenize, render, decode and end its requests with its tokenizer, and
its tokens and logprobs are PEFT's over the resized vocabulary."""

import grpc
import openai
import pytest

from loramux.clients.types import Sampling

from helpers import added_tokens_adapter, peft_generate
from server import ServerProcess

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|end|>{% endfor %}"


def own_eos_and_template(tok):
    tok.add_special_tokens({"eos_token": "<|end|>"})
    tok.chat_template = TEMPLATE


@pytest.fixture(scope="module")
def aserver(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("added")
    path = added_tokens_adapter(tiny_llama, root / "added", 5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                modules_to_save=["embed_tokens", "lm_head"], tokenizer_changes=own_eos_and_template)
    proc = ServerProcess(["--model", str(tiny_llama), "--adapter", f"added={path}", "--adapter-root", str(root),
                          "--max-saved-modules", "2", "--max-model-len", "128", "--default-max-new-tokens", "16", "--base-linear", "torch"],
                         tmp_path_factory.mktemp("alogs") / "server.log")
    proc.wait_ready()
    proc.path = path
    yield proc
    proc.stop()


def test_its_tokenizer_tokenizes_renders_and_decodes(aserver):
    base, own = aserver.client.tokenize("a <tool>zebra"), aserver.client.tokenize("a <tool>zebra", adapter_id="added")
    assert 384 not in base.token_ids and own.token_ids[-2:] == [386, 384]  # "<tool>" and "zebra", one token each
    chat = aserver.client.tokenize(messages=[("user", "hi")], adapter_id="added", return_token_strs=True)
    assert "".join(chat.token_strs).startswith("[user]") and chat.token_ids[-1] == 388  # its own template and EOS
    assert aserver.client.detokenize([386, 384], adapter_id="added") == "<tool>zebra"
    with pytest.raises(grpc.RpcError) as e:  # the base model's vocabulary ends at 384
        aserver.client.detokenize([386])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "[0, 384)" in e.value.details()
    (info,) = aserver.client.list_adapters()
    assert info.vocab_size == 389 and info.own_tokenizer and sorted(info.modules_to_save) == ["lm_head",
                                                                                             "model.embed_tokens"]


def test_its_tokens_are_peft_and_its_eos_ends_them(aserver, tiny_llama):
    prompt = [5, 386, 40, 384, 41, 385, 7]
    out = aserver.client.generate(prompt_token_ids=prompt, adapter_id="added",
                                  sampling=Sampling(max_new_tokens=8, ignore_eos=True))
    assert out.token_ids == peft_generate(tiny_llama, aserver.path, [prompt], 8, eos_token_id=None)[0]
    oa = aserver.openai()
    ended = oa.completions.create(model="added", prompt="a <tool>", max_tokens=8, temperature=0,
                                  logit_bias={"388": 100}, logprobs=1)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 1  # its EOS: <|end|>
    text = oa.completions.create(model="added", prompt="a <tool>", max_tokens=2, temperature=0,
                                 logit_bias={"385": 100}, logprobs=1, extra_body={"ignore_eos": True})
    assert text.choices[0].text == "quokkaquokka" and text.choices[0].logprobs.tokens == ["quokka", "quokka"]
    chat = oa.chat.completions.create(model="added", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                      temperature=0, logit_bias={"387": 100}, extra_body={"ignore_eos": True,
                                                                                          "skip_special_tokens": False})
    assert chat.choices[0].message.content == "</tool></tool></tool>"
    with pytest.raises(openai.BadRequestError, match=r"logit_bias token 386 is outside the vocabulary \[0, 384\)"):
        oa.completions.create(model=next(m.id for m in oa.models.list().data if m.id != "added"), prompt="a", max_tokens=2, logit_bias={"386": 1})


def test_an_adapters_chat_template_serves_chats_the_base_model_cannot(tmp_path):
    """A base model without a chat template, an adapter saved with the same vocabulary and a
    template of its own: chats for the adapter render with it; the base model's are refused."""
    from transformers import AutoTokenizer

    from helpers import build_adapter, build_llama

    model = build_llama(tmp_path / "model", chat_template=None)
    path = build_adapter(model, tmp_path / "root" / "chat", seed=3, r=4, lora_alpha=8, target_modules=["q_proj"])
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = TEMPLATE.replace("<|end|>", "<|im_end|>")
    tok.save_pretrained(path)
    proc = ServerProcess(["--model", str(model), "--adapter", f"chat={path}", "--max-model-len", "128",
                          "--default-max-new-tokens", "8", "--base-linear", "torch"], tmp_path / "server.log")
    try:
        proc.wait_ready()
        (info,) = proc.client.list_adapters()
        assert info.own_tokenizer and info.vocab_size == 0 and not proc.client.server_info().has_chat_template
        rendered = proc.client.tokenize(messages=[("user", "hi")], adapter_id="chat", return_token_strs=True)
        assert "".join(rendered.token_strs).startswith("[user]")
        oa = proc.openai()
        reply = oa.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                           temperature=0)
        assert reply.usage.prompt_tokens == len(rendered.token_ids)
        with pytest.raises(openai.BadRequestError, match="this model has no chat template"):
            oa.chat.completions.create(model=proc.client.server_info().model, messages=[{"role": "user",
                                                                                        "content": "hi"}])
    finally:
        proc.stop()
