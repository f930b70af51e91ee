"""Process-level settings that make a CPU training run leaner; no-ops elsewhere.

Two effects measured on the bart-base train step (BENCHMARKS.md):

* XLA's CPU scheduler. Its default, the concurrency-optimised scheduler, starts independent work as early as it
  can; in a backward pass that keeps forward activations and rematerialised values alive far longer than needed
  (with `remat='full'` the step's temporary memory is 906 MiB under it, 456 MiB under the memory-aware scheduler,
  at the same speed). XLA reads this from `XLA_FLAGS` once, when the backend starts, and ignores it as a per-jit
  compiler option, so `use_memory_aware_cpu_scheduler()` must run before the first JAX computation.
* Compiler garbage. Compiling a bart-base train step frees about 1.3 GB of compiler memory that glibc keeps mapped;
  `release_host_memory()` (`malloc_trim`) hands it back to the OS after the first (compiling) step.

And one that makes a re-run or a resume start in seconds, on every backend:

* JAX's persistent compilation cache. `enable_compilation_cache(dir)` points JAX at a cache directory and lowers
  its thresholds: by default JAX stores only programs that took >= 1 s to compile
  (`jax_persistent_cache_min_compile_time_secs`), which leaves out most small CPU programs; here every program is
  stored (and `jax_persistent_cache_min_entry_size_bytes` is 0, JAX's default: no size floor).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile
import warnings

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
DEFAULT_COMPILATION_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "lora_jax", "jax_cache")


def use_memory_aware_cpu_scheduler() -> bool:
    """Adds `--xla_cpu_enable_concurrency_optimized_scheduler=false` to XLA_FLAGS unless the flag is already set
    there. Call before the first JAX computation (the backend reads XLA_FLAGS once). True if it was added."""
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_SCHEDULER_FLAG in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}=false".strip()
    return True


def release_host_memory() -> bool:
    """Returns freed heap memory to the OS (glibc `malloc_trim(0)`). True where it ran (Linux with glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def _unwritable(path: str) -> str | None:
    """Why files cannot be written in directory `path` (created if missing), or None; tries a real write, since
    permission bits say nothing on a read-only mount or for root."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def enable_compilation_cache(cache_dir: str | None = DEFAULT_COMPILATION_CACHE) -> str | None:
    """Turns on JAX's persistent compilation cache in `cache_dir` (`~` expanded, created if missing), storing every
    compiled program whatever its compile time or size. None leaves the cache off. Call before the first
    compilation that should be cached. Returns the directory used, or None. The cache is optional: a directory
    that cannot be created or written warns and leaves it off."""
    if cache_dir is None:
        return None
    import jax

    path = os.path.abspath(os.path.expanduser(cache_dir))
    if (problem := _unwritable(path)) is not None:
        warnings.warn(f"train.compile_cache_dir {path} cannot be written ({problem}); running without the persistent "
                      "compilation cache (every program compiles afresh). Set train.compile_cache_dir to a writable "
                      "directory, or null", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
