"""The compiled train step against theory: FLOPs, collective bytes and peak memory per device.

    python benchmarks/compiled_step.py [--sizes small medium large xl] [--strategies fsdp fsdp_tp]
                                       [--remat none full] [--optimizers adamw muon]

For each size, strategy and remat policy the train step is lowered and compiled for 8 simulated
CPU devices (nothing is allocated): mesh 1,8,1 for fsdp and 1,4,2 for fsdp_tp, each size's
experiment settings (scanned layers, vocabulary padded to 50,304) with bfloat16 compute, one
1,024-token sequence per device (8 per step), one micro-batch. From the compiled program:

- FLOPs: XLA's `cost_analysis()` (per device, a while loop's body counted once) and the optimized
  HLO walked by `gpt2_jax.hlo.hlo_cost` (XLA's counting rules, loop bodies x trip count), both
  x 8 devices, against `costs.flops_per_token(cfg, T) x tokens`.
- Collectives: bytes sent per device per step of each kind (`hlo.hlo_collectives`, ring
  convention) against `hlo_theory.collective_theory`, raw and with XLA:CPU's all-reduce +
  dynamic-slice pairs counted as the reduce-scatters GPU/TPU compilers make of them.
- Peak memory per device: arguments + outputs - aliased + temporaries (`memory_analysis()`).

Prints two markdown tables; with `--optimizers adamw muon` a third: what optimizer=muon adds to the
same step (its Newton-Schulz FLOPs against `costs.newton_schulz_flops`, and the collectives it
adds or removes by kind), beside the analytic share of a 524,288-token step.
"""

import argparse
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

from gpt2_jax import costs, hlo, optim, sharding, step, train  # noqa: E402
from gpt2_jax.hlo import theory as hlo_theory  # noqa: E402
from gpt2_jax.config import OPTIMIZERS, replace  # noqa: E402
from gpt2_jax.train.plan import make_optimizer as train_optimizer  # noqa: E402

MESHES = {"fsdp": (1, 8, 1), "fsdp_tp": (1, 4, 2)}
GiB, MiB = 1 << 30, 1 << 20


def measure(size: str, strategy: str, remat: str, optimizer: str = "adamw") -> dict:
    tcfg, mcfg = train.resolve_config({**train.load_experiment(train.find_experiment(size)), "optimizer": optimizer})
    tcfg = train.optimizer_defaults(tcfg)
    mcfg = replace(mcfg, dtype="bfloat16", remat_policy=remat)
    mesh_shape = MESHES[strategy]
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.logical_rules(strategy, mesh, mcfg)
    if optimizer == "adamw":
        sched = optim.lr_schedule(tcfg.lr or optim.PEAK_LR[size], tcfg.warmup_steps, tcfg.steps)
        tx = optim.make_optimizer(sched)
    else:  # the trainer's own Muon (Newton-Schulz in the compute dtype, bfloat16 here)
        sched, tx = train_optimizer(tcfg, mcfg)
    abstract, shardings = step.state_shardings(mcfg, tx, mesh, rules)
    n_dev = len(mesh.devices.flat)
    batch_size, seq_len = n_dev, tcfg.seq_len  # one sequence per device, one micro-batch
    batch = {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len + 1), "int32", sharding=sharding.batch_sharding(mesh))}
    fn = step.compile_train_step(mcfg, tx, sched, 1, mesh, rules, shardings)
    t = time.perf_counter()
    compiled = fn.lower(abstract, batch).compile()
    compile_s = time.perf_counter() - t

    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    text = compiled.as_text()
    walked = hlo.hlo_cost(text)
    collectives = hlo.hlo_collectives(text)
    # XLA:CPU's float-normalization pass widens every bf16 collective to f32, so on CPU the theory
    # is taken in float32; elsewhere in the compute dtype the partitioner emits.
    elem = 4 if jax.default_backend() == "cpu" else None
    theory = hlo_theory.collective_theory(
        mcfg, strategy, mesh_shape, batch_size, seq_len, param_bytes=elem, grad_bytes=elem, act_bytes=elem
    )
    m = compiled.memory_analysis()
    return {
        "size": size, "strategy": strategy, "mesh": mesh_shape, "remat": remat, "devices": n_dev, "optimizer": optimizer,
        "ns_flops": costs.newton_schulz_flops(mcfg, tcfg.muon_ns_steps),
        "step_524k": costs.flops_per_token(mcfg, seq_len) * 524_288,
        "analytic": costs.flops_per_token(mcfg, seq_len) * batch_size * seq_len,
        "xla_flops": xla["flops"] * n_dev,
        "hlo_flops": walked["flops"] * n_dev,
        "dot_flops": walked["dot_flops"] * n_dev,
        "raw": hlo.collective_bytes(collectives),
        "as_rs": hlo.collective_bytes(collectives, slices_as_reduce_scatter=True),
        "dtypes": sorted({d for c in collectives for d in c.dtypes}),
        "theory": theory.by_kind(),
        "peak": m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes,
        "compile_s": compile_s,
    }


def flops_row(r: dict) -> str:
    a = r["analytic"]
    return (
        f"| {r['size']} | {r['strategy']} {','.join(map(str, r['mesh']))} | {r['remat']}{_muon(r)} | {a / 1e12:.2f} | "
        f"{r['xla_flops'] / a:.3f} | **{r['hlo_flops'] / a:.3f}** | {r['dot_flops'] / a:.3f} | {r['compile_s']:.0f} |"
    )


def comm_row(r: dict) -> str:
    raw, rs, th = r["raw"], r["as_rs"], r["theory"]
    total, theory = sum(raw.values()), sum(th.values())
    pair = lambda k: f"{raw[k] / MiB:,.1f} / {th[k] / MiB:,.1f}"
    return (
        f"| {r['size']} | {r['strategy']} {','.join(map(str, r['mesh']))} | {r['remat']}{_muon(r)} | {pair('all-gather')} | "
        f"{pair('reduce-scatter')} | {pair('all-reduce')} | {raw['collective-permute'] / MiB:,.1f} | "
        f"{raw['all-to-all'] / MiB:,.1f} | {total / MiB:,.1f} / {theory / MiB:,.1f} | {total / theory:.2f} | "
        f"{rs['reduce-scatter'] / MiB:,.1f} | {rs['all-reduce'] / MiB:,.1f} | **{sum(rs.values()) / theory:.2f}** | "
        f"{r['peak'] / GiB:.2f} |"
    )


def _muon(r: dict) -> str:
    return ", muon" if r["optimizer"] == "muon" else ""


def muon_row(muon: dict, adamw: dict) -> str:
    """What optimizer=muon adds to the same step: Newton-Schulz FLOPs, measured (HLO walk, muon
    minus adamw, x 8 devices) and analytic (one copy x 8 devices: every device iterates every
    matrix), their share of a 524,288-token step, and the collectives' bytes per device by kind."""
    n = muon["devices"]
    extra = muon["hlo_flops"] - adamw["hlo_flops"]
    ns = muon["ns_flops"]
    kinds = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
    comm = ", ".join(f"{k} {(muon['as_rs'][k] - adamw['as_rs'][k]) / MiB:+,.1f}" for k in kinds if muon["as_rs"][k] != adamw["as_rs"][k])
    return (
        f"| {muon['size']} | {muon['strategy']} {','.join(map(str, muon['mesh']))} | {muon['remat']} | {ns / 1e12:.3f} | "
        f"{extra / 1e12:.2f} / {n * ns / 1e12:.2f} | {100 * ns / muon['step_524k']:.2f}% | {100 * n * ns / muon['step_524k']:.1f}% | "
        f"{comm or 'none'} | {sum(muon['as_rs'].values()) / MiB:,.1f} / {sum(adamw['as_rs'].values()) / MiB:,.1f} |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "medium", "large", "xl"], help="GPT-2 sizes")
    parser.add_argument("--strategies", nargs="+", default=list(MESHES), choices=list(MESHES), help="sharding strategies")
    parser.add_argument("--remat", nargs="+", default=["none", "full"], choices=["none", "full"], help="remat policies")
    parser.add_argument("--optimizers", nargs="+", default=["adamw"], choices=list(OPTIMIZERS), help="optimizers")
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes:
        for strategy in args.strategies:
            for remat in args.remat:
                for optimizer in args.optimizers:
                    rows.append(measure(size, strategy, remat, optimizer))
                    print(f"measured {size} {strategy} remat={remat} {optimizer} in {rows[-1]['compile_s']:.0f} s", file=sys.stderr, flush=True)
    print("FLOPs per step, compiled (x 8 devices) / analytic 6N + 12·L·T·D per token:\n")
    print("| size | strategy, mesh | remat | analytic TFLOP/step | XLA cost_analysis | HLO walk, loops x trip count | matmuls only | compile s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(flops_row(r))
    dtypes = sorted({d for r in rows for d in r["dtypes"]})
    print(f"\nCollectives, MiB sent per device per step (ring convention; element types moved: {', '.join(dtypes)}):\n")
    print(
        "| size | strategy, mesh | remat | all-gather: CPU / theory | reduce-scatter: CPU / theory "
        "| all-reduce: CPU / theory | collective-permute | all-to-all | total: CPU / theory | CPU / theory "
        "| AR+DS as RS: reduce-scatter | all-reduce | / theory | peak GiB/device |"
    )
    print("|---|---|---|" + "---:|" * 11)
    for r in rows:
        print(comm_row(r))
    pairs = [(m, a) for m in rows for a in rows if m["optimizer"] == "muon" and a["optimizer"] == "adamw"
             and (m["size"], m["strategy"], m["remat"]) == (a["size"], a["strategy"], a["remat"])]
    if pairs:
        print("\nWhat optimizer=muon adds to the step (Newton-Schulz TFLOP: one copy of the hidden matrices, analytic; "
              "extra FLOPs: HLO walk muon - adamw x 8 devices / analytic x 8; collectives: MiB per device, AR+DS as RS):\n")
        print("| size | strategy, mesh | remat | NS TFLOP, one copy | extra TFLOP: HLO / analytic x 8 | NS share of a "
              "524,288-token step | x 8 devices (each device's share) | collectives added, MiB | total: muon / adamw |")
        print("|---|---|---|---:|---:|---:|---:|---|---:|")
        for m, a in pairs:
            print(muon_row(m, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
