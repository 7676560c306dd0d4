"""Adapters: PEFT-format LoRA adapters, from config and safetensors to pages in device memory."""
