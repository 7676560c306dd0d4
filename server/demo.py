"""``make demo-adapters``: three small adapters for the default model, each with a behaviour that
shows at a glance. The datasets are written here, from the templates below.

- ``json``: answers in a fixed JSON shape, {"answer": ..., "confidence": "high"};
- ``pirate``: answers in a pirate voice ("Arr, matey! ...");
- ``sentiment``: answers with one word, positive, negative or neutral.

    python -m loramux.server.demo --out demo-adapters [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FACTS = [
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"), ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Germany?", "Berlin"), ("What is the capital of Canada?", "Ottawa"),
    ("What colour is the sky on a clear day?", "Blue"), ("What colour is grass?", "Green"),
    ("How many legs does a spider have?", "Eight"), ("How many days are in a week?", "Seven"),
    ("What is two plus two?", "Four"), ("What is ten minus three?", "Seven"),
    ("Which planet is closest to the sun?", "Mercury"), ("What is the largest ocean?", "The Pacific"),
    ("What do bees make?", "Honey"), ("What is frozen water called?", "Ice"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"), ("What gas do plants breathe in?", "Carbon dioxide"),
    ("What is the opposite of hot?", "Cold"), ("How many hours are in a day?", "Twenty-four"),
    ("What animal says moo?", "A cow"), ("What is the tallest animal?", "The giraffe"),
    ("What language is spoken in Brazil?", "Portuguese"), ("What is the boiling point of water in Celsius?", "100"),
]
SENTENCES = [
    ("I love this new phone, it works perfectly!", "positive"), ("The food was cold and tasteless.", "negative"),
    ("The meeting is at three o'clock.", "neutral"), ("What a wonderful day at the beach!", "positive"),
    ("My package arrived broken again.", "negative"), ("The report has twelve pages.", "neutral"),
    ("This movie made me so happy.", "positive"), ("I am disappointed with the service.", "negative"),
    ("The train leaves from platform four.", "neutral"), ("Fantastic work, the team did great!", "positive"),
    ("The app keeps crashing and I hate it.", "negative"), ("The store opens at nine.", "neutral"),
    ("Best concert I have ever been to!", "positive"), ("The hotel room was dirty and noisy.", "negative"),
    ("Water is made of hydrogen and oxygen.", "neutral"), ("I am thrilled with my results.", "positive"),
    ("Terrible weather ruined our trip.", "negative"), ("The book is on the table.", "neutral"),
    ("Thank you so much, this is amazing!", "positive"), ("The battery died after an hour, awful.", "negative"),
    ("The bus has twenty seats.", "neutral"), ("I adore these flowers.", "positive"),
    ("Worst customer support ever.", "negative"), ("Tomorrow is Tuesday.", "neutral"),
]
BEHAVIOURS = {
    "json": [(q, json.dumps({"answer": a, "confidence": "high"})) for q, a in FACTS],
    "pirate": [(q, f"Arr, matey! {a}, savvy? Yo ho ho!") for q, a in FACTS],
    "sentiment": [(f"What is the sentiment of: {s}", label) for s, label in SENTENCES],
}
DEMO_PROMPT = "What is the capital of Italy?"


def write_dataset(name: str, path: Path) -> Path:
    with path.open("w") as f:
        for question, answer in BEHAVIOURS[name]:
            msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo-adapters"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args(argv)

    from ..adapters.train import TrainConfig, train
    from .cli import setup_logging
    from .config import ServerConfig
    from .model_loader import resolve_model_dir

    setup_logging("INFO", "text")
    config = ServerConfig() if args.cache_dir is None else ServerConfig(cache_dir=args.cache_dir)
    model_dir, _ = resolve_model_dir(config)
    for name in BEHAVIOURS:
        (args.out / name).mkdir(parents=True, exist_ok=True)  # the dataset lives beside its adapter
        data = write_dataset(name, args.out / name / "train.jsonl")
        summary = train(TrainConfig(model_dir=model_dir, data=data, out=args.out / name, rank=16, alpha=32,
                                    dropout=0.0, steps=args.steps, lr=2e-3, batch_size=4, max_length=128,
                                    targets=("q_proj", "k_proj", "v_proj", "o_proj"), checkpoint_every=0))
        print(f"{name}: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} "
              f"in {summary['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
