"""Scaling past one device with JAX's own machinery: a (data, fsdp) mesh, sharding rules for params, optimizer state
and batches, and multi-host start-up
(checkpoints load straight into a mesh with `lora_jax.load_pretrained(..., mesh=mesh)`).

Every device of the mesh works on its own slice of the batch (batch axis sharded over data x fsdp). Parameters are
replicated over `data`; over `fsdp` each large leaf is split along its largest axis that the fsdp size divides
(ZeRO-3 style: XLA all-gathers them for the matmuls and reduce-scatters the gradients).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Annotated, Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lora_jax.ranges import Rule, check_fields
from lora_jax.tree import flatten_paths

log = logging.getLogger(__name__)

DATA, FSDP = "data", "fsdp"
BATCH_SPEC = P((DATA, FSDP))
# Leaves smaller than this stay replicated: splitting biases and LayerNorms costs more in collectives than it saves.
MIN_SHARD_SIZE = 2**14
MeshAxis = Annotated[int, Rule("-1 (all remaining devices) or >= 1", lambda n: n == -1 or n >= 1)]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; -1 means "all remaining devices". data * fsdp must equal the device count."""

    data: MeshAxis = -1
    fsdp: MeshAxis = 1

    def __post_init__(self):
        check_fields(self, "MeshConfig")

    @classmethod
    def from_dict(cls, d: Mapping[str, int] | None) -> "MeshConfig":
        d = dict(d or {})
        unknown = sorted(set(d) - {DATA, FSDP})
        if unknown:
            raise ValueError(f"unknown mesh axis {unknown}; the mesh has axes '{DATA}' and '{FSDP}'")
        return cls(**d)


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A 2-D device mesh with axes ('data', 'fsdp')."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, fsdp = config.data, config.fsdp
    if data == -1 and fsdp == -1:
        raise ValueError("at most one mesh axis can be -1")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(
            f"mesh {{data: {config.data}, fsdp: {config.fsdp}}} does not fit {n} devices: data x fsdp must equal {n}"
        )
    return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA, FSDP))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = MIN_SHARD_SIZE) -> P:
    """The PartitionSpec of a parameter of `shape`: split its largest axis that `fsdp_size` divides, else replicate.

    For an embedding (vocab, d_model) this is the vocab axis when the vocab divides evenly, else d_model (50265 for
    BART does not split in 2, 4 or 8, so BART's embedding is split along d_model)."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            return P(*[FSDP if a == axis else None for a in range(len(shape))])
    return P()


def tree_shardings(tree: Any, mesh: Mesh, shard_params: bool = True, min_size: int = MIN_SHARD_SIZE) -> Any:
    """NamedShardings for any tree of arrays or ShapeDtypeStructs: params, optimizer state, a whole TrainState.

    The rule depends only on a leaf's shape, so Adam's moments get exactly their parameter's sharding, and counters,
    scalars and RNG keys (all below MIN_SHARD_SIZE) are replicated. shard_params=False replicates everything."""
    fsdp = mesh.shape[FSDP] if shard_params else 1
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp, min_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays sharded over (data, fsdp) on the batch axis.

    On one host the batch is the global batch; on several, each process passes its own slice (see `host_slice`) and
    the global batch is their concatenation."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def host_slice(global_batch_size: int) -> slice:
    """The rows of the global batch this process loads (processes split the batch evenly, in process order)."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {n} processes")
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)


def put_sharded(tree: Any, shardings: Any) -> Any:
    """Places host (numpy) arrays into their shardings, each device receiving only its own slice: no full copy of a
    leaf is made on any device (`jax.make_array_from_callback`)."""

    def put(x, sharding):
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """{device: bytes of `tree` it holds}, from the arrays' actual shards."""
    out: dict[Any, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def maybe_initialize_distributed(settings=None) -> bool:
    """Joins the multi-process job this process was launched into (coordinator variables, SLURM with more than one
    task, Open MPI, a TPU pod; see `lora_jax.sharding.distributed.launch_plan`); a no-op for one process. Returns whether the
    job has several processes."""
    from lora_jax.sharding import distributed

    return distributed.initialize(settings or distributed.LaunchSettings())


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics and exported adapters."""
    return jax.process_index() == 0


def flat_specs(shardings: Any) -> dict[str, P]:
    """{'/'-path: PartitionSpec}, for logging what was sharded how."""
    return {k: s.spec for k, s in flatten_paths(shardings).items()}


def shard_state(state: Any, mesh: Mesh, shard_params: bool = True, min_size: int = MIN_SHARD_SIZE) -> tuple[Any, Any]:
    """Places a TrainState (or any tree) on the mesh by `tree_shardings`; returns (sharded state, its shardings), the
    latter to pass to `make_train_step(..., shardings=(state_shardings, batch_sharding(mesh)))`."""
    shardings = tree_shardings(state, mesh, shard_params, min_size)
    return jax.device_put(state, shardings), shardings
