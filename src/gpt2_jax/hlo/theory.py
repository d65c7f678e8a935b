"""What the collectives of one train step should move, from the model's shapes and the strategy.

The theory that `gpt2_jax.hlo`'s collective counts of a compiled step are checked against (in the
tests and `benchmarks/compiled_step.py`). Mesh shapes are abstract here: nothing is placed on a
device.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh, PartitionSpec

from gpt2_jax import sharding
from gpt2_jax.config import ModelConfig
from gpt2_jax.hlo import COLLECTIVE_KINDS
from gpt2_jax.model import abstract_params


@dataclasses.dataclass(frozen=True)
class CollectiveTheory:
    """Expected bytes sent per device by one train step (one micro-batch), ring convention.

    param_gathers: every parameter sharded over `fsdp` all-gathered over the fsdp group for the
      forward and again for the backward (ZeRO-3/FSDP), 2 (f-1)/f of its bytes per tensor rank.
    grad_reduce_scatters: their gradients reduce-scattered over the fsdp group, (f-1)/f.
    grad_all_reduces: gradients of parameters not sharded over the batch axes (LayerNorms, biases
      along a replicated axis) all-reduced over data x fsdp, plus fsdp shards' all-reduce over
      `data` when data > 1; 2 (n-1)/n each.
    activation_all_reduces: Megatron's tensor-parallel all-reduces of B_local x T x D activations
      over the tensor group, 2 (t-1)/t each: per layer one after the attention projection and one
      after the MLP in the forward, one each for the input gradients of c_attn and c_fc in the
      backward; the vocabulary-parallel embedding lookup (forward) and LM head input gradient
      (backward); with full remat the attention output's all-reduce again in the recomputed
      forward (the block output's is never needed by the backward, so it is not recomputed). A
      block part whose width the tensor axis does not divide (25 heads over 2) is replicated:
      no all-reduce, the work done on every tensor rank. The softmax's B_local x T statistics
      over vocabulary shards (a few kB) are left out.
    """

    param_gathers: float
    grad_reduce_scatters: float
    grad_all_reduces: float
    activation_all_reduces: float

    def by_kind(self) -> dict[str, float]:
        out = {k: 0.0 for k in COLLECTIVE_KINDS}
        out["all-gather"] = self.param_gathers
        out["reduce-scatter"] = self.grad_reduce_scatters
        out["all-reduce"] = self.grad_all_reduces + self.activation_all_reduces
        return out

    @property
    def total(self) -> float:
        return sum(self.by_kind().values())


def collective_theory(
    config: ModelConfig,
    strategy: str,
    mesh_shape: tuple[int, int, int],
    batch_size: int,
    seq_len: int,
    *,
    param_bytes: float | None = None,
    grad_bytes: float | None = None,
    act_bytes: float | None = None,
) -> CollectiveTheory:
    """Bytes per device of one train step's collectives for `config` under `strategy` on a
    (data, fsdp, tensor) mesh of `mesh_shape`, `batch_size` sequences of `seq_len` tokens, one
    micro-batch; see `CollectiveTheory` for the terms.

    Element sizes default to the compute dtype's, which is what the SPMD partitioner moves for the
    blocks' weights, gradients and activations (it gathers a weight after its cast to the compute
    dtype); pass 4 to describe a backend that moves float32 (XLA:CPU widens bf16 collectives).
    Only remat_policy none and full are modelled.
    """
    if config.remat_policy not in ("none", "full"):
        raise ValueError(f"collective_theory models remat_policy none and full, not {config.remat_policy!r}")
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[config.dtype]
    param_bytes = itemsize if param_bytes is None else param_bytes
    grad_bytes = itemsize if grad_bytes is None else grad_bytes
    act_bytes = itemsize if act_bytes is None else act_bytes
    mesh = AbstractMesh(tuple(mesh_shape), sharding.MESH_AXES)
    d, f, t = (mesh.shape[a] for a in sharding.MESH_AXES)
    rules = sharding.logical_rules(strategy, mesh, config)
    boxed = abstract_params(config)
    specs = _param_specs(boxed)
    gathers = scatters = grad_reduces = 0.0
    for spec, shape in specs:
        mspec = sharding.mesh_spec(spec, shape, mesh, rules)
        axes = [a for entry in mspec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
        elements = math.prod(shape)
        tensor_local = elements / math.prod(mesh.shape[a] for a in axes if a == "tensor")
        if "fsdp" in axes:
            gathers += 2 * (f - 1) / f * tensor_local * param_bytes
            scatters += (f - 1) / f * tensor_local * grad_bytes
            if d > 1:
                grad_reduces += 2 * (d - 1) / d * tensor_local / f * grad_bytes
        else:
            n = d * f
            grad_reduces += 2 * (n - 1) / n * tensor_local * grad_bytes
    acts = 0.0
    if t > 1:
        table = dict(rules)
        attn, mlp, vocab = (table[k] == "tensor" for k in ("act_heads", "act_mlp", "act_vocab"))
        per_layer = 2 * attn + 2 * mlp + (attn if config.remat_policy == "full" else 0)
        count = config.n_layer * per_layer + 2 * vocab
        b_local = batch_size / (d * f)
        acts = count * 2 * (t - 1) / t * b_local * seq_len * config.n_embd * act_bytes
    return CollectiveTheory(gathers, scatters, grad_reduces, acts)


def _param_specs(boxed_params) -> list[tuple[tuple, tuple[int, ...]]]:
    """(logical axis names, shape) of every leaf of a params tree that carries Flax's logical boxes."""
    specs = jax.tree.leaves(nn.get_partition_spec(boxed_params), is_leaf=lambda x: isinstance(x, PartitionSpec))
    shapes = jax.tree.leaves(nn.meta.unbox(boxed_params))
    return [(tuple(s), tuple(x.shape)) for s, x in zip(specs, shapes)]
