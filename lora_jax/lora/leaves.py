"""The names of the leaves LoRA adds beside a kernel (a module of its own so every LoRA module can import them)."""

LORA_A, LORA_B = "lora_a", "lora_b"  # (in, r) and (r, out)
LORA_MAGNITUDE = "lora_magnitude"  # (out,), DoRA only
ADAPTER_LEAVES = (LORA_A, LORA_B, LORA_MAGNITUDE)
# LoraModel's variable collection of per-module scales {module path: {LORA_SCALE_LEAF: ()}} when they vary by path
# (rank_pattern / alpha_pattern): data a scanned layer stack carries, layer by layer.
SCALES_COLLECTION, SCALE_LEAF = "lora_scales", "scale"
