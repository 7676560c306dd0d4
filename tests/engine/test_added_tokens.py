"""Adapters trained on a resized vocabulary (added tokens), with the tokenizer saved beside them:
token for token against PEFT in every family, in one batch with plain adapters and the base model
(rows of different vocabularies in one step), prompts using the added tokens; each request's own
tokenizer, EOS and structured output; what registration keeps of a tokenizer saved beside an
adapter; and the refusals that name what cannot be served."""

import asyncio
import gc
import json
import shutil
import weakref

import pytest
import torch
from safetensors import safe_open
from test_dora import MAX_NEW, check_against_peft
from test_embedding_lora import EMBEDDING, engine_for

from loramux.adapters.errors import AdapterInvalid
from loramux.server.config import StartupError
from loramux.server.requests import GenerationRequest, OutputKind, SamplingParams, StructuredOutput

from helpers import (
    BIASED_HEAD,
    FAMILY_ADAPTERS,
    added_tokens_adapter,
    build_adapter,
    build_family_model,
    build_llama,
    rewrite_adapter,
)
from test_parity import make_prompts, serve_in_turn

ADDED = 4  # added_tokens_adapter's default: two tokens and two special tokens


def with_added(prompts, vocab, seed):
    """The prompts with an added token (ids vocab .. vocab + ADDED - 1) in every other place."""
    return [[vocab + (seed + j) % ADDED if j % 2 else t for j, t in enumerate(p)] for p in prompts]


@pytest.mark.parametrize("family", sorted(FAMILY_ADAPTERS))
def test_added_tokens_match_peft_in_every_family(family, tmp_path):
    """Two resized adapters as PEFT saves them by default: trained copies of both layers
    (modules_to_save, written with the wrapper's parts), and LoRA alone with the resized layers
    PEFT writes beside it; with a plain adapter and the base model, staggered."""
    model = build_family_model(family, tmp_path / "model")
    first, second = FAMILY_ADAPTERS[family].items()
    adapters = {
        "copies": added_tokens_adapter(model, tmp_path / "copies", 1, modules_to_save=[EMBEDDING[family], "lm_head"],
                                       **first[1]),
        "resized-lora": added_tokens_adapter(model, tmp_path / "resized", 2, **second[1]),
        second[0]: build_adapter(model, tmp_path / "second", seed=4, **second[1]),
    }
    with safe_open(adapters["copies"] / "adapter_model.safetensors", "pt") as f:  # PEFT's default layout
        assert any(k.endswith("lm_head.original_module.weight") for k in f.keys())
    if family in BIASED_HEAD:  # both resize lm_head, and its bias with it: refused, naming the bias
        for name in ("copies", "resized-lora"):
            with pytest.raises(StartupError, match="this model's lm_head has a bias"):
                engine_for(model, {name: adapters[name]}, max_lora_rank=16, max_saved_modules=4,
                           enable_embedding_lora=False)
        return
    built = engine_for(model, adapters, max_lora_rank=16, max_saved_modules=4, enable_embedding_lora=False)
    vocab = built.engine.vocab_size
    assert {e.adapter_id: e.manifest.vocab_size for e in built.registry.list()} == {
        "copies": vocab + ADDED, "resized-lora": vocab + ADDED, second[0]: None}
    names = [None, *adapters]
    prompts = make_prompts(vocab, 12, seed=5)
    prompts = [with_added([p], vocab, i)[0] if names[i % len(names)] in ("copies", "resized-lora") else p
               for i, p in enumerate(prompts)]
    requests, prompts, outs = serve_in_turn(built.engine, names, 12, seed=5, max_new=MAX_NEW, prompts=prompts)
    check_against_peft(model, adapters, requests, prompts, outs)
    assert not built.manager.pool.pinned()


def test_added_tokens_are_generated_and_their_rows_read(tmp_path):
    """An added token's logits row is the adapter's own: biased towards it, a request generates
    it and then goes on as PEFT does; the base model's rows in the same steps end at its
    vocabulary. Greedy logprobs are those of PEFT's log-softmax over the resized vocabulary."""
    model = build_llama(tmp_path / "model")
    path = added_tokens_adapter(model, tmp_path / "added", 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                modules_to_save=["embed_tokens", "lm_head"])
    built = engine_for(model, {"added": path}, max_saved_modules=2, enable_embedding_lora=False)
    engine, vocab = built.engine, built.engine.vocab_size
    prompt = make_prompts(vocab, 1, seed=7)[0]

    async def run():
        async def one(rid, adapter, **sampling):
            stream = engine.submit(GenerationRequest(rid, tuple(prompt), SamplingParams(
                MAX_NEW, ignore_eos=True, logprobs=2, **sampling), adapter))
            return [ev async for ev in stream]
        return await asyncio.gather(one("a", "added", logit_bias=((vocab + 1, 100.0),)), one("b", "added"),
                                    one("c", None, logit_bias=((vocab - 1, 100.0),)))

    engine.start()
    try:
        biased, plain, base = asyncio.run(run())
    finally:
        engine.stop()
    assert [ev.token_id for ev in biased] == [vocab + 1] * MAX_NEW
    assert all(ev.token_id < vocab for ev in base)
    from helpers import peft_logprobs
    tokens = [ev.token_id for ev in plain]
    expected = peft_logprobs(model, path, prompt, tokens)
    assert expected.shape[1] == vocab + ADDED
    for j, ev in enumerate(plain):
        assert ev.logprob.logprob == pytest.approx(expected[j, tokens[j]].item(), abs=1e-4)
        assert [t for t, _ in ev.logprob.top] == expected[j].topk(2).indices.tolist()


@pytest.mark.parametrize("overlap", [False, True], ids=["masks-after", "masks-during-forward"])
def test_an_adapters_tokenizer_ends_and_writes_its_text(overlap, tmp_path):
    """The adapter's EOS (an added special token) ends its requests and not the base model's; its
    text is decoded by its own tokenizer; a structured output is masked over its vocabulary, in
    the same step as one over the base model's, the masks computed after the forward pass (as on a
    CPU) or during it (as on an accelerator), one call per vocabulary."""
    model = build_llama(tmp_path / "model")

    def own_eos(tok):
        tok.add_special_tokens({"eos_token": "<|end|>"})

    path = added_tokens_adapter(model, tmp_path / "added", 4, r=4, lora_alpha=8, target_modules=["q_proj"],
                                modules_to_save=["embed_tokens", "lm_head"], tokenizer_changes=own_eos)
    built = engine_for(model, {"added": path}, max_saved_modules=2, enable_embedding_lora=False)
    engine, vocab = built.engine, built.engine.vocab_size
    engine.overlap_masks = overlap
    own = engine.vocabulary("added")
    end = own.tokenizer.convert_tokens_to_ids("<|end|>")
    assert end == vocab + ADDED and own.size == vocab + ADDED + 1 and end in own.eos_token_ids
    assert end not in engine.vocabulary(None).eos_token_ids
    choice = StructuredOutput(OutputKind.CHOICE, json.dumps(["zebra quokka", "no"]))
    prompt = tuple(make_prompts(vocab, 1, seed=8)[0])

    async def run():
        async def one(rid, adapter, max_new=MAX_NEW, **sampling):
            stream = engine.submit(GenerationRequest(rid, prompt, SamplingParams(max_new, **sampling), adapter))
            return [ev async for ev in stream]
        return await asyncio.gather(
            one("eos", "added", logit_bias=((end, 100.0),)),
            one("text", "added", logit_bias=((vocab, 100.0),), max_new=3, ignore_eos=True),
            one("choice", "added", structured_output=choice, logit_bias=((vocab, 50.0),)),
            one("base-choice", None, structured_output=choice),
            one("base", None, max_new=2, ignore_eos=True))

    engine.start()
    try:
        eos, text, choice_out, base_choice, base = asyncio.run(run())
    finally:
        engine.stop()
    assert [ev.token_id for ev in eos] == [end] and eos[-1].finish_reason.name == "EOS"
    assert "".join(ev.text for ev in text) == "zebrazebrazebra"  # the added token's own text, thrice
    assert "".join(ev.text for ev in choice_out) in ("zebra quokka", "no")
    assert any(ev.token_id >= vocab for ev in choice_out)  # "zebra" is one added token in its vocabulary
    assert "".join(ev.text for ev in base_choice) in ("zebra quokka", "no")
    assert all(ev.token_id < vocab for ev in base_choice + base)
    assert len(base) == 2


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_tokens_over_added_tokens_match_peft(tied, tmp_path):
    """PEFT's own recipe for added tokens: resize, then LoRA with trainable_token_indices on the new
    ids (PEFT saves the resized layers beside their rows). Their rows are written into the resized
    copies at registration, so no LoRA on the embedding is needed (the server runs without
    --enable-embedding-lora); token for token as PEFT serves it, beside the base model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_llama(tmp_path / "model", tie_word_embeddings=tied)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>"]})
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    base.resize_token_embeddings(len(tok), mean_resizing=False)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 trainable_token_indices=[384, 385, 7], lora_dropout=0.0))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    path = tmp_path / "tokens"
    peft_model.save_pretrained(path)
    tok.save_pretrained(path)
    plain = build_adapter(model, tmp_path / "plain", seed=5, r=4, lora_alpha=8, target_modules=["q_proj"])
    adapters = {"tokens": path, "plain": plain}
    built = engine_for(model, adapters, max_saved_modules=2, enable_embedding_lora=False, max_lora_rank=4,
                       max_device_adapters=1, max_host_adapters=1)  # loaded again and again
    manifest = built.registry.lookup("tokens").manifest
    assert manifest.vocab_size == 386 and manifest.spec.folded_tokens == (384, 385, 7)
    assert not manifest.spec.trainable_tokens and manifest.rank == 4  # nothing of the tokens is paged
    vocab = built.engine.vocab_size
    prompts = [with_added([p], vocab, i)[0] if i % 3 == 1 else p for i, p in enumerate(make_prompts(vocab, 6, seed=3))]
    prompts = [[t if t < vocab + 2 else 7 for t in p] for p in prompts]  # the two added tokens and token 7
    requests, prompts, outs = serve_in_turn(built.engine, [None, "tokens", "plain"], 6, seed=3, max_new=MAX_NEW,
                                            prompts=prompts)
    assert built.manager.pool.evictions > 0
    check_against_peft(model, adapters, requests, prompts, outs)


def test_a_vocabulary_padded_without_new_tokens_keeps_the_base_tokenizer(tmp_path):
    """resize_token_embeddings(pad_to_multiple_of=...) with the base tokenizer saved beside: served
    over the padded vocabulary with the base model's tokenizer, as PEFT serves it, beside the base
    model; without the tokenizer beside it, refused."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_llama(tmp_path / "model")
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    base.resize_token_embeddings(384, pad_to_multiple_of=100, mean_resizing=False)  # 400 rows
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    path = tmp_path / "padded"
    peft_model.save_pretrained(path, save_embedding_layers=True)
    AutoTokenizer.from_pretrained(model).save_pretrained(path)
    built = engine_for(model, {"padded": path}, max_saved_modules=2, enable_embedding_lora=False)
    manifest = built.registry.lookup("padded").manifest
    assert manifest.vocab_size == 400 and manifest.tokenizer is None
    vocab = built.engine.vocabulary("padded")
    assert vocab.size == 400 and vocab.tokenizer is built.engine.tokenizer
    requests, prompts, outs = serve_in_turn(built.engine, [None, "padded"], 6, seed=9, max_new=MAX_NEW)
    check_against_peft(model, {"padded": path}, requests, prompts, outs)
    bare = tmp_path / "bare"
    shutil.copytree(path, bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    built.registry.roots = (tmp_path.resolve(),)
    with pytest.raises(AdapterInvalid, match="resized vocabulary of 400 tokens, and no tokenizer is saved beside"):
        built.registry.register("bare", bare)


def test_the_base_tokenizer_beside_an_adapter_is_served_as_the_base_model_serves_it(tmp_path):
    """A base model whose tokenizer has more tokens than its embedding rows (added tokens the model
    has no rows for): an adapter saved with that tokenizer beside it registers, as the base model
    serves it; an own tokenizer of that length is refused."""
    from transformers import AutoTokenizer

    model = build_llama(tmp_path / "model", vocab_size=380)  # the tokenizer has 384
    path = build_adapter(model, tmp_path / "plain", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    AutoTokenizer.from_pretrained(model).save_pretrained(path)
    built = engine_for(model, {"plain": path})
    assert built.registry.lookup("plain").manifest.tokenizer is None
    own = tmp_path / "own"
    shutil.copytree(path, own)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(own)
    built.registry.roots = (tmp_path.resolve(),)
    with pytest.raises(AdapterInvalid, match="the adapter's tokenizer has 384 tokens; its vocabulary .* has 380"):
        built.registry.register("own", own)


def test_registration_keeps_a_tokenizer_only_where_it_is_the_adapters_own(tmp_path):
    """The base model's tokenizer saved beside an adapter (as trainers save it) is not kept: the
    base model's serves it; one with a chat template of its own is kept, with the base
    vocabulary; identical files load once."""
    model = build_llama(tmp_path / "model")
    plain = build_adapter(model, tmp_path / "plain", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    same = tmp_path / "same"
    shutil.copytree(plain, same)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(model).save_pretrained(same)
    templated = []
    for name in ("templated", "templated-too"):
        templated.append(tmp_path / name)
        shutil.copytree(plain, templated[-1])
        tok = AutoTokenizer.from_pretrained(model)
        tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        tok.save_pretrained(templated[-1])
    built = engine_for(model, {"same": same, "templated": templated[0], "templated-too": templated[1]})
    manifests = {e.adapter_id: e.manifest for e in built.registry.list()}
    assert manifests["same"].tokenizer is None and manifests["same"].vocab_size is None
    own = manifests["templated"].tokenizer
    assert own is not None and manifests["templated-too"].tokenizer is own and manifests["templated"].vocab_size is None
    vocab = built.engine.vocabulary("templated")
    assert vocab.size == built.engine.vocab_size and vocab.renderer.has_chat_template
    assert vocab is built.engine.vocabulary("templated-too") is not built.engine.vocabulary(None)
    with pytest.raises(ValueError, match="has a tokenizer of its own, which cannot be combined"):
        built.registry.register_combination("mix", [("templated", 1.0)])
    # unregistered, its tokenizer and vocabulary go once another is made
    gone = weakref.ref(own)
    built.registry.roots = (tmp_path.resolve(),)
    for name in ("templated", "templated-too"):
        built.registry.unregister(name)
    del own, vocab, manifests
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(same)
    built.registry.register("other", same)
    assert built.engine.vocabulary("other").renderer.has_chat_template and len(built.engine.vocabularies) == 1
    gc.collect()
    assert gone() is None


def test_refusals_name_what_cannot_be_served(tmp_path):
    model = build_llama(tmp_path / "model")
    good = added_tokens_adapter(model, tmp_path / "good", 1, r=4, lora_alpha=8, target_modules=["q_proj"],
                                modules_to_save=["embed_tokens", "lm_head"], save_embedding_layers=False)
    registry = engine_for(model, {}, max_saved_modules=2).registry
    registry.roots = (tmp_path.resolve(),)
    head = "base_model.model.lm_head.weight"

    def drop(*names):
        return lambda out: [(out / n).unlink() for n in names]

    cases = {
        "no-tokenizer": (dict(), drop("tokenizer.json", "tokenizer_config.json"),
                         "trained on a resized vocabulary of 388 tokens, and no tokenizer is saved beside"),
        "head-only": (dict(config={"modules_to_save": ["lm_head"]},
                           tensors=lambda t: {k: v for k, v in t.items() if "embed_tokens" not in k}), None,
                      r"\(lm_head 388 tokens\) resize the base model's vocabulary of 384: a resized vocabulary is "
                      "served with trained copies of both"),
        "two-sizes": (dict(tensors=lambda t: {**t, head: t[head][:386]}), None,
                      r"\(lm_head 386, model.embed_tokens 388 tokens\)"),
        "stray-part": (dict(tensors=lambda t: {**t, "base_model.model.lm_head.original_module.weight":
                                               torch.zeros(5, 64)}), None,
                       "a part of PEFT's wrapper of 'lm_head' without the fully trained copy it wraps"),
        "short-vocab": (dict(tensors=lambda t: {k: v[:386] if k.endswith("embed_tokens.weight") or k == head else v
                                                 for k, v in t.items()}), None,
                        "the adapter's tokenizer has 388 tokens; its vocabulary .* has 386"),
        "broken-tokenizer": (dict(), lambda out: (out / "tokenizer.json").write_text("{not json"),
                             "the adapter's tokenizer cannot be loaded"),
    }
    for name, (change, files, message) in cases.items():
        out = rewrite_adapter(good, tmp_path, name, **change)
        for f in good.iterdir():
            if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                shutil.copy(f, out)
        if files is not None:
            files(out)
        with pytest.raises(AdapterInvalid, match=message):
            registry.register(name, out)
    assert len(registry.saved) == 0
    registry.register("good", good)
    plain = engine_for(model, {}).registry  # without --max-saved-modules
    plain.roots = registry.roots
    with pytest.raises(AdapterInvalid, match="fully trained modules are not enabled on this server"):
        plain.register("good", good)
    loose = added_tokens_adapter(model, tmp_path / "loose", 2, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(AdapterInvalid, match="PEFT saves a resized vocabulary's embedding layers so; serving them "
                                             "needs --max-saved-modules N"):
        plain.register("loose", loose)


def test_a_seeded_row_samples_the_same_token_beside_a_larger_vocabulary():
    """A row padded with -inf past its vocabulary (a batch with an adapter's larger one) is finite,
    and samples what it samples alone; a NaN in its own part still fails it alone."""
    from loramux.server.sampling import SamplerState, sample

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=gen)
    wide = torch.full((3, 50), float("-inf"))
    wide[:, :40] = logits
    wide[1] = torch.randn(50, generator=gen)
    wide[2, 5] = float("nan")
    params = SamplingParams(4, temperature=0.8, top_p=0.9, seed=11)

    def states():
        return [SamplerState.create(params, "cpu") for _ in range(3)]

    alone = sample(logits[:1].clone(), states()[:1], [None])
    out = sample(wide.clone(), states(), [None] * 3, widths=[40, 50, 40])
    assert out[0] == alone[0] and isinstance(out[1], int)
    assert isinstance(out[2], ArithmeticError)
    unmarked = sample(wide.clone(), states(), [None] * 3)  # without widths the padding is a fault
    assert isinstance(unmarked[0], ArithmeticError)


def test_a_request_is_checked_against_the_version_it_runs_on(tmp_path, monkeypatch):
    """An adapter replaced by a version of the base vocabulary between a request's check and its
    admission: the request runs on the new version, so its added tokens are refused then, and it
    holds no place in the queue."""
    from loramux.server.errors import RequestInvalid

    model = build_llama(tmp_path / "model")
    added = added_tokens_adapter(model, tmp_path / "added", 1, r=4, lora_alpha=8, target_modules=["q_proj"],
                                 modules_to_save=["embed_tokens", "lm_head"])
    plain = build_adapter(model, tmp_path / "plain", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"])
    built = engine_for(model, {"a": added}, max_saved_modules=2)
    built.registry.roots = (tmp_path.resolve(),)
    engine, resolve = built.engine, built.manager.resolve

    def replaced_first(adapter_id):
        built.registry.register(adapter_id, plain, replace=True)
        return resolve(adapter_id)

    monkeypatch.setattr(built.manager, "resolve", replaced_first)

    async def submit():
        engine.submit(GenerationRequest("r", (5, engine.vocab_size + 1, 7), SamplingParams(4), "a"))

    with pytest.raises(RequestInvalid, match=r"prompt_token_ids \[385\] are outside the vocabulary \[0, 384\)"):
        asyncio.run(submit())
    assert engine.num_in_flight == 0 and built.registry.lookup("a").manifest.tokenizer is None


@pytest.mark.parametrize("family", ["gemma3_vlm", "mistral3_vlm", "qwen2_5_vl"])
def test_added_tokens_on_a_vision_language_checkpoint_match_peft(family, tmp_path):
    """On a vision-language checkpoint PEFT writes resized layers as plain weights under their
    names on the whole model (``model.language_model.embed_tokens.weight``), when asked: served as
    PEFT serves them, beside trained copies and the base model. Its default ("auto") does not
    detect the resize there (the top config has no vocab_size) and writes none: such an adapter
    lacks its new rows, and is refused, saying so."""
    from safetensors import safe_open

    model = build_family_model(family, tmp_path / "model")
    qv = dict(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    adapters = {
        "copies": added_tokens_adapter(model, tmp_path / "copies", 1, modules_to_save=["embed_tokens", "lm_head"], **qv),
        "resized-lora": added_tokens_adapter(model, tmp_path / "resized", 2, save_embedding_layers=True, **qv),
    }
    with safe_open(adapters["resized-lora"] / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.model.language_model.embed_tokens.weight" in f.keys()
    built = engine_for(model, adapters, max_lora_rank=16, max_saved_modules=4, enable_embedding_lora=False)
    vocab = built.engine.vocab_size
    names = [None, *adapters]
    prompts = [with_added([p], vocab, i)[0] if names[i % len(names)] else p
               for i, p in enumerate(make_prompts(vocab - 4, 9, seed=5))]  # not the image tokens
    requests, prompts, outs = serve_in_turn(built.engine, names, 9, seed=5, max_new=MAX_NEW, prompts=prompts)
    check_against_peft(model, adapters, requests, prompts, outs)
    unsaved = added_tokens_adapter(model, tmp_path / "unsaved", 3, **qv)
    with pytest.raises(StartupError, match="the adapter's tokenizer has 388 tokens; its vocabulary .* has 384"):
        engine_for(model, {"unsaved": unsaved}, max_lora_rank=16, max_saved_modules=4, enable_embedding_lora=False)
