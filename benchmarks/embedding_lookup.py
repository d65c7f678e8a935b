"""Three ways to look up token embeddings from a sharded, tied table, compared on the compiled program.

    python benchmarks/embedding_lookup.py [--size small] [--tokens 8 1024]

The program is the part of a train step that touches the table: lookup, a stand-in for the blocks
(tanh), the tied LM head, log-sum-exp, and the gradient with respect to the table, compiled for 8
simulated CPU devices on four meshes (nothing is allocated). Variants:
  plain   `jnp.take` from the table in its FSDP layout (what the model did before);
  layout  the table first constrained to the head's layout (rows over `tensor`, embed gathered) in
          the compute dtype, then `jnp.take` (what the model does: see GPT2.__call__);
  onehot  a one-hot [B, T, V] matrix multiplied by the table in that layout.
Per device: FLOPs (while loops counted by trip count, `hlo.hlo_cost`), collective bytes (ring
convention, `hlo.hlo_collectives`), temporaries (`memory_analysis()`), and how many times XLA
logged an involuntary full rematerialization.
"""

from __future__ import annotations

import argparse
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from gpt2_jax import hlo, sharding  # noqa: E402
from gpt2_jax.config import get_model_config  # noqa: E402

MESHES = [((1, 8, 1), "fsdp"), ((2, 4, 1), "fsdp"), ((1, 4, 2), "fsdp_tp"), ((2, 2, 2), "fsdp_tp")]


def table_grad(variant: str, V: int):
    def embed(wte_VD, tokens_BT):
        if variant == "plain":
            return jnp.take(wte_VD, tokens_BT, axis=0).astype(jnp.bfloat16), wte_VD.astype(jnp.bfloat16)
        w_VD = nn.with_logical_constraint(wte_VD.astype(jnp.bfloat16), ("act_vocab", None))
        if variant == "layout":
            return jnp.take(w_VD, tokens_BT, axis=0), w_VD
        onehot_BTV = nn.with_logical_constraint(jax.nn.one_hot(tokens_BT, V, dtype=jnp.bfloat16), ("act_batch", None, "act_vocab"))
        return jnp.einsum("BTV,VD->BTD", onehot_BTV, w_VD), w_VD

    def loss(wte_VD, tokens_BT):
        x_BTD, w_VD = embed(wte_VD, tokens_BT)
        x_BTD = jnp.tanh(nn.with_logical_constraint(x_BTD, ("act_batch", None, None)))
        logits_BTV = jnp.einsum("BTD,VD->BTV", x_BTD, w_VD, preferred_element_type=jnp.float32)
        logits_BTV = nn.with_logical_constraint(logits_BTV, ("act_batch", None, "act_vocab"))
        return jax.nn.logsumexp(logits_BTV, -1).mean()

    return jax.grad(loss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--size", default="small", help="model size whose table is used (default small)")
    parser.add_argument("--tokens", type=int, nargs=2, default=(8, 1024), metavar=("B", "T"), help="batch rows and length (default 8 1024)")
    args = parser.parse_args(argv)
    cfg = get_model_config(args.size, pad_vocab_multiple=128)
    V, D = cfg.padded_vocab_size, cfg.n_embd
    B, T = args.tokens
    print(f"{args.size}: table {V} x {D} float32, {B} x {T} tokens, bfloat16 compute, 8 simulated CPU devices")
    print("| mesh | strategy | variant | GFLOP/device | all-gather MiB | all-reduce MiB | other collectives MiB | temp MiB | involuntary remat |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for shape, strategy in MESHES:
        mesh = sharding.make_mesh(shape)
        rules = sharding.logical_rules(strategy, mesh, cfg)
        spec = sharding.mesh_spec(P("vocab", "embed"), (V, D), mesh, rules)
        wte = jax.ShapeDtypeStruct((V, D), jnp.float32, sharding=NamedSharding(mesh, spec))
        tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding.batch_sharding(mesh))
        for variant in ("plain", "layout", "onehot"):
            fn = sharding.sharded_jit(table_grad(variant, V), mesh, rules)
            compiled, log = hlo.compile_logged(lambda: fn.lower(wte, tokens))
            text = compiled.as_text()
            flops = hlo.hlo_cost(text)["flops"]
            moved = hlo.collective_bytes(hlo.hlo_collectives(text))
            other = sum(v for k, v in moved.items() if k not in ("all-gather", "all-reduce"))
            temp = compiled.memory_analysis().temp_size_in_bytes
            print(
                f"| {','.join(map(str, shape))} | {strategy} | {variant} | {flops / 1e9:.1f} | {moved['all-gather'] / 2**20:.1f} | "
                f"{moved['all-reduce'] / 2**20:.1f} | {other / 2**20:.1f} | {temp / 2**20:.1f} | {log.count(hlo.INVOLUNTARY_REMAT)} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
