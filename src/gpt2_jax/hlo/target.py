"""The programs a run would compile on a TPU slice this machine does not have, and what they hold.

`jax.export.export(..., platforms=("tpu",))` lowers a jitted function for TPU from any machine. On
an `AbstractMesh` whose device is named by kind (`TpuSlice.abstract_mesh`: no device objects), the
train, eval and generation steps are built by the same functions a run uses (`step`, `sharding`,
`generate`) and exported; the StableHLO module then shows the kernels (the splash kernel is a
`tpu_custom_call` whose `kernel_name` says forward or backward), the shardings of every argument
and result, the dtypes of the matmuls and which donated arguments alias outputs.

What export cannot give is XLA:TPU's own compilation: its memory figures and the collectives it
inserts. With libtpu installed (`pip install libtpu`, jax's `tpu` extra) its compile-only
topologies (`jax.experimental.topologies`) stand in for the slice, devices and hosts included, and
`TpuSlice.compile_mesh` gives a mesh over them that `lower(...).compile()` takes; without it those
figures are not available here, and the report says so rather than print the CPU's.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, Mesh, PartitionSpec as P

from gpt2_jax import attention, costs, memory, sharding, step as step_lib
from gpt2_jax.config import REMAT_BY_WEIGHT, ConfigError, ModelConfig, replace
from gpt2_jax.generate import _decode_jit, _generate_jit, _start_jit  # the programs `Generator.generate_tokens` runs
from gpt2_jax.model import abstract_params

SPLASH_PREFIX = "splash_mha"  # the kernel names of jax's splash attention (Pallas ops)
BACKWARD_KERNELS = ("_dq", "_dkv")  # splash_mha_dq*, splash_mha_dkv*: the gradient kernels


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """One TPU generation's per-chip facts (sources: Google Cloud's TPU system-architecture pages)."""

    name: str  # as slice names start: v5e-8
    device_kind: str  # what jax reports; `costs.PEAK_FLOPS` (peak bf16 FLOP/s per chip) is keyed by it
    hbm_gib: float  # high-bandwidth memory per chip
    cores: int  # TensorCores per chip: one JAX device each chip (megacore on v4 and v5p)
    cores_in_name: bool  # the slice name counts TensorCores (v4-8 and v5p-8 are 4 chips), else chips
    dims: int  # the torus's dimensions (libtpu's topology names: v5e:2x4, v4:2x2x1)
    chip_config: str = "default"  # libtpu's chip_config_name: v4 counts a megacore chip as one device


GENERATIONS = (
    # TPU v4: 32 GiB HBM2 and 275 TFLOP/s bf16 per chip, two TensorCores as one megacore device.
    TpuGeneration("v4", "TPU v4", 32.0, 2, True, 3, chip_config="megacore"),
    # TPU v5e: 16 GiB HBM2 and 197 TFLOP/s bf16 per chip, one TensorCore (also named v5litepod-N).
    TpuGeneration("v5e", "TPU v5 lite", 16.0, 1, False, 2),
    # TPU v5p: 95 GiB HBM2e and 459 TFLOP/s bf16 per chip, two TensorCores (megacore).
    TpuGeneration("v5p", "TPU v5", 95.0, 2, True, 3),
    # TPU v6e (Trillium): 32 GiB HBM and 918 TFLOP/s bf16 per chip, one TensorCore.
    TpuGeneration("v6e", "TPU v6 lite", 32.0, 1, False, 2),
)
ALIASES = {"v5litepod": "v5e"}


def _torus(n: int, dims: int) -> tuple[int, ...]:
    """The usual shape of a slice of `n` chips (a power of two): 2x4 and 4x4 for two dimensions,
    2x2x1, 2x2x2, 2x2x4, 2x4x4 and 4x4x4 for three."""
    shape = [1] * dims
    order = [0, 1, 2] + [2, 1, 0] * 8 if dims == 3 else [1, 0] * 12
    for axis in itertools.islice(order, int(math.log2(n))):
        shape[axis] *= 2
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A named TPU slice (v5e-8, v4-32, ...): its chips, and meshes over them for exporting and compiling."""

    name: str
    generation: TpuGeneration
    chips: int

    @property
    def topology(self) -> str:
        """libtpu's name of the slice's torus (v5e:2x4)."""
        return f"{self.generation.name}:{'x'.join(map(str, _torus(self.chips, self.generation.dims)))}"

    def device(self) -> jax.sharding.AbstractDevice:
        g = self.generation
        return jax.sharding.AbstractDevice(device_kind=g.device_kind, num_cores=g.cores, platform="tpu")

    def abstract_mesh(self, shape) -> AbstractMesh:
        """The run's (data, fsdp, tensor) mesh over the slice's chips, devices named by kind only."""
        shape = sharding.resolve_mesh_shape(shape, self.chips)
        return AbstractMesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3, abstract_device=self.device())

    def compile_mesh(self, shape) -> Mesh | None:
        """The mesh over libtpu's compile-only devices of the slice (each with its host's process
        index), which XLA:TPU can compile for; None without libtpu."""
        if importlib.util.find_spec("libtpu") is None:
            return None
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(self.topology, "tpu", chip_config_name=self.generation.chip_config).devices
        return sharding.make_mesh(sharding.resolve_mesh_shape(shape, self.chips), devices)


def tpu_slice(name: str) -> TpuSlice:
    """'v5e-8', 'v4-32', 'v5p-8', 'v6e-16', 'v5litepod-8' -> the slice; ConfigError naming the valid forms."""
    valid = ", ".join(f"{g.name}-N" for g in GENERATIONS)
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
    gens = {g.name: g for g in GENERATIONS}
    gen = gens.get(ALIASES.get(m.group(1), m.group(1))) if m else None
    if gen is None:
        raise ConfigError(f"unknown TPU {name!r}; valid: {valid} (e.g. v5e-8, v4-8, v5p-8)")
    n = int(m.group(2))
    chips = n // 2 if gen.cores_in_name else n
    if n < 1 or (gen.cores_in_name and n % 2) or chips & (chips - 1):
        what = "TensorCores (2 per chip)" if gen.cores_in_name else "chips"
        raise ConfigError(f"TPU {name!r}: {gen.name}-N counts {what}; N must give a power-of-two number of chips (e.g. {gen.name}-8)")
    return TpuSlice(f"{gen.name}-{n}", gen, chips)


# ---------------------------------------------------------------------------------------------
# The programs, built by the functions a run uses


def placement(cfg: ModelConfig, mesh, strategy: str) -> sharding.Placement:
    """The placement a run would have on `mesh` (abstract or compile-only) with `strategy`."""
    return sharding.Placement(mesh, strategy, sharding.logical_rules(strategy, mesh, cfg))


def train_program(cfg: ModelConfig, place: sharding.Placement, tx, schedule, batch_size: int, seq_len: int, grad_accum: int):
    """(`step.compile_train_step`'s jitted step, its arguments as shapes with shardings)."""
    abstract, shardings = step_lib.state_shardings(cfg, tx, place.mesh, place.rules)
    fn = step_lib.compile_train_step(cfg, tx, schedule, grad_accum, place.mesh, place.rules, shardings)
    batch = {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32, sharding=sharding.batch_sharding(place.mesh))}
    return fn, (abstract, batch)


def eval_program(cfg: ModelConfig, place: sharding.Placement, batch_size: int, seq_len: int):
    """(`step.compile_eval_step`'s jitted step, its arguments as shapes with shardings)."""
    params = _abstract_params(cfg, place)
    fn = step_lib.compile_eval_step(cfg, place.mesh, place.rules, jax.tree.map(lambda a: a.sharding, params))
    batch = {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32, sharding=sharding.batch_sharding(place.mesh))}
    return fn, (params, batch)


def _abstract_params(cfg: ModelConfig, place: sharding.Placement):
    """The parameters as shapes carrying the shardings a run places them on."""
    boxed = abstract_params(cfg)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
                        place.param_shardings(boxed))


def export_generate(cfg: ModelConfig, place: sharding.Placement, rows: int, prompt_len: int, max_new_tokens: int, platforms,
                    *, chunked: bool = False):
    """`jax.export` of the program `Generator.generate_tokens` runs (prefill, then the decode loop),
    greedy, for `rows` prompts padded to `prompt_len`, on `place` as a Generator places them. With
    `chunked`, the two programs of a generation decoded in chunks (a training sample on a pod):
    (prefill and the first token, one chunk of the decode loop with its carry donated)."""
    params = _abstract_params(cfg, place)
    row = lambda dtype, *shape: jax.ShapeDtypeStruct((rows, *shape), dtype, sharding=place.row_sharding(rows))  # noqa: E731
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)  # noqa: E731
    rules = place.rules_for_rows(rows)
    args = (params, row(jnp.int32, prompt_len), row(jnp.int32), scalar(jnp.uint32), scalar(jnp.float32), scalar(jnp.float32))
    kw = dict(cfg=cfg, rules=rules, max_new_tokens=max_new_tokens, greedy=True, top_k=0, use_top_p=False, eot_id=None,
              stream=None)
    with sharding.activate(place.mesh, rules):
        if not chunked:
            return jax.export.export(_generate_jit, platforms=platforms)(*args, **kw)
        carry = jax.eval_shape(functools.partial(_start_jit, **kw), *args)
        return (jax.export.export(_start_jit, platforms=platforms)(*args, **kw),
                jax.export.export(_decode_jit, platforms=platforms)(params, carry, *args[2:], scalar(jnp.int32), **kw))


# ---------------------------------------------------------------------------------------------
# Reading an exported module's text


def kernels(text: str) -> list[str]:
    """The `kernel_name` of every Pallas/Mosaic kernel (`tpu_custom_call`) in a module, in order."""
    return re.findall(r'kernel_name = "([^"]+)"', text) if "tpu_custom_call" in text else []


def splash_kernels(text: str) -> tuple[list[str], list[str]]:
    """(forward, backward) splash attention kernels of a module."""
    names = [k for k in kernels(text) if k.startswith(SPLASH_PREFIX)]
    backward = [k for k in names if any(b in k for b in BACKWARD_KERNELS)]
    return [k for k in names if k not in backward], backward


def main_arguments(text: str) -> list[tuple[str, str, str]]:
    """(name, type, attributes) of each argument of the module's public `main`."""
    start = text.index("func.func public @main(")
    signature = text[start:text.index(") -> (", start)]
    out = []
    for chunk in re.split(r"%arg\d+: ", signature)[1:]:
        name = re.search(r'loc\("([^"]*)"\)', chunk)
        out.append((name.group(1) if name else "", chunk.split(" ", 1)[0], chunk))
    return out


def donated_unaliased(text: str, prefix: str) -> list[str]:
    """The arguments named `prefix...` (say "state") that alias no output: neither XLA's
    `tf.aliasing_output` nor jax's `jax.buffer_donor` marks them."""
    return [name for name, _, attrs in main_arguments(text) if name.startswith(prefix)
            and "tf.aliasing_output" not in attrs and "jax.buffer_donor" not in attrs]


def dot_operand_types(text: str) -> list[tuple[str, str]]:
    """The operand types of every `dot_general` ("tensor<768x3072xbf16>", ...)."""
    return re.findall(r"stablehlo\.dot_general .*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)


def weight_dot_dtypes(text: str, cfg: ModelConfig) -> dict[str, set[str]]:
    """{parameter matrix: the element types it enters matmuls with}, a matrix recognized by its
    shape (one layer's, as the scanned block sees it)."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract_params(cfg))):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape[1:] if cfg.scan_layers and name.startswith("['h']") else leaf.shape
        if len(shape) >= 2:
            shapes["x".join(map(str, shape))] = name
    out: dict[str, set[str]] = {}
    for operand in (o for pair in dot_operand_types(text) for o in pair):
        dims, dtype = operand[len("tensor<"):-1].rsplit("x", 1)
        if dims in shapes:
            out.setdefault(shapes[dims], set()).add(dtype)
    return out


def spec_text(spec: P, ndim: int) -> str:
    """A PartitionSpec padded to `ndim` and printed compactly: P(None, 'fsdp') -> '-,fsdp'."""
    axes = tuple(spec) + (None,) * (ndim - len(spec))
    return ",".join("-" if a is None else "+".join(a) if isinstance(a, tuple) else a for a in axes)


def padded(spec: P, ndim: int) -> tuple:
    """`spec` as a tuple of `ndim` entries (specs that differ only in trailing Nones compare equal)."""
    return tuple(spec) + (None,) * (ndim - len(spec))



# ---------------------------------------------------------------------------------------------
# The report of `python -m gpt2_jax.train SIZE --dry-run --tpu NAME`


def resolve_for(tcfg, mcfg: ModelConfig, tpu: TpuSlice, seq_len: int) -> tuple[ModelConfig, attention.Choice]:
    """The model config a run on `tpu` trains: compute_dtype=auto is bfloat16 there, attention=auto
    the platform's choice (`attention.resolve` against the slice's device)."""
    mcfg = replace(mcfg, dtype="bfloat16" if tcfg.compute_dtype == "auto" else tcfg.compute_dtype)
    choice = attention.resolve(mcfg, tpu.device(), seq_len)
    return replace(mcfg, attention=choice.impl), choice


def fit_by_estimate(tcfg, mcfg: ModelConfig, mesh, seq_len: int, hbm_bytes: float) -> tuple[int, str, float]:
    """(grad_accum, remat_policy, bytes per chip): as given, or for `auto` the smallest grad_accum
    and then the lightest remat whose shapes-based estimate (`memory.train_estimate`) leaves
    `memory.MARGIN` of a chip free (the largest grad_accum and full remat when none does)."""
    shape, dp = dict(mesh.shape), sharding.data_parallel_size(mesh)
    shards = {"dp": 1, "fsdp": shape["fsdp"], "fsdp_tp": shape["fsdp"] * shape["tensor"]}[tcfg.strategy]
    tensor = shape["tensor"] if tcfg.strategy == "fsdp_tp" else 1
    ks = [tcfg.grad_accum] if tcfg.grad_accum else [k for k in range(1, tcfg.batch_size + 1)
                                                    if tcfg.batch_size % k == 0 and (tcfg.batch_size // k) % dp == 0]
    if not ks:
        raise sharding.ShardingError(f"batch_size={tcfg.batch_size} does not divide over the data axes ({dp} chips) with any grad_accum")
    sharding.check_batch(tcfg.batch_size, ks[0], mesh)
    policies = [mcfg.remat_policy] if mcfg.remat_policy != "auto" else list(REMAT_BY_WEIGHT)

    def need(k: int, remat: str) -> float:
        return memory.train_estimate(replace(mcfg, remat_policy=remat), rows_per_device=max(1, tcfg.batch_size // k // dp),
                                     seq_len=seq_len, param_shards=shards, tensor=tensor, grad_accum=k).total

    budget = (1 - memory.MARGIN) * hbm_bytes
    k = next((k for k in ks if need(k, policies[-1]) <= budget), ks[-1])
    remat = next((p for p in policies if need(k, p) <= budget), policies[-1])
    return k, remat, need(k, remat)


def _shardings_lines(exported, abstract_state, mesh) -> list[str]:
    """One line per parameter: its shape and mesh axes per dimension, as the exported step takes it."""
    shardings = exported.in_shardings_jax(mesh)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract_state.params)]
    first = len(jax.tree.leaves(abstract_state.step))  # the params follow the step counter
    lines = []
    for i, name in enumerate(names):
        aval = exported.in_avals[first + i]
        lines.append(f"  {name:40s} {str(list(aval.shape)):22s} {aval.dtype}  [{spec_text(shardings[first + i].spec, aval.ndim)}]")
    return lines


def _memory_lines(tpu: TpuSlice, mesh_shape, build, estimate: float) -> list[str]:
    """XLA:TPU's memory figures from libtpu's compile-only slice, or why there are none."""
    hbm = tpu.generation.hbm_gib
    head = f"memory per chip: shapes-based estimate {estimate / memory.GiB:.2f} GiB of {hbm:g} GiB HBM"
    mesh = tpu.compile_mesh(mesh_shape)
    if mesh is None:
        return [head, "  XLA:TPU's own figures need libtpu (pip install libtpu, or make install ACCEL=tpu): not shown "
                      "(this machine's XLA would give the CPU's, not the TPU's)"]
    hosts = len({d.process_index for d in mesh.devices.flat})
    try:
        fn, args = build(mesh)
        m = fn.lower(*args).compile().memory_analysis()
    except Exception as e:  # XLA:TPU refuses a program that does not fit (RESOURCE_EXHAUSTED)
        return [head, f"  XLA:TPU (libtpu, topology {tpu.topology}, {hosts} host(s)) refused the step: {str(e).splitlines()[0][:300]}"]
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    gib = lambda b: f"{b / memory.GiB:.2f} GiB"  # noqa: E731
    return [head, f"  XLA:TPU (libtpu compile-only, topology {tpu.topology}, {hosts} host(s)): state and batch "
                  f"{gib(m.argument_size_in_bytes)}, temporaries {gib(m.temp_size_in_bytes)}, total {gib(total)} of {hbm:g} GiB"]


def report(tcfg, mcfg: ModelConfig, tpu: TpuSlice, schedule, tx, seq_len: int) -> str:
    """What a run of `tcfg`/`mcfg` would compile on `tpu`: the kernels, shardings and dtypes of its
    exported train, eval and generation programs, its analytic FLOPs per step against the chips'
    peak, and its memory per chip (XLA:TPU's figures only where libtpu can compile for the slice)."""
    mcfg, choice = resolve_for(tcfg, mcfg, tpu, seq_len)
    original_remat = mcfg.remat_policy
    mesh = tpu.abstract_mesh(tcfg.mesh)
    k, remat, estimate = fit_by_estimate(tcfg, mcfg, mesh, seq_len, tpu.generation.hbm_gib * memory.GiB)
    mcfg = replace(mcfg, remat_policy=remat)
    place = placement(mcfg, mesh, tcfg.strategy)
    build = lambda m: train_program(mcfg, placement(mcfg, m, tcfg.strategy), tx, schedule, tcfg.batch_size, seq_len, k)  # noqa: E731
    fn, args = build(mesh)
    train = fn.export(*args, platforms=("tpu",))
    text = train.mlir_module()
    fwd, bwd = splash_kernels(text)
    unaliased = donated_unaliased(text, "state")
    n_state = sum(1 for name, _, _ in main_arguments(text) if name.startswith("state"))
    efn, eargs = eval_program(mcfg, place, sharding.data_parallel_size(mesh), seq_len)
    eval_kernels = kernels(efn.export(*eargs, platforms=("tpu",)).mlir_module())
    gen_kernels = kernels(export_generate(mcfg, place, 1, 128, tcfg.sample_tokens, ("tpu",)).mlir_module())
    decode_impl = attention.select(mcfg, 128, decode=True, dropout=False)
    peak = costs.peak_flops(tpu.device())
    flops = costs.flops_per_token(mcfg, seq_len) * tcfg.batch_size * seq_len
    dp = sharding.data_parallel_size(mesh)
    how = "as set" if tcfg.grad_accum and remat == original_remat else "auto: chosen from the shapes-based estimate"
    count = lambda names: ", ".join(f"{n} x{names.count(n)}" for n in dict.fromkeys(names)) or "none"  # noqa: E731
    lines = [
        f"target: TPU {tpu.name}: {tpu.chips} chips of {tpu.generation.device_kind}, {tpu.generation.hbm_gib:g} GiB HBM and "
        f"{peak / 1e12:.0f} TFLOP/s bf16 peak each (costs.PEAK_FLOPS); programs exported with jax.export for platform tpu",
        f"model: {tcfg.size}, {mcfg.n_params:,} parameters (params {mcfg.param_dtype}, compute {mcfg.dtype}), seq_len {seq_len}",
        f"attention: {choice}; decoding: {decode_impl} (attention.select)",
        f"mesh: {dict(mesh.shape)}, strategy {tcfg.strategy}; batch {tcfg.batch_size} = grad_accum {k} x "
        f"{tcfg.batch_size // k} ({tcfg.batch_size // k // dp} per chip), remat_policy={remat} ({how})",
        f"train step: splash forward {count(fwd)}; backward {count(bwd)}; donated state aliased: "
        f"{n_state - len(unaliased)} of {n_state} arrays" + (f" (not: {', '.join(unaliased)})" if unaliased else ""),
        f"eval step: {count(eval_kernels)}",
        f"generation (prefill + decode loop, 1 row of 128 + {tcfg.sample_tokens} tokens): kernels {count(gen_kernels)}",
        "parameter shardings (the optimizer moments take their parameter's):",
        *_shardings_lines(train, args[0], mesh),
        f"FLOPs per step (analytic 6N + 12LHQT, costs.flops_per_token): {flops / 1e12:.1f} TFLOP; at the peak of "
        f"{tpu.chips} chips {flops / (peak * tpu.chips) * 1e3:.0f} ms per step, {tcfg.batch_size * seq_len / (flops / (peak * tpu.chips)):,.0f} tokens/s",
        *_memory_lines(tpu, tcfg.mesh, build, estimate),
    ]
    return "\n".join(lines)
