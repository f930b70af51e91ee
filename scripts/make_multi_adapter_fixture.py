"""Makes tests/fixtures/tiny-bart/multi_adapter/: PEFT's own mixed-adapter outputs (`adapter_names=`) on the tiny BART.

Two adapters on the fixture model: the fixture's PEFT adapter ("a": r 4 on q/v) and "b" (r 2 on every linear layer,
non-zero A and B, written by lora_jax.export_peft into `adapter_b/`). PEFT 0.21 + transformers (PyTorch) then run the
fixture batch with per-row adapters ["a", "__base__", "b", "a"]: the logits of one forward pass, and greedy and
4-beam `generate(..., adapter_names=...)` ids. The tests compare lora_jax's MultiLoraModel with them, without torch.

    python -m scripts.make_multi_adapter_fixture      # with torch==2.13.0 peft==0.21.0 transformers==4.57.6
"""

import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny-bart")
OUT = os.path.join(FIXTURE, "multi_adapter")
ROW_ADAPTERS = ["a", "__base__", "b", "a"]  # PEFT's name for "no adapter" is "__base__"
GENERATE = dict(max_new_tokens=12, no_repeat_ngram_size=0)


def peft_mixed_outputs(adapter_dirs: dict, ref: dict, generate: bool = True) -> dict:
    """PEFT's logits and (with `generate`: PEFT 0.21 supports adapter_names= in seq2seq generate only with
    transformers 4.x) generated ids for the fixture batch with ROW_ADAPTERS (needs torch and peft)."""
    import peft
    import torch
    from transformers import BartForConditionalGeneration

    names = list(adapter_dirs)
    base = BartForConditionalGeneration.from_pretrained(os.path.join(FIXTURE, "model"))
    model = peft.PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval()
    inputs = {k: torch.tensor(ref[k]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = {"logits": model(**inputs, decoder_input_ids=torch.tensor(ref["decoder_input_ids"]),
                               adapter_names=ROW_ADAPTERS).logits.numpy()}
        for beams in (1, 4) if generate else ():
            ids = model.generate(**inputs, num_beams=beams, adapter_names=ROW_ADAPTERS, **GENERATE)
            out[f"beam{beams}_ids"] = ids.numpy().astype(np.int32)
    return out


def write_adapter_b() -> None:
    import lora_jax
    from lora_jax.checkpoints.peft import export_peft
    from tests.multi_helpers import CONFIGS, random_adapter

    _, base = lora_jax.load_pretrained(os.path.join(FIXTURE, "model"))
    config = CONFIGS["all2"]
    export_peft(os.path.join(OUT, "adapter_b"), lora_jax.combine(base, random_adapter(base, config, 5)), config,
                "../../model")


def main() -> None:
    # adapter_b is written by lora_jax (first run); the PEFT outputs need transformers 4.x, whose generate PEFT 0.21's
    # adapter_names= supports for seq2seq, so they may come from another environment (a second run, reusing adapter_b).
    if not os.path.exists(os.path.join(OUT, "adapter_b", "adapter_config.json")):
        write_adapter_b()
    ref = dict(np.load(os.path.join(FIXTURE, "reference.npz")))
    dirs = {"a": os.path.join(FIXTURE, "peft_adapter"), "b": os.path.join(OUT, "adapter_b")}
    np.savez_compressed(os.path.join(OUT, "reference.npz"), **peft_mixed_outputs(dirs, ref))
    print(json.dumps({"written": OUT, "row_adapters": ROW_ADAPTERS}))


if __name__ == "__main__":
    main()
