"""Parameter-efficient fine-tuning, used to recover quality after compression (LoRA)."""
