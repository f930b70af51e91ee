"""Everything that reads or writes model state on disk.

hf.py       Hugging Face BART checkpoints in and out (`load_pretrained`, also straight into a mesh; `save_pretrained`)
adapter.py  adapter-only directories (Orbax leaves + JSON metadata): `save_adapter` / `load_adapter`, `base_fingerprint`
peft.py     PEFT adapters in and out: `import_peft` / `export_peft`; `load_any_adapter` (a lora_jax or PEFT directory)
peft_fields.py   every field of PEFT's LoraConfig and how import handles it (honoured, refused, warned), as data
peft_weights.py  a PEFT config checked against its weights (ranks, targets, modules_to_save)
peft_selection.py  which modules PEFT adapts (exclude_modules, layers_to_transform), checked against the weights
merged.py   adapters folded into the base, written as a plain Hugging Face checkpoint: `export_merged`
files.py    atomic file and directory writes, directory sizes, shared by the writers above
"""

from lora_jax.checkpoints.adapter import (
    AdapterDamagedError,
    AdapterMismatchError,
    check_adapter_fits,
    load_adapter,
    save_adapter,
)
from lora_jax.checkpoints.hf import (
    CheckpointMismatchError,
    load_pretrained,
    load_tokenizer,
    params_from_torch_state_dict,
    params_to_torch_state_dict,
    save_pretrained,
)
from lora_jax.checkpoints.merged import export_merged
from lora_jax.checkpoints.peft import export_peft, import_peft, load_any_adapter
