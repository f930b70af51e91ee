"""The PyTorch baselines on the identical config, weights and batch: PEFT LoRA and full fine-tuning train steps
(eager, AdamW) and transformers' `generate` beam search. Needs the optional extra: pip install 'lora_jax[torch]'.

This module must not import jax or lora_jax (directly or through bench.common): their runtime would count in the
PyTorch systems' peak memory."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import numpy as np
import torch
import transformers

from bench.common import BenchSpec, cpu_count, leaf_values, make_batch, time_generate, time_train_steps
from bench.memory import memory_fields, start_phase

TIED = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_fields() -> dict[str, Any]:
    dev = device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"framework": f"torch {torch.__version__}", "backend": dev.type, "device": name,
            "torch_threads": torch.get_num_threads()}


def setup_threads(spec: BenchSpec) -> None:
    if spec.device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("--device gpu, but torch sees no CUDA GPU; install a CUDA build of torch on a machine with "
                           "an NVIDIA GPU, or run without --device gpu")
    torch.set_num_threads(spec.torch_threads or cpu_count())


def autocast(spec: BenchSpec):
    """bfloat16 autocast on the GPU (the peer of lora_jax's bfloat16 compute there); a no-op on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=spec.device == "gpu")


def hf_config(spec: BenchSpec) -> transformers.BartConfig:
    return transformers.BartConfig(**spec.model_fields(), tie_word_embeddings=True)


def flax_path(key: str, modules: Mapping[str, torch.nn.Module]) -> tuple[tuple[str, ...], bool]:
    """(lora_jax / Flax path, transposed?) of torch state-dict entry `key`: Linear weight -> kernel (in, out),
    LayerNorm weight -> scale, Embedding weight -> embedding (the inverse of lora_jax.checkpoints.hf.torch_key,
    recomputed here so this process never imports JAX)."""
    if key == "final_logits_bias":
        return (key,), False
    module_name, _, leaf = key.rpartition(".")
    module = modules[module_name]
    if leaf == "bias":
        return tuple(module_name.split(".")) + ("bias",), False
    for kind, name in ((torch.nn.Linear, "kernel"), (torch.nn.LayerNorm, "scale"), (torch.nn.Embedding, "embedding")):
        if isinstance(module, kind) and leaf == "weight":
            return tuple(module_name.split(".")) + (name,), name == "kernel"
    raise RuntimeError(f"no Flax counterpart for torch parameter {key} ({type(module).__name__})")


@torch.no_grad()
def build_model(spec: BenchSpec) -> transformers.BartForConditionalGeneration:
    """transformers' BART with the seeded random weights (the same values lora_jax gets), loaded leaf by leaf."""
    torch.manual_seed(spec.seed)
    config = hf_config(spec)
    model = transformers.BartForConditionalGeneration(config)
    modules = dict(model.named_modules())
    state = model.state_dict()  # tensors share storage with the parameters and buffers
    shared = state["model.shared.weight"]
    for key, tensor in state.items():
        if key in TIED and tensor.data_ptr() == shared.data_ptr():
            continue  # the same storage as model.shared.weight
        if key in TIED:
            path, transposed = ("model", "shared", "embedding"), False  # untied in some version: same values
        else:
            path, transposed = flax_path(key, modules)
        shape = tuple(tensor.shape[::-1] if transposed else tensor.shape)
        values = leaf_values(path, shape, spec.seed, config.init_std)
        tensor.copy_(torch.from_numpy(np.ascontiguousarray(values.T if transposed else values)))
    return model.to(device())


def device_batch(spec: BenchSpec) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.astype(np.int64)).to(device()) for k, v in make_batch(spec).items()}


def synchronize() -> None:
    if device().type == "cuda":
        torch.cuda.synchronize()


def device_peak_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if device().type == "cuda" else None


def peft_wrap(model, spec: BenchSpec):
    import peft

    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                             lora_dropout=spec.lora_dropout, task_type="SEQ_2_SEQ_LM")
    return peft.get_peft_model(model, config)


def step_flops(model, batch) -> float | None:
    """FLOPs of one forward + backward as torch's FlopCounterMode counts them (matmuls/attention only; the
    optimizer update is not counted, unlike XLA's count for the JAX step, where it is a small share)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_train(spec: BenchSpec, lora: bool) -> dict[str, Any]:
    """Median eager step time (forward, backward, AdamW with weight decay 0; train mode, dropout on)."""
    setup_threads(spec)
    model = build_model(spec)
    if lora:
        model = peft_wrap(model, spec)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=0.0)
    batch = device_batch(spec)
    losses = []

    def one_step():
        with autocast(spec):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() waits for the step to finish
        synchronize()

    phase = start_phase()
    first, median, times, steady, _ = time_train_steps(one_step, spec.steps, spec.warmup, phase)
    memory = memory_fields(phase, steady, device_peak_bytes())
    flops = step_flops(model, batch)  # after the memory reading: counting is not part of training
    record = {
        **backend_fields(),
        "kind": "train",
        "step_time_s": median,
        "step_times_s": times,
        "first_step_s": first,
        "compile_s": None,
        "flops_per_step": flops,
        "gflops_per_s": flops / median / 1e9 if flops else None,
        **memory,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    if lora:
        record["peft_adapter_bytes"] = peft_adapter_bytes(model)
    return record


def peft_adapter_bytes(peft_model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        return sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))


def bench_peft_train(spec: BenchSpec) -> dict[str, Any]:
    import peft

    return {"system": "peft_lora", "peft": peft.__version__, **bench_train(spec, lora=True)}


def bench_full_train(spec: BenchSpec) -> dict[str, Any]:
    return {"system": "torch_full", **bench_train(spec, lora=False)}


def generation_config(spec: BenchSpec) -> transformers.GenerationConfig:
    """The settings of `bench.jax_bench.generation_config`, for transformers."""
    config = hf_config(spec)
    return transformers.GenerationConfig(
        num_beams=spec.num_beams, max_new_tokens=spec.new_tokens, min_length=spec.new_tokens + 1, do_sample=False,
        length_penalty=1.0, no_repeat_ngram_size=0, early_stopping=False, forced_bos_token_id=None,
        forced_eos_token_id=None, decoder_start_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
    )


def bench_generate(spec: BenchSpec) -> dict[str, Any]:
    """Beam-search throughput of transformers' PyTorch `generate` on the same weights and sources."""
    setup_threads(spec)
    model = build_model(spec).eval()
    batch = device_batch(spec)
    cfg = generation_config(spec)

    @torch.inference_mode()
    def run():
        with autocast(spec):
            ids = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=cfg)
        synchronize()
        return ids.cpu().numpy()

    phase = start_phase()
    timing = time_generate(run, spec)
    return {"system": "torch_generate", "transformers": transformers.__version__, **backend_fields(), **timing,
            **memory_fields(phase, None, device_peak_bytes())}
