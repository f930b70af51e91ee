"""Makes tests/fixtures/tiny-bart/peft_patterns/: a PEFT adapter whose rank_pattern / alpha_pattern PEFT resolves
differently from a naive '.' -> '/' reading, with the rank and scale PEFT gave each module.

    pip install torch==2.13.0 peft==0.21.2   # the optional extra: pip install -e '.[torch]'
    python -m scripts.make_pattern_fixture

The patterns (PEFT 0.21 takes the first key k in dict order with re.match(rf"(.*\\.)?({k})$", dotted module name)):
- rank "encoder\\.[^.]+\\.fc1": matches no module in PEFT (`[^.]+` cannot span "layers.0"), though the same
  regex over '/'-joined paths would match every encoder fc1;
- rank "fc1" before "layers.0.fc1": every fc1 gets the first key's rank, layer 0's too (first key wins);
- alpha "decoder.layers.1.*": any character for the dots, so decoder layer 1's q_proj and fc1.
Writes adapter_config.json, adapter_model.safetensors (init_lora_weights=False: non-zero A and B) and expected.json
{dotted module: {"rank": r, "scale": PEFT's scaling}} (about 40 KB).
"""

from __future__ import annotations

import json
import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import BartForConditionalGeneration

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "tiny-bart")
OUT = os.path.join(ROOT, "peft_patterns")
RANK_PATTERN = {r"encoder\.[^.]+\.fc1": 6, "fc1": 3, "layers.0.fc1": 5}
ALPHA_PATTERN = {"decoder.layers.1.*": 12.0}


def main() -> None:
    torch.manual_seed(0)
    base = BartForConditionalGeneration.from_pretrained(os.path.join(ROOT, "model")).eval()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"], rank_pattern=RANK_PATTERN,
                        alpha_pattern=ALPHA_PATTERN, init_lora_weights=False, task_type="SEQ_2_SEQ_LM")
    model = get_peft_model(base, config)
    model.save_pretrained(OUT)
    with open(os.path.join(OUT, "adapter_config.json")) as f:
        saved = json.load(f)
    saved["base_model_name_or_path"] = "../model"  # relative, as the fixture's other PEFT adapter, not this machine's path
    with open(os.path.join(OUT, "adapter_config.json"), "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
    os.remove(os.path.join(OUT, "README.md"))  # PEFT's generic model card
    expected = {}
    for name, module in model.base_model.model.named_modules():  # names relative to BartForConditionalGeneration
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            expected[name] = {"rank": module.r["default"], "scale": module.scaling["default"]}
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print(expected)


if __name__ == "__main__":
    main()
