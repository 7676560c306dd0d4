"""loramux train and merge on a tiny random model."""

import asyncio
import json

import pytest
import torch
from safetensors.torch import load_file

from loramux.adapters.train import DataError, TrainConfig, load_examples, train
from loramux.server.builder import build_engine
from loramux.server.cli import main
from loramux.server.config import ServerConfig
from loramux.server.merge import merge
from loramux.server.requests import GenerationRequest, SamplingParams

from helpers import ALL_PROJ, FAMILY_ADAPTERS, build_adapter, build_family_model, build_llama, peft_generate

EXAMPLES = [{"prompt": f"Q: {w}?\nA:", "completion": f" {w.upper()} {w[::-1]}"}
            for w in ["fox", "dog", "cat", "server", "batch", "adapter", "low", "rank", "token", "queue"]]

# A merged weight W + s·BA rounds once where PEFT adds s·(xA)B to xW: logits of magnitude ~30 (a
# trained lm_head) differ by a few float32 ulps, ~1e-4, so the bound is relative as well.
MERGE_RTOL = 1e-5


def prompt_ids() -> torch.Tensor:
    """Fixed random token ids, so that a failing comparison reproduces."""
    return torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n")
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["lora", "dora"])
def trained(request, tiny_llama, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "adapter"
    cfg = TrainConfig(model_dir=tiny_llama, data=data_file, out=out, rank=8, alpha=16, dropout=0.0, steps=30,
                      lr=5e-3, batch_size=4, max_length=64, targets=("q_proj", "v_proj", "gate_proj"),
                      checkpoint_every=10, dora=request.param)
    return out, train(cfg)


def test_thirty_steps_lower_the_loss(trained, request):
    out, summary = trained
    assert summary["steps"] == 30 and summary["final_loss"] < 0.7 * summary["first_loss"]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    dora = request.node.callspec.params["trained"]
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] == dora
    assert dora == any("lora_magnitude_vector" in k for k in load_file(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("family, targets", [("phi3", ["o_proj", "qkv_proj"]), ("gpt2", ["c_attn", "attn.c_proj"]),
                                             ("bloom", ["query_key_value", "dense"]),
                                             ("nemotron_h", ["in_proj", "q_proj", "k_proj", "v_proj", "o_proj"]),
                                             ("mamba2", ["in_proj"])])
def test_default_targets_are_the_models_attention_projections(family, targets, data_file, tmp_path):
    """Without --targets, each family trains its own attention projections (a name that a linear
    outside attention shares goes with its parent's; a model with no module named as attention: its
    token mixers' projections), and the adapter serves as PEFT does."""
    model = build_family_model(family, tmp_path / "m")
    train(TrainConfig(model_dir=model, data=data_file, out=tmp_path / "a", steps=2, lr=0.05, max_length=32,
                      checkpoint_every=0))
    assert sorted(json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]) == sorted(targets)
    prompt = [5, 17, 33, 60]
    built = build_engine(ServerConfig(model=str(model), max_model_len=64, default_max_new_tokens=16,
                                      adapters=(("trained", str(tmp_path / "a")),)))
    assert served_tokens(built.engine, "trained", prompt, 6) == \
        peft_generate(model, tmp_path / "a", [prompt], 6, eos_token_id=None)[0]


def test_trained_adapter_serves_like_peft(trained, tiny_llama):
    out, _ = trained
    prompt = [5, 17, 33, 60]
    expected = peft_generate(tiny_llama, out, [prompt], 10, eos_token_id=None)[0]
    built = build_engine(ServerConfig(model=str(tiny_llama), max_model_len=64, default_max_new_tokens=16,
                                      enable_dora=True, adapters=(("trained", str(out)),)))
    assert served_tokens(built.engine, "trained", prompt, 10) == expected


def served_tokens(engine, adapter: str, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens of ``prompt`` for ``adapter``, from ``engine`` (started and stopped here)."""
    engine.start()

    async def run():
        req = GenerationRequest("t", tuple(prompt), SamplingParams(n, ignore_eos=True), adapter)
        return [e.token_id async for e in engine.submit(req)]

    try:
        return asyncio.run(run())
    finally:
        engine.stop()


def test_merge_matches_peft_merge_and_unload(trained, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = trained
    merged_dir = merge(tiny_llama, out, tmp_path / "merged")
    ours = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, out).merge_and_unload().eval()
    x = prompt_ids()
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, ref(x).logits, atol=1e-5, rtol=0)
    assert (merged_dir / "tokenizer.json").exists()


def test_resume_continues_from_the_latest_checkpoint(trained, tiny_llama, data_file):
    out, _ = trained
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-20"]
    cfg = TrainConfig(model_dir=tiny_llama, data=data_file, out=out, rank=8, alpha=16, dropout=0.0, steps=24,
                      lr=5e-3, batch_size=4, max_length=64, targets=("q_proj", "v_proj", "gate_proj"),
                      checkpoint_every=10, resume=True)
    assert train(cfg)["steps"] == 24


@pytest.mark.parametrize("content, needle", [
    ("", "no examples"),
    ('{"prompt": "a", "completion": "b"}\n{not json\n', ":2: not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', ":2: 'prompt' and 'completion'"),
    ('{"prompt": "a", "completion": "' + "long " * 80 + '"}\n', ":1: "),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "must end with an assistant turn"),
])
def test_bad_data_names_the_line(tiny_llama, tmp_path, content, needle):
    from transformers import AutoTokenizer

    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=needle.replace("[", r"\[")):
        load_examples(path, AutoTokenizer.from_pretrained(tiny_llama), max_length=64)


def test_cli_reports_bad_data_with_the_line(tiny_llama, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "' + "word " * 100 + '"}\n')
    rc = main(["train", "--model", str(tiny_llama), "--data", str(path), "--out", str(tmp_path / "o"),
               "--max-length", "32"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1:" in err and "--max-length is 32" in err


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family", ["llama", *sorted(set(FAMILY_ADAPTERS) - {"llama"})])
def test_merge_matches_peft_in_every_family(family, dora, tmp_path):
    """Each family's projection layout, GPT-2's Conv1D ([in, out]) included; DoRA adapters too
    (each output row of W + s B A times m / ||W + s B A||)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = build_llama(tmp_path / "m") if family == "llama" else build_family_model(family, tmp_path / "m")
    variants = FAMILY_ADAPTERS.get(family, {"all": dict(r=4, lora_alpha=8, target_modules=ALL_PROJ)})
    for i, (name, kwargs) in enumerate(variants.items()):
        adapter = build_adapter(model_dir, tmp_path / name, seed=i + 1, use_dora=dora, **kwargs)
        ours = AutoModelForCausalLM.from_pretrained(merge(model_dir, adapter, tmp_path / f"merged-{name}"),
                                                    dtype=torch.float32).eval()
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ref = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
        x = prompt_ids()
        with torch.no_grad():
            assert torch.allclose(ours(x).logits, ref(x).logits, atol=1e-4, rtol=MERGE_RTOL), (family, name)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_merge_of_lm_head_lora_unties_a_tied_output_layer(tied, tmp_path):
    """W_lm + s B A goes into lm_head alone: a tied embedding is untied and stays the base model's,
    so the merged model computes what PEFT serves unmerged (PEFT's own merge would change both)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = build_llama(tmp_path / "m", tie_word_embeddings=tied)
    adapter = build_adapter(model_dir, tmp_path / "a", seed=3, r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    ours = AutoModelForCausalLM.from_pretrained(merge(model_dir, adapter, tmp_path / "merged"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert torch.equal(ours.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not ours.config.tie_word_embeddings
    ref = PeftModel.from_pretrained(base, adapter).eval()
    x = prompt_ids()
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x).logits, ref(x).logits, atol=1e-4, rtol=MERGE_RTOL)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_merge_of_token_embedding_lora_matches_peft(family, tmp_path):
    """The embedding's delta (B A)^T goes into its [vocab, hidden] weight; a tied lm_head is untied
    and stays the base model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = build_llama(tmp_path / "m", tie_word_embeddings=True) if family == "llama" else \
        build_family_model(family, tmp_path / "m")
    target = {"llama": "embed_tokens", "gpt2": "wte", "bloom": "word_embeddings"}[family]
    adapter = build_adapter(model_dir, tmp_path / "a", seed=4, r=4, lora_alpha=8, target_modules=[target])
    ours = AutoModelForCausalLM.from_pretrained(merge(model_dir, adapter, tmp_path / "merged"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert torch.equal(ours.lm_head.weight, base.lm_head.weight)
    ref = PeftModel.from_pretrained(base, adapter).eval()
    x = prompt_ids()
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x).logits, ref(x).logits, atol=1e-4, rtol=MERGE_RTOL)


@pytest.mark.parametrize("alone", [False, True], ids=["with-lora", "alone"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_merge_of_trainable_tokens_matches_peft(tied, alone, tmp_path):
    """The listed tokens' rows are replaced in the embedding, and in lm_head where it is tied (then
    untied, as with LoRA on either); the other rows stay the base model's. With LoRA on q_proj,
    or alone (peft_type TRAINABLE_TOKENS)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from helpers import tokens_only_adapter

    model_dir = build_llama(tmp_path / "m", tie_word_embeddings=tied)
    tokens = [4, 11, 250]
    adapter = tokens_only_adapter(model_dir, tmp_path / "a", seed=5, tokens=tokens) if alone else build_adapter(
        model_dir, tmp_path / "a", seed=5, r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=tokens)
    ours = AutoModelForCausalLM.from_pretrained(merge(model_dir, adapter, tmp_path / "merged"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = next(v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "embed_tokens" in k)
    merged_embedding, base_embedding = ours.get_input_embeddings().weight, base.get_input_embeddings().weight
    assert torch.allclose(merged_embedding[tokens], rows, atol=1e-6, rtol=0)
    others = [t for t in range(base_embedding.shape[0]) if t not in tokens]
    assert torch.equal(merged_embedding[others], base_embedding[others])
    assert torch.equal(ours.lm_head.weight[others], base.lm_head.weight[others])
    assert torch.allclose(ours.lm_head.weight[tokens], rows if tied else base.lm_head.weight[tokens], atol=1e-6, rtol=0)
    ref = PeftModel.from_pretrained(base, adapter).eval()
    x = torch.tensor([[3, 4, 17, 11, 250, 9, 4, 40], [250, 5, 6, 11, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x).logits, ref(x).logits, atol=1e-4, rtol=MERGE_RTOL)


@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]],
                         ids=["embedding", "head", "both"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_merge_of_fully_trained_modules_matches_peft(tied, saved, tmp_path):
    """An adapter's own token embedding or lm_head (modules_to_save) replaces the base model's; a
    tied pair is untied, the other layer staying the base model's, as PEFT serves it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = build_llama(tmp_path / "m", tie_word_embeddings=tied)
    adapter = build_adapter(model_dir, tmp_path / "a", seed=6, r=4, lora_alpha=8, target_modules=["q_proj"],
                            modules_to_save=saved)
    ours = AutoModelForCausalLM.from_pretrained(merge(model_dir, adapter, tmp_path / "merged"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert torch.equal(ours.lm_head.weight, base.lm_head.weight) == ("lm_head" not in saved)
    assert torch.equal(ours.get_input_embeddings().weight, base.get_input_embeddings().weight) == \
        ("embed_tokens" not in saved)
    ref = PeftModel.from_pretrained(base, adapter).eval()
    x = prompt_ids()
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x).logits, ref(x).logits, atol=1e-4, rtol=MERGE_RTOL)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_merge_of_added_tokens_resizes_the_model_and_keeps_its_tokenizer(tied, tmp_path):
    """An adapter trained on a resized vocabulary: the merged model has its vocabulary, its
    embedding and lm_head, and its tokenizer, and computes PEFT's logits over it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import added_tokens_adapter, peft_model

    model_dir = build_llama(tmp_path / "m", tie_word_embeddings=tied)
    adapter = added_tokens_adapter(model_dir, tmp_path / "a", 7, r=4, lora_alpha=8, target_modules=["q_proj"])
    merged = merge(model_dir, adapter, tmp_path / "merged")
    ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert ours.config.vocab_size == 388 and len(AutoTokenizer.from_pretrained(merged)) == 388
    x = torch.tensor([[3, 384, 17, 386, 250, 385, 4, 387]])
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, peft_model(model_dir, adapter)(x).logits, atol=1e-4, rtol=MERGE_RTOL)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_training_with_added_tokens_serves_them_like_peft(tied, data_file, tmp_path):
    """loramux train --add-token/--add-special-token: the model resized, the embedding and lm_head
    trained whole (kept tied where they are), the tokenizer saved beside the adapter; served with
    it, token for token as PEFT serves the adapter, the new tokens in the prompt."""
    from transformers import AutoTokenizer

    model = build_llama(tmp_path / "m", tie_word_embeddings=tied)
    data = tmp_path / "tools.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"call {w}:", "completion": f" <tool>{w} zebra</tool>"})
                              for w in ["fox", "dog", "cat", "batch"]) + "\n")
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "6",
                 "--targets", "q_proj,v_proj", "--lr", "1e-2", "--max-length", "32", "--checkpoint-every", "0",
                 "--add-token", "zebra", "--add-special-token", "<tool>", "--add-special-token", "</tool>"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["zebra", "<tool>", "</tool>"]) == [384, 385, 386]
    config = json.loads((out / "adapter_config.json").read_text())
    assert "embed_tokens" in config["modules_to_save"] and config["ensure_weight_tying"] == tied  # PEFT lists one of a tied pair
    built = build_engine(ServerConfig(model=str(model), max_model_len=64, default_max_new_tokens=16,
                                      max_saved_modules=2, adapters=(("tools", str(out)),)))
    manifest = built.registry.lookup("tools").manifest
    assert manifest.vocab_size == 387 and manifest.tokenizer is not None
    assert len({id(m) for m in manifest.saved.values()}) == (1 if tied else 2)
    prompt = tok.encode("call fox: <tool>zebra")
    expected = peft_generate(model, out, [prompt], 10, eos_token_id=None)[0]
    assert served_tokens(built.engine, "tools", prompt, 10) == expected


@pytest.mark.parametrize("family", ["qwen2_5_vl", "mistral3_vlm"])
def test_merge_into_a_vision_language_checkpoint(family, tmp_path, capsys):
    """An adapter on the decoder merges into the whole checkpoint as PEFT merges it; one with LoRA
    on the vision tower too (``all-linear``), which the server skips, is refused rather than
    merged without it, and the CLI says so."""
    from peft import PeftModel

    from helpers import auto_model

    model_dir = build_family_model(family, tmp_path / "m")
    decoder = build_adapter(model_dir, tmp_path / "decoder", seed=1, r=4, lora_alpha=8,
                            target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
    ours = auto_model(merge(model_dir, decoder, tmp_path / "merged"), dtype=torch.float32).eval()
    ref = PeftModel.from_pretrained(auto_model(model_dir, dtype=torch.float32), decoder).merge_and_unload().eval()
    x = prompt_ids()
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, ref(x).logits, atol=1e-4, rtol=MERGE_RTOL)
    whole = build_adapter(model_dir, tmp_path / "whole", seed=2, r=4, lora_alpha=8, target_modules="all-linear")
    assert main(["merge", "--model", str(model_dir), "--adapter", str(whole), "--out", str(tmp_path / "no")]) == 2
    assert "merge it with PEFT's merge_and_unload" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("family, quantized", [("gpt_oss", "mxfp4_copy"), ("qwen3", "fp8_copy"),
                                               ("mistral", "compressed_copy")])
def test_merge_into_a_checkpoint_shipped_quantized_writes_it_dequantized(family, quantized, tmp_path):
    """Merged as the server serves it: the weights dequantized (MXFP4, FP8), the model written
    plain, equal to PEFT's merge over the same dequantized checkpoint."""
    from peft import PeftModel

    import helpers

    model_dir = getattr(helpers, quantized)(build_family_model(family, tmp_path / "source"), tmp_path / "m")
    adapter = build_adapter(model_dir, tmp_path / "qv", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    out = merge(model_dir, adapter, tmp_path / "merged")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ours = helpers.auto_model(out, dtype=torch.float32).eval()
    ref = PeftModel.from_pretrained(helpers.auto_model(model_dir, dtype=torch.float32), adapter).merge_and_unload().eval()
    x = prompt_ids()
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, ref(x).logits, atol=1e-4, rtol=MERGE_RTOL)
