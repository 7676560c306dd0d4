"""What every serving model shares: the forward skeleton, the LoRA layout and store binding.

A family subclass sets ``layers`` (each with ``lora_modules()``), ``final_norm``, ``lm_head``,
``kv_spec`` and ``EMBEDDING``, implements ``embed(batch)`` (through ``embed_with_lora``, which adds
the token embedding's LoRA), and lists its decoder's LoRA targets in ``lora_targets(config)``.
LoRA on lm_head runs in ``forward``, on the logits rows.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters.config import HEAD, leaf
from ...adapters.loader import LoRALayout, row_sq_norms
from ..kv_cache import PagedKVCache
from ..ops.embedding import embedding_lora
from ..ops.linear import Linear
from ..ops.quantize import Int8Linear, dequantize_int8
from .batch import StepBatch
from .layers import with_lora


class RecurrentLayers:
    """A serving model mixin: a hybrid whose recurrent layers keep a state per sequence
    (recurrent_state.py), their specs ``recurrent_states`` set when it is built. The static decode
    path (decode_graphs.py) holds no such state.

    A hybrid of two kinds of layer builds each (LlamaForServing's ``LAYER`` hook) by its type in the
    config's ``TYPES`` list: ``RECURRENT_LAYER(hf_layer, config, layer, its first state's index,
    int8)`` for ``RECURRENT``, each holding ``STATES`` states, else ``ATTENTION_LAYER(hf_layer,
    config, layer, its K/V layer, cos, sin, int8)``."""

    CUDA_GRAPHS = False
    NO_GRAPHS = "recurrent state, which the static decode path does not hold"
    recurrent_states: list = []
    TYPES, RECURRENT, STATES = "layer_types", "linear_attention", 2
    RECURRENT_LAYER: type
    ATTENTION_LAYER: type

    def state_specs(self) -> list[tuple[tuple[int, ...], torch.dtype | None]]:
        return self.recurrent_states

    def LAYER(self, hf_layer, config, layer: int, cos, sin, int8: bool = False):  # noqa: N802 - LlamaForServing's hook
        types = getattr(config, self.TYPES)
        recurrent = types[:layer].count(self.RECURRENT)
        if types[layer] == self.RECURRENT:
            return self.RECURRENT_LAYER(hf_layer, config, layer, self.STATES * recurrent, int8)
        return self.ATTENTION_LAYER(hf_layer, config, layer, layer - recurrent, cos, sin, int8)


class ServingModel(nn.Module):
    config: object
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    kv_spec: tuple[int, int, int]  # (layers, kv heads, head dim)
    FUSED_KINDS: tuple[tuple[str, ...], ...] = ()  # kinds computed as one linear over one input
    head_store: tuple[torch.Tensor, torch.Tensor] | None = None  # lm_head's adapter pages, when it is a target
    EMBEDDING: tuple[str, str]  # the token embedding: (its Hugging Face module name, this model's attribute)
    embedding_store: tuple[torch.Tensor, torch.Tensor] | None = None  # its adapter pages, when it is a target
    head_linear: Linear = staticmethod(F.linear)  # lm_head's matmul (use_base_linear)
    logit_softcap: float | None = None  # Gemma 2's final_logit_softcapping: logits -> cap * tanh(logits / cap)
    logit_divisor: float | None = None  # Granite's logits_scaling: logits -> logits / it
    logit_multiplier: float | None = None  # Cohere's logit_scale: logits -> logits * it
    CUDA_GRAPHS = True  # decode steps can be captured (decode_graphs.py): no host sync inside the forward
    NO_GRAPHS = "a host sync in its forward pass"  # why not, where CUDA_GRAPHS is off
    # A RoPE whose frequencies depend on the sequence's length (longrope, dynamic NTK), past a context of
    # this many positions: its table holds the short frequencies' rows [0, split), then the long ones'
    # [split, split + max_model_len). A row takes the long ones where its sequence's prompt is longer
    # than ``split`` or its position is at least ``split`` (``rope_row``), as Hugging Face's
    # generate picks them per forward pass. None: one table.
    rope_split: int | None = None
    # Hugging Face's Phi-3 recomputes a sequence's whole cache by the long frequencies once it outgrows
    # rope_split (its prepare_inputs_for_generation): the engine does the same (engine.py _outgrow_rope)
    RECOMPUTE_AT_ROPE_SPLIT = False
    # a vision-language checkpoint's parts a text request never reaches (LoRALayout.ignored)
    IGNORED: tuple[str, ...] = ()
    ignored_modules: tuple[str, ...] = ()  # their module names (set where IGNORED is)

    @staticmethod
    def lora_targets(config) -> dict[str, tuple[str, int, int]]:
        """kind -> (module name template with {i} for the layer, in_features, out_features)."""
        raise NotImplementedError

    @classmethod
    def layer_targets(cls, config) -> list[dict[str, tuple[str, int, int]]]:
        """Each layer's LoRA targets, as ``lora_targets``: the same in every layer, but a hybrid
        model's, whose layers differ by type (LFM2's attention and convolution layers)."""
        return [cls.lora_targets(config)] * config.num_hidden_layers

    @classmethod
    def layout_from_config(cls, config) -> LoRALayout:
        """LoRA targets and their (in, out) from the HF config alone: no weights needed."""
        config = config.get_text_config()  # a vision-language model's decoder's
        modules, shapes = {}, {}
        for i, targets in enumerate(cls.layer_targets(config)):
            for kind, (template, fin, fout) in targets.items():
                modules[template.format(i=i)] = (i, kind)
                if shapes.setdefault(kind, (fin, fout)) != (fin, fout):  # one kind's pages have one shape
                    raise ValueError(f"{kind} is ({fin}, {fout}) in layer {i} and {shapes[kind]} in another")
        return LoRALayout(modules, shapes, config.num_hidden_layers, cls.FUSED_KINDS, ignored=cls.IGNORED)

    @staticmethod
    def position_limit(config) -> int | None:
        """Positions the model can encode at all (a learned embedding table's rows); None when
        positions are computed (RoPE, ALiBi). max-model-len may not exceed it."""
        return None

    @property
    def head_bounds(self) -> tuple[int, int]:
        """lm_head's LoRA output columns, as FusedLoRALinear.bounds: one kind over the vocabulary."""
        return (0, self.lm_head.weight.shape[0])

    @property
    def token_embedding(self) -> nn.Embedding:
        return getattr(self, self.EMBEDDING[1])

    @property
    def embedding_kind(self) -> str:
        return leaf(self.EMBEDDING[0])

    def lora_layout(self, lm_head: bool = False, embedding: bool = False, saved: bool = False) -> LoRALayout:
        """``lm_head``, ``embedding``: with LoRA on the output projection (``--enable-lm-head-lora``),
        on the token embedding (``--enable-embedding-lora``); ``saved``: with adapters' fully trained
        copies of either (``--max-saved-modules``)."""
        layout = replace(self.layout_from_config(self.config), dora_base=self.dora_base, base_weight=self.base_weight,
                         ignored_modules=self.ignored_modules,
                         tied_head=self.lm_head.weight.data_ptr() == self.token_embedding.weight.data_ptr(),
                         saveable={self.EMBEDDING[0]: self.token_embedding.weight, HEAD: self.lm_head.weight}
                         if saved else {}, head_bias=self.lm_head.bias,
                         vocab=self.token_embedding.weight.shape[0])
        if lm_head:
            layout = layout.with_head(*reversed(self.lm_head.weight.shape))
        if embedding:
            layout = layout.with_embedding(self.EMBEDDING[0], *self.token_embedding.weight.shape)
        return layout

    def base_weight(self, layer: int, kind: str) -> torch.Tensor:
        """The served weight W [out, in] of one LoRA target (a view of its fused linear's; of an
        int8 one, W = q * scale in the model's dtype)."""
        if kind == HEAD:
            return self.lm_head.weight
        if layer == -1:  # the token embedding, [vocab, hidden]
            return self.token_embedding.weight.T
        for fused in self.layers[layer].lora_modules():
            if kind in fused.kinds:
                j = fused.kinds.index(kind)
                rows = slice(fused.bounds[j], fused.bounds[j + 1])
                if fused.scale is None:
                    return fused.weight[rows]
                return dequantize_int8(fused.weight[rows], fused.scale[rows], self.lm_head.weight.dtype)
        raise KeyError(f"layer {layer} has no {kind}")

    def dora_base(self, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """W and its rows' squared norms, which DoRA loads need (adapters/loader.py ``dora_scale``);
        the norms are computed once per target, on the first DoRA load that needs them."""
        weight = self.base_weight(layer, kind)
        norms = self.__dict__.setdefault("_row_sq_norms", {})
        if (layer, kind) not in norms:
            norms[(layer, kind)] = row_sq_norms(weight)
        return weight, norms[(layer, kind)]

    def bind_lora_stores(self, stores: dict[tuple[int, tuple[str, ...]], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """stores: (layer, kinds of a fused linear) -> (a_store [P, m, in], b_store [P, sum of outs])."""
        for i, layer in enumerate(self.layers):
            for fused in layer.lora_modules():
                fused.a_store, fused.b_store = stores[(i, fused.kinds)]
        self.head_store = stores.get((len(self.layers), (HEAD,)))  # None: no LoRA on lm_head
        self.embedding_store = stores.get((-1, (self.embedding_kind,)))  # None: no LoRA on it

    def embed_with_lora(self, batch: StepBatch) -> torch.Tensor:
        """The token embedding of the batch's tokens [T, hidden], with each row's adapter's LoRA on it:
        the weight's rows (a family that scales them, as Gemma's module does, scales this sum)."""
        weight = self.token_embedding.weight
        if batch.saved_embeddings:  # adapters' own trained embeddings (modules_to_save), maybe of more tokens
            e = F.embedding(batch.input_ids.clamp(max=weight.shape[0] - 1), weight)
            for rows, saved in batch.saved_embeddings:
                e[rows] = F.embedding(batch.input_ids[rows], saved)
        else:
            e = F.embedding(batch.input_ids, weight)
        if self.embedding_store is not None:
            for _, plan in batch.lora.get((self.embedding_kind,), ()):
                embedding_lora(e, batch.input_ids, *self.embedding_store, plan)
        return e

    def embed(self, batch: StepBatch) -> torch.Tensor:
        raise NotImplementedError

    def state_specs(self) -> list[tuple[tuple[int, ...], torch.dtype | None]]:
        """Each per-sequence state of the recurrent layers (recurrent_state.py): its shape and dtype
        (None: the model's), in the order the layers index them; empty for a model whose layers all
        attend."""
        return []

    def projection_bytes(self) -> int:
        """Bytes of the decoder's projection weights (and int8 ones' scales)."""
        return sum(m.weight.nbytes + (0 if m.scale is None else m.scale.nbytes)
                   for layer in self.layers for m in layer.lora_modules())

    def base_projections(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of every base projection in the model's dtype (not int8), in the order a
        step reads them."""
        fused = [(m.weight, m.bias) for layer in self.layers for m in layer.lora_modules() if m.scale is None]
        return [*fused, (self.lm_head.weight, self.lm_head.bias)]

    def use_base_linear(self, linear: Linear, int8_linear: Int8Linear | None = None) -> None:
        """The matmul of every base projection: the decoder's fused linears and lm_head, and of the
        int8 ones."""
        for layer in self.layers:
            for fused in layer.lora_modules():
                fused.linear, fused.int8_linear = linear, int8_linear
        self.head_linear = linear

    def forward(self, batch: StepBatch, kv: PagedKVCache, apply_lora) -> torch.Tensor:
        return self.logits(self.hidden(batch, kv, apply_lora), apply_lora, batch.lora.get((HEAD,), ()),
                           batch.saved_heads, batch.base_head_rows)

    def hidden(self, batch: StepBatch, kv: PagedKVCache, apply_lora) -> torch.Tensor:
        """The decoder's output at the logits rows, final norm applied: [N, hidden] (what a decode
        graph captures, decode_graphs.py)."""
        h = self.embed(batch)  # [T, hidden]
        for layer in self.layers:
            h = layer(h, batch, kv, apply_lora)
        return self.final_norm(h[batch.logits_rows])

    def logits(self, h: torch.Tensor, apply_lora, head_plans=(), saved_heads=(), base_head_rows=None) -> torch.Tensor:
        """h [N, hidden] from ``hidden`` -> float32 logits [N, vocab]: lm_head, or for some rows an
        adapter's trained copy (``saved_heads``, the rest being ``base_head_rows``: StepBatch's), its
        LoRA (``head_plans``: the batch's entries for HEAD), then the family's scaling and soft cap."""
        if saved_heads:  # adapters' own trained lm_head (modules_to_save) for their rows, the base's for the rest
            heads = [(rows, weight) for rows, weight in ((base_head_rows, self.lm_head.weight), *saved_heads)
                     if rows.numel()]
            width = max(self.lm_head.weight.shape[0], *(w.shape[0] for _, w in heads))
            ragged = any(w.shape[0] != width for _, w in heads)  # resized vocabularies: -inf past each row's own
            logits = h.new_full((h.shape[0], width), float("-inf")) if ragged else h.new_empty(h.shape[0], width)
            for rows, weight in heads:
                logits[rows, : weight.shape[0]] = self.head_linear(h[rows], weight, self.lm_head.bias)
            for used, plan in head_plans:  # over the logits rows (ModelRunner.build_batch)
                apply_lora(logits, h, *self.head_store, plan, self.head_bounds, used, None)
        elif head_plans:  # [N, vocab], its LoRA on the logits rows (ModelRunner.build_batch)
            logits = with_lora(h, lambda: self.head_linear(h, self.lm_head.weight, self.lm_head.bias),
                               self.lm_head.weight, self.lm_head.bias, head_plans, apply_lora, *self.head_store,
                               self.head_bounds, None)
        else:
            logits = self.head_linear(h, self.lm_head.weight, self.lm_head.bias)  # [N, vocab]
        if self.logit_divisor is not None:  # after LoRA on lm_head, as PEFT's sits inside lm_head
            logits = logits / self.logit_divisor
        if self.logit_multiplier is not None:
            logits = logits * self.logit_multiplier
        if self.logit_softcap is not None:  # past a row's own vocabulary its logits stay -inf
            logits = torch.where(logits.isneginf(), logits, torch.tanh(logits / self.logit_softcap) * self.logit_softcap)
        return logits.float()
