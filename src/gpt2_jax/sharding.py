"""Device mesh, logical-axis rules and sharded placement of train states and batches.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism whose
parameters and optimizer state are sharded too) and `tensor` (Megatron-style tensor parallelism
over heads, MLP width and vocabulary). The batch is split over `data` x `fsdp`. The model only
names logical axes (see model.py); `logical_rules(strategy)` maps them onto mesh axes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from gpt2_jax.config import STRATEGIES
from gpt2_jax.launch import launched_as_several

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Parameters with at least this many elements must be sharded under FSDP (MaxText's guard).
LARGE_PARAM_ELEMENTS = 1 << 20


class ShardingError(ValueError):
    """A mesh, strategy or batch size that cannot work on the devices at hand."""


def logical_rules(strategy: str, mesh: Mesh | None = None, config=None) -> tuple[tuple[str, Any], ...]:
    """The (logical axis, mesh axes) table for `strategy` (dp, fsdp or fsdp_tp), t5x style.

    With `mesh` and `config` (a ModelConfig) given, activation axes whose size the mesh axis does not
    divide (e.g. 5 heads over tensor=2) are left unsharded; parameters get the same treatment per
    leaf in `param_shardings`.
    """
    if strategy not in STRATEGIES:
        raise ShardingError(f"unknown sharding strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    shard_params = strategy in ("fsdp", "fsdp_tp")
    tp = "tensor" if strategy == "fsdp_tp" else None
    rules = {
        # parameters
        "embed": "fsdp" if shard_params else None,
        "vocab": tp,
        "heads": tp,
        "mlp": tp,
        "pos": None,
        "qkv": None,
        "kv": None,
        "norm": None,
        "layers": None,
        # activations: batch over every data-parallel axis, model dims over `tensor`
        "act_batch": BATCH_AXES,
        "act_seq": None,
        "act_embed": None,
        "act_heads": tp,
        "act_kv": None,
        "act_mlp": tp,
        "act_vocab": tp,
    }
    if mesh is not None and config is not None and tp is not None:
        for name in tensor_undivided(config, mesh):
            rules[name] = None
    return tuple(rules.items())


def tensor_undivided(config, mesh: Mesh) -> dict[str, str]:
    """{activation axis: description} of the model dimensions that the `tensor` axis does not divide:
    under fsdp_tp those stay whole on every tensor rank (computed redundantly)."""
    n = mesh.shape["tensor"]
    sizes = {
        "act_heads": (config.n_head, "heads"), "act_mlp": (config.n_inner, "MLP width"),
        "act_vocab": (config.padded_vocab_size, "vocabulary rows"),
    }
    return {name: f"{size} {what}" for name, (size, what) in sizes.items() if n > 1 and size % n}


def parse_mesh_shape(text: str | Sequence[int]) -> tuple[int, int, int]:
    """'data,fsdp,tensor' such as '-1,1,1' or '2,2,2' -> a tuple of three ints."""
    if isinstance(text, str):
        try:
            shape = tuple(int(x) for x in text.replace("x", ",").split(","))
        except ValueError:
            shape = ()
    else:
        shape = tuple(int(x) for x in text)
    if len(shape) != 3 or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise ShardingError(
            f"mesh {text!r} is not three positive sizes for data,fsdp,tensor (one may be -1 = the rest), "
            f"e.g. mesh=-1,1,1"
        )
    return shape


def resolve_mesh_shape(shape: str | Sequence[int], n_devices: int) -> tuple[int, int, int]:
    """Fill in a -1 and check that the mesh uses exactly `n_devices` devices."""
    shape = parse_mesh_shape(shape)
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ShardingError(
                f"mesh {','.join(map(str, shape))}: {n_devices} devices do not divide by {known}; "
                f"choose sizes whose product divides {n_devices}"
            )
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        raise ShardingError(
            f"mesh {','.join(map(str, shape))} needs {math.prod(shape)} devices but {n_devices} are "
            f"available; make the product {n_devices} or use -1 for one axis (e.g. mesh=-1,1,1)"
        )
    return shape


def make_mesh(shape: str | Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    # Auto axes: classic GSPMD propagation (jax.make_mesh defaults to Explicit axes in new JAX).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_spec(logical: P | None, shape: Sequence[int], mesh: Mesh, rules) -> P:
    """Logical PartitionSpec -> mesh PartitionSpec for an array of `shape` (see `fit_spec`)."""
    table = dict(rules)
    logical = tuple(logical or ()) + (None,) * (len(shape) - len(logical or ()))
    axes = []
    for name in logical:
        a = table.get(name) if name is not None else None
        axes.append((a,) if isinstance(a, str) else tuple(a or ()))
    return fit_spec(axes, shape, mesh)


def fit_spec(axes_per_dim: Sequence[Sequence[str]], shape: Sequence[int], mesh) -> P:
    """Mesh axes per dimension -> PartitionSpec on `mesh`: an axis is dropped from a dimension whose
    size it does not divide (the last one first), axes of size 1 are left out, none is used twice."""
    used: set[str] = set()
    out = []
    for axes, dim in zip(axes_per_dim, shape):
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def param_shardings(boxed_params: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a params tree that still carries Flax's logical-axis boxes.

    `boxed_params` may be abstract (`model.abstract_params(config)`): nothing is allocated.
    """
    specs = nn.get_partition_spec(boxed_params)
    shapes = nn.meta.unbox(boxed_params)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, mesh_spec(spec, x.shape, mesh, rules)),
        specs,
        shapes,
        is_leaf=lambda x: isinstance(x, P),
    )


def opt_state_shardings(tx, abstract_opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer moments take their parameter's sharding; counters and the like are replicated.

    A moment that one part of an `optax.partition` keeps only for its own parameters holds
    `optax.MaskedNode`s (no arrays) in the others' places; those stay as they are.
    """
    import optax

    return optax.tree_map_params(
        tx,
        lambda x, s: x if isinstance(x, optax.MaskedNode) else s,
        abstract_opt_state,
        params_shardings,
        transform_non_params=lambda _: NamedSharding(mesh, P()),
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )


@contextlib.contextmanager
def activate(mesh: Mesh | AbstractMesh, rules):
    """Make `mesh` and the logical `rules` current (the model's activation constraints use both).

    An AbstractMesh (devices named by kind only, e.g. a TPU slice this machine does not have) can
    trace and export programs but not run them.
    """
    current = jax.sharding.use_abstract_mesh if isinstance(mesh, AbstractMesh) else jax.set_mesh
    with current(mesh), nn.logical_axis_rules(rules):
        yield


def sharded_jit(fn, mesh: Mesh | AbstractMesh, rules, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` that traces and runs with `mesh` and `rules` active.

    The result has the jitted function's `.lower` too (for `memory_analysis()`), and
    `.export(*args, platforms=...)`: `jax.export.export` of it for those platforms (say, TPU from a
    machine without one: `gpt2_jax.hlo.target`).
    """
    jitted = jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with activate(mesh, rules):
            return jitted(*args, **kwargs)

    def lower(*args, **kwargs):
        with activate(mesh, rules):
            return jitted.lower(*args, **kwargs)

    def export(*args, platforms: Sequence[str], **kwargs):
        with activate(mesh, rules):
            return jax.export.export(jitted, platforms=platforms)(*args, **kwargs)

    call.lower, call.export = lower, export
    return call


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a model's parameters, batches and activations go: a mesh and a strategy's rules.

    Training, evaluation and generation all place parameters through this one object, so what
    trains on 8 chips also evaluates and samples on 8 chips (no device holds a whole copy under FSDP).
    """

    mesh: Mesh
    strategy: str
    rules: tuple

    def param_shardings(self, boxed_params: Any) -> Any:
        """NamedShardings of a params tree carrying Flax's logical-axis boxes (`model.abstract_params`)."""
        return param_shardings(boxed_params, self.mesh, self.rules)

    def place(self, boxed_params: Any, params: Any) -> Any:
        """`params` (host or device arrays, the tree of `boxed_params`) on their shardings."""
        return jax.device_put(params, self.param_shardings(boxed_params))

    def rules_for_rows(self, rows: int) -> tuple:
        """The rules for a batch of `rows`: split over the data axes when they divide it, else whole."""
        if rows % data_parallel_size(self.mesh) == 0:
            return self.rules
        return tuple((k, None if k == "act_batch" else v) for k, v in self.rules)

    def row_sharding(self, rows: int) -> NamedSharding:
        """Rows split over the data axes when they divide them, else replicated."""
        return batch_sharding(self.mesh) if rows % data_parallel_size(self.mesh) == 0 else NamedSharding(self.mesh, P())

    def jit(self, fn, rows: int | None = None, **jit_kwargs):
        """`sharded_jit` on this mesh, with the rules for a batch of `rows` (default: the strategy's)."""
        return sharded_jit(fn, self.mesh, self.rules if rows is None else self.rules_for_rows(rows), **jit_kwargs)


def placement(config, mesh: str | Sequence[int] = (1, -1, 1), strategy: str = "fsdp", devices: Sequence[Any] | None = None) -> Placement:
    """The placement of `config` on `devices` (default: every device of every process): FSDP over
    all of them unless told otherwise."""
    m = make_mesh(mesh, devices)
    return Placement(m, strategy, logical_rules(strategy, m, config))


def check_params_sharded(params_or_shardings: Any, strategy: str, min_elements: int = LARGE_PARAM_ELEMENTS, shapes=None):
    """Raise ShardingError if FSDP left a parameter of >= `min_elements` elements fully replicated.

    Accepts arrays (their `.sharding` is read) or NamedShardings with `shapes` alongside.
    """
    if strategy not in ("fsdp", "fsdp_tp"):
        return
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", x), params_or_shardings)
    shapes = params_or_shardings if shapes is None else shapes
    bad = []
    for (path, sh), x in zip(jax.tree_util.tree_leaves_with_path(shardings), jax.tree.leaves(shapes)):
        if math.prod(x.shape) >= min_elements and sh.is_fully_replicated:
            bad.append(jax.tree_util.keystr(path))
    if bad:
        raise ShardingError(
            f"strategy {strategy} left large parameters replicated: {', '.join(bad)}; the mesh needs an "
            f"fsdp axis (>1) that divides n_embd, e.g. mesh=1,-1,1"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch split over the data-parallel axes, the sequence kept whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def result_sharding(mesh: Mesh) -> NamedSharding:
    """Where per-row results that every process reads go: split like the batch on a mesh of this
    process's devices; replicated on a mesh over several processes (a multi-host run's), where each
    process could not read the rows another holds."""
    if len({d.process_index for d in mesh.devices.flat}) > 1:
        return NamedSharding(mesh, P())
    return batch_sharding(mesh)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh) -> int:
    """Check that `batch_size` splits into `grad_accum` micro-batches that divide over the data axes.

    Returns the number of rows each process loads per step.
    """
    if grad_accum < 1 or batch_size % grad_accum:
        raise ShardingError(f"batch_size={batch_size} is not divisible by grad_accum={grad_accum}")
    micro = batch_size // grad_accum
    n = data_parallel_size(mesh)
    if micro % n:
        raise ShardingError(
            f"micro-batch of {micro} sequences (batch_size={batch_size} / grad_accum={grad_accum}) does not "
            f"divide over the data axes (data x fsdp = {n} devices); make batch_size / grad_accum a multiple of {n}"
        )
    if batch_size % jax.process_count():
        raise ShardingError(f"batch_size={batch_size} does not divide over {jax.process_count()} processes")
    return batch_size // jax.process_count()


# Programs dispatched and not yet read back, at most. Two keep the device busy while the host reads
# the previous result; an unbounded queue keeps every batch of a split on the device at once, and on
# XLA:CPU dozens of queued programs with collectives can miss each other's rendezvous (an abort).
MAX_IN_FLIGHT = 2


def bounded(fn, items, depth: int = MAX_IN_FLIGHT):
    """Yield `jax.device_get(fn(item))` for each item in order, with at most `depth` calls of `fn`
    dispatched and not yet read back."""
    pending = collections.deque()
    for item in items:
        pending.append(fn(item))
        if len(pending) >= depth:
            yield jax.device_get(pending.popleft())
    while pending:
        yield jax.device_get(pending.popleft())


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays split over the data axes (each host feeds only its shard)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def distributed_client():
    """The client of JAX's distributed runtime (its key-value store and bounded barriers:
    `key_value_set`, `key_value_dir_get`, `wait_at_barrier`), or None on a single process."""
    if jax.process_count() == 1:
        return None
    from jax._src import distributed  # not public: the client JAX keeps after `jax.distributed.initialize`

    return distributed.global_state.client


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
    heartbeat_timeout_s: int = 100,
) -> bool:
    """Start JAX's multi-controller runtime when launched as several processes.

    Explicit `coordinator`/`num_processes`/`process_id` win; otherwise JAX's own auto-detection runs
    when a cluster launcher is visible (SLURM, Open MPI, a multi-host TPU slice). A process that
    sends no heartbeat for `heartbeat_timeout_s` is declared gone, and the runtime ends the others.
    Returns whether the runtime was initialized.
    """
    if coordinator or num_processes or process_id is not None:
        if not (coordinator and num_processes and process_id is not None):
            raise ShardingError("multi-process runs need all of --coordinator, --num-processes and --process-id")
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )
        return True
    if launched_as_several():
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
        return True
    return False
