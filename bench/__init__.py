"""Benchmarks of lora_jax against PEFT / PyTorch on one config, batch and set of weights (see BENCHMARKS.md).

`python -m bench.run` is the entry point; `bench.worker` runs one system per child process."""
