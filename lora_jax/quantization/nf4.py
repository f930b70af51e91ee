"""NF4 storage of a frozen kernel: 4-bit NormalFloat with block-wise absmax and double-quantised scales (QLoRA,
Dettmers et al. 2023, section 3; the layout bitsandbytes uses for `quant_type="nf4"`).

The kernel (in, out) is flattened row-major and cut into blocks of 64 values (zero-padded at the end). Each block is
divided by its absmax and each value replaced by the index (4 bits) of the nearest of the 16 NF4 code values; two
indices share a byte. Double quantisation: the per-block absmax constants (float32) have their mean subtracted and
are stored as int8 in groups of 256 blocks, each group with one float32 scale (max |absmax - mean| / 127). So the
constants cost 8 + 32/256 bits per block of 64 instead of 32: 4.127 bits per value in all.

One difference from bitsandbytes: the absmax codes here are linear (symmetric int8); bitsandbytes maps them with its
8-bit "dynamic tree" code. The NF4 values and blocks are the paper's.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# The 16 NF4 code values, exactly as published (QLoRA appendix E; bitsandbytes `create_normal_map()`): the quantiles
# of N(0, 1) normalised to [-1, 1], with an exact zero and 8 positive / 7 negative levels.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK_SIZE = 64  # values per absmax block (the paper's)
ABSMAX_BLOCK_SIZE = 256  # absmax constants per second-level scale (the paper's)
# Decision thresholds between neighbouring code values: a normalised value maps to the nearest code.
_THRESHOLDS = (np.asarray(NF4_CODE[:-1], np.float64) + np.asarray(NF4_CODE[1:], np.float64)) / 2


@flax.struct.dataclass
class NF4Kernel:
    """A kernel as NF4: `packed` uint8 (n_blocks * 32,) (two 4-bit indices per byte, the first in the high nibble),
    `absmax_codes` int8 (n_groups * 256,), `absmax_scale` float32 (n_groups,), `absmax_mean` float32 (); the kernel's
    `shape` and original `dtype` are static. n_blocks = ceil(in * out / 64), n_groups = ceil(n_blocks / 256)."""

    packed: jax.Array
    absmax_codes: jax.Array
    absmax_scale: jax.Array
    absmax_mean: jax.Array
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    dtype: str = flax.struct.field(pytree_node=False, default="float32")

    @property
    def nbytes(self) -> int:
        return int(sum(x.nbytes for x in (self.packed, self.absmax_codes, self.absmax_scale, self.absmax_mean)))

    def absmax(self) -> jax.Array:
        """The per-block absmax constants (n_blocks,), float32, after double-quantisation."""
        groups = self.absmax_codes.astype(jnp.float32).reshape(-1, ABSMAX_BLOCK_SIZE) * self.absmax_scale[:, None]
        return groups.reshape(-1)[: self.packed.shape[0] * 2 // BLOCK_SIZE] + self.absmax_mean

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The kernel in `dtype`: code values times their block's absmax, block by block, computed in float32."""
        indices = jnp.stack([self.packed >> 4, self.packed & 0xF], axis=-1).reshape(-1, BLOCK_SIZE)
        values = jnp.asarray(NF4_CODE, jnp.float32)[indices] * self.absmax()[:, None]
        size = int(np.prod(self.shape))
        return values.reshape(-1)[:size].reshape(self.shape).astype(dtype)


def _blocks(flat: np.ndarray, size: int) -> np.ndarray:
    """(n,) -> (ceil(n / size), size), zero-padded."""
    pad = (-flat.shape[0]) % size
    return np.pad(flat, (0, pad)).reshape(-1, size)


def double_quantize(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-block absmax (n_blocks,) float32 -> (int8 codes (n_groups * 256,), float32 scales (n_groups,), mean ())."""
    mean = np.float32(absmax.mean())
    groups = _blocks(absmax - mean, ABSMAX_BLOCK_SIZE)
    scale = np.abs(groups).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.round(groups / scale[:, None]), -127, 127).astype(np.int8)
    return codes.reshape(-1), scale, np.asarray(mean, np.float32)


def nf4_indices(normalised: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] -> the index (0..15, uint8) of the nearest NF4 code value."""
    return np.searchsorted(_THRESHOLDS, normalised).astype(np.uint8)


def quantize_nf4(kernel: Any) -> NF4Kernel:
    """kernel (any shape), numpy or jax, float -> NF4Kernel (quantised on the host in float32)."""
    w = np.asarray(jax.device_get(kernel))
    dtype, shape = str(w.dtype), tuple(w.shape)
    blocks = _blocks(w.astype(np.float32).reshape(-1), BLOCK_SIZE)
    codes, scale, mean = double_quantize(np.abs(blocks).max(axis=1))
    # Normalise by the absmax the dequantiser will see (after double quantisation), so its rounding is absorbed.
    absmax = (codes.astype(np.float32).reshape(-1, ABSMAX_BLOCK_SIZE) * scale[:, None]).reshape(-1)[: len(blocks)] + mean
    safe = np.where(absmax > 0, absmax, 1.0)[:, None]
    indices = nf4_indices(np.clip(blocks / safe, -1.0, 1.0)).reshape(-1, 2)
    packed = (indices[:, 0] << 4) | indices[:, 1]
    return NF4Kernel(jnp.asarray(packed), jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(mean), shape, dtype)
