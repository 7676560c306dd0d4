"""``loramux train``: train a LoRA adapter with peft on a frozen base model.

Data (JSONL, one example per line): {"prompt", "completion"} (loss on the completion only),
{"messages": [...]} (the last assistant turn is the completion, the rest is rendered with the
model's chat template as the prompt), or {"text"} (loss on every token). A ``.txt`` file is plain
text, one example per non-empty line.

Tokens added to the tokenizer (``add_tokens``, ``add_special_tokens``: a chat format's markers) are
learned as PEFT's users learn them: the model is resized to the tokenizer where it has fewer rows,
its token embedding and lm_head train whole (``modules_to_save``; kept tied where the model ties
them), and the tokenizer is saved beside the adapter, which loramux serves with it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
IGNORE = -100
CHECKPOINTS = "checkpoints"


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


@dataclass(frozen=True)
class TrainConfig:
    model_dir: Path
    data: Path
    out: Path
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    dora: bool = False  # DoRA (PEFT's use_dora): a magnitude per output row trains too
    targets: tuple[str, ...] = ()  # PEFT's target_modules; none: the model's attention projections
    steps: int | None = None  # None: epochs over the data
    epochs: int = 1
    lr: float = 2e-4
    batch_size: int = 4
    max_length: int = 256
    seed: int = 0
    checkpoint_every: int = 50
    resume: bool = False
    add_tokens: tuple[str, ...] = ()  # new tokens of the tokenizer
    add_special_tokens: tuple[str, ...] = ()  # new special tokens (kept in text only where asked)


MIXER_INPUTS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj")  # token mixers' projections, by name


def attention_targets(model) -> list[str]:
    """The decoder's attention projections as PEFT target names (q_proj, k_proj, v_proj, o_proj on a
    Llama; qkv_proj, o_proj on Phi-3; c_attn, attn.c_proj on GPT-2): each linear under an attention
    module, by its own name, or with its parent's where a linear outside attention shares it. A
    model with no module named as attention (Nemotron-H's are all ``mixer``; a Mamba model has none)
    takes its token mixers' projections instead: q/k/v/o and Mamba's ``in_proj``."""
    from transformers.pytorch_utils import Conv1D

    attention = {"attn", "self_attn", "attention", "self_attention"}
    inside, elsewhere, mixers = [], set(), []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | Conv1D):
            parts = name.split(".")
            if attention.intersection(parts[:-1]):
                inside.append(parts)
            else:
                elsewhere.add(parts[-1])
                mixers += [parts[-1]] if parts[-1] in MIXER_INPUTS else []
    if not inside:
        return list(dict.fromkeys(mixers))
    return list(dict.fromkeys(parts[-1] if parts[-1] not in elsewhere else ".".join(parts[-2:]) for parts in inside))


def _encode(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and completion:
        c = c + [tokenizer.eos_token_id]
    return p + c, [IGNORE] * len(p) + c


def load_examples(path: Path, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Tokenized (input_ids, labels) pairs; labels are IGNORE where no loss is taken."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if path.suffix == ".txt":
            ids, labels = _encode(tokenizer, "", line)
            labels = list(ids)
        else:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object")
            if "prompt" in rec or "completion" in rec:
                if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
                    raise DataError(f"{where}: 'prompt' and 'completion' must both be strings")
                ids, labels = _encode(tokenizer, rec["prompt"], rec["completion"])
            elif "messages" in rec:
                msgs = rec["messages"]
                if not (isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict)
                        and msgs[-1].get("role") == "assistant"):
                    raise DataError(f"{where}: 'messages' must end with an assistant turn")
                prompt = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
                ids, labels = _encode(tokenizer, prompt, msgs[-1]["content"])
            elif isinstance(rec.get("text"), str):
                ids, _ = _encode(tokenizer, "", rec["text"])
                labels = list(ids)
            else:
                raise DataError(f"{where}: expected 'prompt'+'completion', 'messages' or 'text'")
        if len(ids) > max_length:
            raise DataError(f"{where}: {len(ids)} tokens; --max-length is {max_length}")
        if all(t == IGNORE for t in labels):
            raise DataError(f"{where}: the completion is empty")
        examples.append((ids, labels))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _batches(examples, batch_size: int, pad_id: int, rng: random.Random):
    order = list(range(len(examples)))
    rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [examples[j] for j in order[i : i + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), IGNORE)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (x, y) in enumerate(chunk):
            ids[r, : len(x)], labels[r, : len(y)], mask[r, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        yield ids, labels, mask


def _progress(step: int, total: int, loss: float, started: float) -> None:
    width = 30
    done = int(width * step / total)
    rate = step / max(time.perf_counter() - started, 1e-9)
    eta = (total - step) / rate if rate else 0
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} loss {loss:.4f} eta {eta:4.0f}s")
    sys.stderr.flush()


def _latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def train(cfg: TrainConfig) -> dict:
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise SystemExit("loramux train needs peft: pip install 'loramux[train]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
    added = tokenizer.add_tokens(list(cfg.add_tokens)) + (tokenizer.add_special_tokens(
        {"additional_special_tokens": list(cfg.add_special_tokens)}) if cfg.add_special_tokens else 0)
    examples = load_examples(cfg.data, tokenizer, cfg.max_length)
    base = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=torch.float32)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))  # new rows start at the old ones' mean, as transformers does
    ckpt = _latest_checkpoint(cfg.out) if cfg.resume else None
    if ckpt is not None:
        model = PeftModel.from_pretrained(base, ckpt, is_trainable=True)
    else:
        layers = _embedding_layers(base) if added else []
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=cfg.dora,
                          target_modules=list(cfg.targets or attention_targets(base)), bias="none",
                          task_type="CAUSAL_LM",
                          modules_to_save=layers or None,
                          ensure_weight_tying=bool(layers) and bool(base.config.tie_word_embeddings))
        model = get_peft_model(base, lora)  # freezes every base weight: only A and B (and DoRA's m) train
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr)
    start_step = 0
    if ckpt is not None:
        state = torch.load(ckpt / "trainer.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        version, internal, gauss = state["rng"]
        rng.setstate((version, tuple(internal), gauss))
        log.info("resuming from %s (step %d)", ckpt, start_step)
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.steps or per_epoch * cfg.epochs
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    model.train()
    losses, step, started = [], start_step, time.perf_counter()
    while step < total:
        for ids, labels, mask in _batches(examples, cfg.batch_size, pad, rng):
            if step >= total:
                break
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss))
            _progress(step, total, losses[-1], started)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                _save_checkpoint(model, optimizer, rng, step, cfg.out)
    sys.stderr.write("\n")
    model.save_pretrained(cfg.out)  # adapter_config.json + adapter_model.safetensors
    if added:
        tokenizer.save_pretrained(cfg.out)  # the vocabulary it was trained on, served with it
    summary = {"steps": step, "examples": len(examples), "first_loss": losses[0] if losses else None,
               "final_loss": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
               "seconds": time.perf_counter() - started}
    (cfg.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _embedding_layers(model) -> list[str]:
    """The names (last parts) of the model's token embedding and lm_head, for modules_to_save."""
    wanted = {id(model.get_input_embeddings()): 0, id(model.get_output_embeddings()): 1}
    names = sorted((wanted[id(m)], name.rsplit(".", 1)[-1]) for name, m in model.named_modules() if id(m) in wanted)
    return list(dict.fromkeys(name for _, name in names))


def _save_checkpoint(model, optimizer, rng, step: int, out: Path) -> None:
    path = out / CHECKPOINTS / f"step-{step}"
    model.save_pretrained(path)
    state = rng.getstate()
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "rng": [state[0], list(state[1]), state[2]]},
               path / "trainer.pt")
