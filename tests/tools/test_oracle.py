"""The PEFT oracle's kept answers (helpers.peft_generate): asked again, the same; asked about an
adapter or a model whose files changed in place, answered anew."""

import shutil

from safetensors.torch import load_file, save_file

import helpers
from helpers import peft_generate

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]


def test_an_adapter_changed_in_place_is_asked_again(tiny_llama, tiny_adapters, tmp_path):
    adapter = shutil.copytree(tiny_adapters["attn-r4"], tmp_path / "adapter")
    before = peft_generate(tiny_llama, adapter, PROMPTS, 8, eos_token_id=None)
    assert peft_generate(tiny_llama, adapter, PROMPTS[::-1], 8, eos_token_id=None) == before[::-1]
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v * 40 if "lora_B" in k else v for k, v in load_file(weights).items()}, weights)
    after = peft_generate(tiny_llama, adapter, PROMPTS, 8, eos_token_id=None)
    assert after == helpers._peft_generate(tiny_llama, adapter, PROMPTS, 8, eos_token_id=None)
    assert after != before


def test_a_model_changed_in_place_or_other_arguments_are_asked_again(tiny_llama, tmp_path):
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    before = peft_generate(model, None, PROMPTS, 8, eos_token_id=None)
    stop = before[0][2]
    assert peft_generate(model, None, PROMPTS[:1], 8, eos_token_id=stop)[0] == before[0][:3]
    weights = model / "model.safetensors"
    save_file({k: v.flip(0) if "lm_head" in k or "embed" in k else v for k, v in load_file(weights).items()},
              weights, metadata={"format": "pt"})
    after = peft_generate(model, None, PROMPTS, 8, eos_token_id=None)
    assert after == helpers._peft_generate(model, None, PROMPTS, 8, eos_token_id=None) and after != before
