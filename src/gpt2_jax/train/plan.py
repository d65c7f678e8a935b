"""Fit the train step to the device before anything is allocated: `grad_accum=auto` and
`remat_policy=auto` chosen from the compiled program's memory.

The step is compiled abstractly (the state and batch as shapes with shardings; nothing is
allocated) and `memory.compiled_bytes` is compared with one device's memory less a 10% margin
(`memory_stats()["bytes_limit"]`, else `device_memory_gib=`, else the host's share). The global
batch is kept exactly: only divisors of `batch_size` whose micro-batch divides over the data axes
are candidates. The choice is the smallest `grad_accum` that fits with the heaviest remat allowed,
found by bisection (memory falls as grad_accum grows), then the lightest remat policy that fits at
that `grad_accum` (none, dots, dots_no_batch, full). Explicit settings are kept as given. The compiled
program of the choice is the one training runs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gpt2_jax import costs, hlo, memory, optim, sharding, step as step_lib
from gpt2_jax.config import REMAT_BY_WEIGHT, ModelConfig, auto_fields, replace
from gpt2_jax.train.config import TrainConfig, optimizer_defaults


@dataclasses.dataclass
class Plan:
    """A run's resolved settings, its placement and optimizer, and its compiled train step."""

    tcfg: TrainConfig  # grad_accum resolved
    mcfg: ModelConfig  # remat_policy resolved
    seq_len: int
    place: sharding.Placement
    schedule: Any
    tx: Any
    abstract: Any  # the train state as shapes with shardings
    shardings: Any
    train_step: Any  # the compiled program
    bytes: int  # its memory per device
    limit: int  # one device's memory
    limit_source: str
    tried: list[tuple[int, str, int]]  # (grad_accum, remat_policy, bytes) of every compile
    chosen: bool  # grad_accum or remat_policy was auto

    def describe(self) -> str:
        micro = self.tcfg.batch_size // self.tcfg.grad_accum
        per_device = micro // sharding.data_parallel_size(self.place.mesh)
        how = "chosen" if self.chosen else "as set"
        return (
            f"grad_accum={self.tcfg.grad_accum} (micro-batch {micro} = {per_device} per device), "
            f"remat_policy={self.mcfg.remat_policy} ({how}): compiled step {self.bytes / memory.GiB:.2f} GiB per device "
            f"of {self.limit / memory.GiB:.2f} GiB ({self.limit_source}), after {len(self.tried)} compile(s)"
        )


def batch_shapes(tcfg: TrainConfig, seq_len: int, place: sharding.Placement) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a step takes, as shapes: tokens [B, T+1], and for fine-tuning the mask [B, T]."""
    rows = sharding.batch_sharding(place.mesh)
    batch = {"tokens": jax.ShapeDtypeStruct((tcfg.batch_size, seq_len + 1), jnp.int32, sharding=rows)}
    if tcfg.finetune_data:
        batch["mask"] = jax.ShapeDtypeStruct((tcfg.batch_size, seq_len), jnp.float32, sharding=rows)
    return batch


def candidate_accums(batch_size: int, mesh) -> list[int]:
    """Every grad_accum that keeps the global batch and splits each micro-batch over the data axes
    and the processes, smallest first."""
    out = []
    for k in range(1, batch_size + 1):
        if batch_size % k:
            continue
        try:
            sharding.check_batch(batch_size, k, mesh)
        except sharding.ShardingError:
            continue
        if (batch_size // k) % jax.process_count() == 0:
            out.append(k)
    return out


def smallest_fitting(ks: list[int], fits: Callable[[int], bool], start: int = 0) -> int | None:
    """The smallest k in `ks` (ascending) for which `fits(k)`, assuming fits is monotone (a larger
    grad_accum never needs more memory); bisection whose first probe is index `start`. None if
    not even the last fits."""
    lo, hi = 0, len(ks) - 1  # the answer, if any, is in ks[lo..hi]
    mid = min(max(start, lo), hi)
    while lo < hi:
        if fits(ks[mid]):
            hi = mid
        else:
            lo = mid + 1
        mid = (lo + hi) // 2
    return ks[lo] if fits(ks[lo]) else None


def make_optimizer(tcfg: TrainConfig, mcfg: ModelConfig) -> tuple[Any, Any]:
    """(the schedule of AdamW's learning rate, which the metrics report; the optimizer) of a run.

    Under muon the hidden matrices follow the same schedule shape at their own peak, `muon_lr`,
    and the Newton-Schulz iteration runs in the model's compute dtype (bfloat16 on GPU/TPU, as
    the records do; float32 on CPU, where XLA's bfloat16 matmuls are slow).
    """
    tcfg = optimizer_defaults(tcfg)
    muon = tcfg.optimizer == "muon"
    kind = tcfg.schedule if tcfg.schedule != "auto" else "warmdown" if muon else "cosine"

    def shaped(peak: float):
        if kind == "warmdown":
            return optim.warmdown_schedule(peak, tcfg.warmup_steps, tcfg.steps, tcfg.warmdown_frac)
        return optim.lr_schedule(peak, tcfg.warmup_steps, tcfg.steps, tcfg.min_lr_ratio)

    schedule = shaped(tcfg.lr or (optim.MUON_ADAM_LR if muon else optim.PEAK_LR[tcfg.size]))
    if not muon:
        return schedule, optim.make_optimizer(
            schedule, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps, weight_decay=tcfg.weight_decay, grad_clip=tcfg.grad_clip
        )
    return schedule, optim.make_muon_optimizer(
        shaped(tcfg.muon_lr), schedule, momentum=tcfg.muon_momentum, nesterov=tcfg.muon_nesterov,
        ns_steps=tcfg.muon_ns_steps, ns_dtype=jnp.dtype(mcfg.dtype), muon_weight_decay=tcfg.muon_weight_decay,
        b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps, weight_decay=tcfg.weight_decay, grad_clip=tcfg.grad_clip,
    )


def make_plan(tcfg: TrainConfig, mcfg: ModelConfig, seq_len: int) -> Plan:
    """Placement, optimizer, abstract state, and the compiled step with grad_accum and remat resolved
    (and warmup_steps and weight_decay, when auto, from the optimizer)."""
    tcfg = optimizer_defaults(tcfg)
    place = sharding.placement(mcfg, tcfg.mesh, tcfg.strategy)
    schedule, tx = make_optimizer(tcfg, mcfg)
    if tcfg.grad_accum:
        sharding.check_batch(tcfg.batch_size, tcfg.grad_accum, place.mesh)
        if (tcfg.batch_size // tcfg.grad_accum) % jax.process_count():
            raise sharding.ShardingError(
                f"micro-batch of {tcfg.batch_size // tcfg.grad_accum} sequences does not divide over {jax.process_count()} processes"
            )
    ks = [tcfg.grad_accum] if tcfg.grad_accum else candidate_accums(tcfg.batch_size, place.mesh)
    if not ks:
        n = sharding.data_parallel_size(place.mesh)
        raise sharding.ShardingError(
            f"batch_size={tcfg.batch_size} does not divide over the data axes (data x fsdp = {n} devices) with any "
            f"grad_accum; make batch_size a multiple of {n}"
        )
    abstract, shardings = step_lib.state_shardings(mcfg, tx, place.mesh, place.rules)
    if place.mesh.size > 1:
        sharding.check_params_sharded(shardings.params, tcfg.strategy, shapes=abstract.params)
    limit, source = memory.device_memory(override_gib=tcfg.device_memory_gib)
    budget = (1 - memory.MARGIN) * limit
    batch = batch_shapes(tcfg, seq_len, place)
    compiled: dict[tuple[int, str], tuple[Any, int]] = {}

    def compile_(k: int, remat: str):
        if (k, remat) not in compiled:
            cfg = replace(mcfg, remat_policy=remat)
            fn = step_lib.compile_train_step(cfg, tx, schedule, k, place.mesh, place.rules, shardings)
            program = fn.lower(abstract, batch).compile()
            compiled[(k, remat)] = (program, memory.compiled_bytes(program))
        return compiled[(k, remat)]

    def fits(k: int, remat: str) -> bool:
        return compile_(k, remat)[1] <= budget

    policies = [mcfg.remat_policy] if mcfg.remat_policy != "auto" else list(REMAT_BY_WEIGHT)
    if fits(ks[0], policies[0]):  # the usual case, one compile: no accumulation, no remat needed
        k, remat = ks[0], policies[0]
    else:
        # Start the bisection where the estimate from the shapes says the full-remat step fits.
        start = next((i for i, k in enumerate(ks) if _estimate(tcfg, mcfg, place, seq_len, k, policies[-1]) <= budget), len(ks) - 1)
        k = smallest_fitting(ks, lambda k: fits(k, policies[-1]), start)
        if k is None:
            smallest = compile_(ks[-1], policies[-1])[1]
            raise memory.PreflightError(
                f"training {tcfg.size} does not fit one device: its smallest footprint is {smallest / memory.GiB:.2f} GiB "
                f"per device (grad_accum={ks[-1]}, remat_policy={policies[-1]}) and a device has {limit / memory.GiB:.2f} GiB "
                f"({source}); spread it over more devices (mesh=, strategy=) or lower seq_len= or batch_size="
            )
        remat = next(p for p in policies if fits(k, p))
    program, need = compiled[(k, remat)]
    return Plan(
        replace(tcfg, grad_accum=k), replace(mcfg, remat_policy=remat), seq_len, place, schedule, tx, abstract, shardings,
        program, need, limit, source, [(kk, p, b) for (kk, p), (_, b) in compiled.items()],
        chosen=bool(auto_fields(tcfg) or auto_fields(mcfg)),
    )


def _estimate(tcfg: TrainConfig, mcfg: ModelConfig, place: sharding.Placement, seq_len: int, k: int, remat: str) -> float:
    shape = dict(place.mesh.shape)
    shards = {"dp": 1, "fsdp": shape["fsdp"], "fsdp_tp": shape["fsdp"] * shape["tensor"]}[tcfg.strategy]
    return memory.train_estimate(
        replace(mcfg, remat_policy=remat), rows_per_device=max(1, tcfg.batch_size // k // sharding.data_parallel_size(place.mesh)),
        seq_len=seq_len, param_shards=shards, tensor=shape["tensor"] if tcfg.strategy == "fsdp_tp" else 1, grad_accum=k,
    ).total


def dry_run_report(plan: Plan) -> str:
    """What `--dry-run` prints: the resolved config, the mesh, the compiled step's memory by kind,
    and its FLOPs against the analytic count (the MFU it would reach at the device's peak)."""
    m = plan.train_step.memory_analysis()
    flops = hlo.hlo_cost(plan.train_step.as_text())["flops"] * plan.place.mesh.size
    analytic = costs.flops_per_token(plan.mcfg, plan.seq_len) * plan.tcfg.batch_size * plan.seq_len
    peak = costs.peak_flops(jax.devices()[0])
    gib = lambda b: f"{b / memory.GiB:.2f} GiB"  # noqa: E731
    lines = [
        "resolved config:",
        json.dumps({"model": plan.mcfg.to_dict(), "train": dataclasses.asdict(plan.tcfg)}, indent=2, sort_keys=True),
        f"mesh: {dict(plan.place.mesh.shape)} over {plan.place.mesh.size} {jax.devices()[0].device_kind} device(s), strategy {plan.tcfg.strategy}",
        f"memory per device: state and batch {gib(m.argument_size_in_bytes)}, outputs not aliased to them "
        f"{gib(m.output_size_in_bytes - m.alias_size_in_bytes)}, temporaries {gib(m.temp_size_in_bytes)}, total {gib(plan.bytes)}",
        f"FLOPs per step: compiled {flops / 1e12:.2f} T (all devices), analytic 6N + 12LTD {analytic / 1e12:.2f} T; "
        + (f"at the peak of {peak / 1e12:.0f} TFLOP/s per device the step takes {flops / plan.place.mesh.size / peak * 1e3:.1f} ms, "
           f"MFU {100 * analytic / flops:.1f}%" if peak else f"no peak FLOP/s known for {jax.devices()[0].device_kind}: "
           f"MFU at most {100 * analytic / flops:.1f}% (analytic / compiled)"),
        "compiles tried: " + ", ".join(f"grad_accum={k} {r} {gib(b)}" for k, r, b in plan.tried),
    ]
    return "\n".join(lines)
