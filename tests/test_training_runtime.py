"""Process-level settings (lora_jax.training.runtime)."""

import os

from lora_jax.training import runtime


def test_scheduler_flag_is_added_once_and_user_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert runtime.use_memory_aware_cpu_scheduler()
    assert os.environ["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false"
    )
    assert not runtime.use_memory_aware_cpu_scheduler()  # already there: unchanged
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=true")
    assert not runtime.use_memory_aware_cpu_scheduler()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"


def test_scheduler_flag_without_existing_flags(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert runtime.use_memory_aware_cpu_scheduler()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def test_release_host_memory_runs_on_glibc_linux():
    import platform

    ran = runtime.release_host_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert ran
