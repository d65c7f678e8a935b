"""Per-device memory of the compiled train step for each GPT-2 size, at 8-way FSDP and on one device.

    python benchmarks/memory.py [--sizes small medium large xl] [--seqs-per-device 1]

Nothing is allocated: the sharded train state is built abstractly (jax.eval_shape) and the train
step is lowered and compiled for 8 fake CPU devices; `memory_analysis()` of the compiled step gives
arguments (params + optimizer state + batch), outputs (aliased to the donated inputs), and
temporaries (activations, gradients). Settings (scan, remat, padded vocab) come from each size's
experiment file; compute dtype bfloat16, as on GPU/TPU. XLA:CPU's buffer assignment stands in for
the accelerator compilers', so treat the figures as estimates.
"""

import argparse
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

from gpt2_jax import optim, sharding, step, train  # noqa: E402
from gpt2_jax.config import replace  # noqa: E402

GiB = 1 << 30


def measure(size: str, n_devices: int, seqs_per_device: int):
    tcfg, mcfg = train.resolve_config(train.load_experiment(train.find_experiment(size)))
    tcfg = train.optimizer_defaults(tcfg)
    mcfg = replace(mcfg, dtype="bfloat16")
    mesh = sharding.make_mesh((1, n_devices, 1), jax.devices()[:n_devices])
    rules = sharding.logical_rules("fsdp", mesh, mcfg)
    sched = optim.lr_schedule(tcfg.lr or optim.PEAK_LR[size], tcfg.warmup_steps, tcfg.steps)
    tx = optim.make_optimizer(sched)
    abstract, shardings = step.state_shardings(mcfg, tx, mesh, rules)
    if n_devices > 1:
        sharding.check_params_sharded(shardings.params, "fsdp", shapes=abstract.params)
    grad_accum = 2  # includes the gradient accumulator; more micro-batches do not add memory
    micro = seqs_per_device * n_devices
    batch = {"tokens": jax.ShapeDtypeStruct((grad_accum * micro, tcfg.seq_len + 1), "int32", sharding=sharding.batch_sharding(mesh))}
    fn = step.compile_train_step(mcfg, tx, sched, grad_accum, mesh, rules, shardings)
    t = time.perf_counter()
    compiled = fn.lower(abstract, batch).compile()
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {
        "size": size, "devices": n_devices, "remat": mcfg.remat_policy,
        "args": m.argument_size_in_bytes / GiB, "temp": m.temp_size_in_bytes / GiB, "total": total / GiB,
        "compile_s": time.perf_counter() - t,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "medium", "large", "xl"], help="sizes to measure")
    parser.add_argument("--seqs-per-device", type=int, default=1, help="sequences of 1024 tokens per device per micro-batch")
    args = parser.parse_args(argv)
    print("| size | remat | devices | state + batch (GiB/device) | temporaries (GiB/device) | total (GiB/device) | fits 16 GB v5e | fits 80 GB H100 |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for size in args.sizes:
        for n in (8, 1):
            r = measure(size, n, args.seqs_per_device)
            fits = lambda cap: "yes" if r["total"] * GiB <= cap * 1e9 * 0.95 else "no"
            print(
                f"| {size} | {r['remat']} | {n} | {r['args']:.2f} | {r['temp']:.2f} | {r['total']:.2f} | "
                f"{fits(16)} | {fits(80)} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
