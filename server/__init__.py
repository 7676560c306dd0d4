"""loramux server: one frozen base model, many LoRA adapters in one batch."""

__version__ = "0.1.0"
