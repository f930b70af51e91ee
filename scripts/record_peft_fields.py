"""Records the field names of PEFT's LoraConfig (the installed PEFT) to tests/fixtures/peft_lora_config_fields.json,
so tests check lora_jax.checkpoints.peft_fields classifies every field without needing torch or PEFT.

    /work/torchvenv/bin/python scripts/record_peft_fields.py   # any Python with the newest peft installed
"""

import dataclasses
import json
import os

import peft

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                   "peft_lora_config_fields.json")

if __name__ == "__main__":
    fields = [f.name for f in dataclasses.fields(peft.LoraConfig)]
    with open(OUT, "w") as f:
        json.dump({"peft_version": peft.__version__, "fields": fields}, f, indent=1)
        f.write("\n")
    print(f"{len(fields)} fields of peft {peft.__version__} -> {OUT}")
