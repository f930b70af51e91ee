"""Hot-swap serving: adapters of other ranks and targets pass through one server, which compiles once."""

import numpy as np
import pytest

import lora_jax
from lora_jax.generation.serving import AdapterServer
from tests.multi_helpers import CONFIGS, adapters_for

SETTINGS = dict(num_beams=4, max_new_tokens=10, no_repeat_ngram_size=0, forced_bos_token_id=None,
                forced_eos_token_id=None)
ALL = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _alone(model, base, adapter, config, batch):
    return lora_jax.generate(lora_jax.LoraModel(model, config), lora_jax.combine(base, adapter),
                             batch["input_ids"], batch["attention_mask"], **SETTINGS)


def test_swapping_three_adapters_compiles_once(tiny, batch):
    model, base = tiny
    adapters, configs = adapters_for(base)
    server = AdapterServer(model, base, slots=1, rank=8, targets=ALL, **SETTINGS)
    plain = lora_jax.generate(model, base, batch["input_ids"], batch["attention_mask"], **SETTINGS)
    for name in ("qv4", "all2", "fc8"):
        if server.adapters:
            server.unload(server.adapters[0])
        assert server.load(name, adapters[name], configs[name]) == 1
        ids = server.generate(batch["input_ids"], batch["attention_mask"], [name, None, name, name])
        expected = _alone(model, base, adapters[name], configs[name], batch)
        for row in (0, 2, 3):
            assert np.array_equal(ids[row, :expected.shape[1]], expected[row]), (name, row)
        assert np.array_equal(ids[1, :plain.shape[1]], plain[1])
    assert server.num_compilations() == 1


def test_server_refuses_what_does_not_fit(tiny, batch):
    model, base = tiny
    adapters, configs = adapters_for(base)
    server = AdapterServer(model, base, adapters={"qv4": adapters["qv4"]}, configs={"qv4": CONFIGS["qv4"]},
                           **SETTINGS)
    with pytest.raises(ValueError, match=r"no free slot for adapter 'fc8'.*server.unload\(name\)"):
        server.load("fc8", adapters["fc8"], configs["fc8"])
    with pytest.raises(ValueError, match="adapts model/.*fc1, which this stack does not hold"):
        server.load("qv4", adapters["fc8"], configs["fc8"])
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        server.generate(batch["input_ids"], batch["attention_mask"], ["nope"] * 4)
    with pytest.raises(ValueError, match="3 adapter names for 4 input rows"):
        server.generate(batch["input_ids"], batch["attention_mask"], ["qv4"] * 3)
    small = AdapterServer(model, base, slots=1, rank=2, targets=ALL, **SETTINGS)
    with pytest.raises(ValueError, match="rank 4 on .* above the stack's r_max 2"):
        small.load("qv4", adapters["qv4"], configs["qv4"])
