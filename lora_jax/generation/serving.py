"""Hot-swap serving: one frozen base, one compiled generate program, any adapters swapped in by value.

`AdapterServer` holds the base params, a stack of `slots` adapter slots padded to one rank and one set of modules
(`lora_jax.lora.stack`), and one jitted beam/greedy search over `MultiLoraModel` (per-example adapters). Loading an
adapter writes its values into a slot; every leaf keeps its shape, so the compiled program is reused: a server
compiles once per input shape, however many adapters pass through it.

    server = AdapterServer(model, base, generation_config, slots=4, rank=16, targets=("q_proj", "v_proj"))
    server.load("legal", adapter, config)
    ids = server.generate(input_ids, attention_mask, ["legal", None, "legal"])   # None: the base model
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np

from lora_jax.training import compile_events
from lora_jax.generation.api import check_key, resolve_config, trim
from lora_jax.generation.search import decode
from lora_jax.lora.config import LoraConfig
from lora_jax.lora.multi import MultiLoraModel, check_ids
from lora_jax.lora.stack import NoFreeSlotError, remove_adapter, replace_adapter, stack_adapters
from lora_jax.lora.transform import combine, kernel_modules, target_modules


def target_shapes(base_params: Mapping, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{module path: (in, out)} of the base's 2-D kernels that `targets` (names or regexes, as in LoraConfig) select."""
    if not targets:
        return {}
    kernels = kernel_modules(base_params)
    return {m: kernels[m] for m in target_modules(base_params, LoraConfig(targets=tuple(targets)))}


class AdapterServer:
    """Mixed-adapter generation with hot-swapped adapters; see the module docstring.

    slots: how many adapters it holds at once (slot 0, the base, comes on top); rank: r_max (adapters of lower rank
    are zero-padded); targets: the modules any adapter may adapt (default: those of `adapters`). generation_config:
    as for `generate` (a GenerationConfig, a dict or None: the model's defaults, i.e. the checkpoint's settings for
    a model from `load_pretrained`), fixed for the server's life; keyword settings override the same way."""

    def __init__(self, model, base_params: Mapping, generation_config=None, *, adapters: Mapping | None = None,
                 configs: Mapping[str, LoraConfig] | None = None, slots: int | None = None, rank: int = 1,
                 targets: Sequence[str] = (), method: str = "gather", **settings):
        adapters, configs = dict(adapters or {}), dict(configs or {})
        slots = len(adapters) if slots is None else slots
        if slots < max(len(adapters), 1):
            raise ValueError(f"slots={slots} cannot hold {len(adapters)} adapters; pass slots >= {max(len(adapters), 1)}")
        self.stacked, self.info = stack_adapters(
            adapters, configs, min_rank=rank, empty_slots=slots - len(adapters),
            extra_modules=target_shapes(base_params, targets),
        )
        self.base = base_params
        self.config = resolve_config(model, generation_config, **settings)
        multi = MultiLoraModel(model, self.info, method)  # the slot count is all the program depends on
        cfg = self.config

        def serve(base, stacked, input_ids, attention_mask, adapter_ids, key):
            return decode(multi, cfg, combine(base, stacked), input_ids, attention_mask, adapter_ids, key)[0]

        serve.__name__ = self.compile_name = compile_events.unique_name("lora_jax_serve")
        self.serve = jax.jit(serve)

    def load(self, name: str, adapter: Mapping, config: LoraConfig, slot: int | None = None) -> int:
        """Puts adapter `name` into a slot (its own if loaded, else `slot`, else a free one) and returns the slot."""
        try:
            self.stacked, self.info = replace_adapter(self.stacked, self.info, name, adapter, config, slot)
        except NoFreeSlotError:  # the stack's message names stack functions; say what a server user calls
            raise ValueError(f"no free slot for adapter {name!r} (loaded: {self.adapters}); free one with "
                             f"server.unload(name), or replace one with server.load({name!r}, ..., slot=k)") from None
        return self.info.slot(name)

    def unload(self, name: str) -> None:
        self.stacked, self.info = remove_adapter(self.stacked, self.info, name)

    @property
    def adapters(self) -> list[str]:
        return [n for n in self.info.names if n]

    def generate_padded(self, input_ids, attention_mask, adapters: Sequence[str | None], prng_key=None) -> jax.Array:
        """(B * num_return_sequences, max_length) ids for inputs (B, S), each row with its adapter (None: the base),
        without a host sync. prng_key: required when the settings sample (do_sample)."""
        ids = self.info.ids(adapters)
        check_ids(ids, self.info)
        if len(ids) != np.shape(input_ids)[0]:
            raise ValueError(f"{len(ids)} adapter names for {np.shape(input_ids)[0]} input rows: give one per row")
        return self.serve(self.base, self.stacked, np.asarray(input_ids, np.int32),
                          np.asarray(attention_mask, np.int32), ids, check_key(self.config, prng_key))

    def generate(self, input_ids, attention_mask, adapters: Sequence[str | None], prng_key=None) -> np.ndarray:
        """Like `lora_jax.generate`: ids trimmed to the longest sequence."""
        return trim(np.asarray(self.generate_padded(input_ids, attention_mask, adapters, prng_key)), self.config)

    def num_compilations(self) -> int:
        """How many times this server's program has been compiled (once per input shape)."""
        return compile_events.compilations(self.compile_name)
