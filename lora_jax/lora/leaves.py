"""The names of the leaves LoRA adds beside a kernel (a module of its own so every LoRA module can import them)."""

LORA_A, LORA_B = "lora_a", "lora_b"  # (in, r) and (r, out)
LORA_MAGNITUDE = "lora_magnitude"  # (out,), DoRA only
ADAPTER_LEAVES = (LORA_A, LORA_B, LORA_MAGNITUDE)
