"""The TPU program, checked without a TPU: `small` at T=1024 in bfloat16 with attention=splash,
exported for TPU (`jax.export`, platforms=("tpu",)) on an abstract mesh of 8 chips by the functions
a run uses, and read back: the splash kernel in the train (forward and backward) and eval steps,
decoding on the path `attention.select` names, the shardings the strategy's rules give, bfloat16
matmuls over float32 state, the donated state aliased to the outputs. The same programs for CUDA
with attention=xla (cuDNN's kernel cannot be exported without a GPU). With libtpu installed, the
train step is also compiled by XLA:TPU for a slice of two hosts."""

from __future__ import annotations

import importlib.util
import re

import jax
import pytest

from gpt2_jax import attention, sharding
from gpt2_jax.config import replace
from gpt2_jax.hlo import target
from gpt2_jax.model import abstract_params
from gpt2_jax.train.config import find_experiment, load_experiment, resolve_config
from gpt2_jax.train.plan import make_optimizer

SEQ, BATCH, ACCUM = 1024, 64, 4
V5E_8 = target.tpu_slice("v5e-8")


def small_config(**overrides):
    """The `small` experiment as a user runs it on a TPU, with the given overrides."""
    settings = load_experiment(find_experiment("small"))
    settings.update({"seq_len": SEQ, "batch_size": BATCH, "grad_accum": ACCUM, "remat_policy": "dots",
                     "compute_dtype": "bfloat16", "attention": "splash", **overrides})
    tcfg, mcfg = resolve_config(settings)
    mcfg, _ = target.resolve_for(tcfg, mcfg, V5E_8, SEQ)
    return tcfg, mcfg


@pytest.fixture(scope="module", params=[("fsdp", "1,8,1"), ("fsdp_tp", "1,4,2")], ids=["fsdp-1x8x1", "fsdp_tp-1x4x2"])
def train(request):
    strategy, mesh = request.param
    tcfg, mcfg = small_config(strategy=strategy, mesh=mesh)
    place = target.placement(mcfg, V5E_8.abstract_mesh(tcfg.mesh), strategy)
    fn, args = target.train_program(mcfg, place, *make_optimizer(tcfg, mcfg)[::-1], BATCH, SEQ, ACCUM)
    exported = fn.export(*args, platforms=("tpu",))
    return mcfg, place, args, exported, exported.mlir_module()


def test_the_train_step_runs_the_splash_kernel_forward_and_backward(train):
    mcfg, _, _, _, text = train
    assert attention.select(mcfg, SEQ, decode=False, dropout=False) == "splash"
    forward, backward = target.splash_kernels(text)
    assert forward and {k.split("_no")[0] for k in backward} == {"splash_mha_dq", "splash_mha_dkv"}, (forward, backward)


def _state_leaves(exported, state) -> dict[str, tuple]:
    """{state leaf name: (its aval, input PartitionSpec, output PartitionSpec)} of an exported train step."""
    mesh = exported._in_named_shardings[0].mesh
    leaves = jax.tree_util.tree_leaves_with_path(state)
    ins, outs = exported.in_shardings_jax(mesh), exported.out_shardings_jax(mesh)
    return {jax.tree_util.keystr(p): (aval, target.padded(i.spec, aval.ndim), target.padded(o.spec, aval.ndim))
            for (p, _), aval, i, o in zip(leaves, exported.in_avals, ins, outs)}


def test_the_train_step_keeps_the_strategys_shardings(train):
    mcfg, place, (state, _), exported, _ = train
    want = sharding.param_shardings(abstract_params(mcfg), place.mesh, sharding.logical_rules(place.strategy, place.mesh, mcfg))
    got = _state_leaves(exported, state)
    for path, sh in jax.tree_util.tree_leaves_with_path(want):
        name = jax.tree_util.keystr(path)
        aval, spec_in, spec_out = got[".params" + name]
        assert spec_in == spec_out == target.padded(sh.spec, aval.ndim), name
        moments = [v for n, v in got.items() if n.startswith(".opt_state") and n.endswith(name)]
        assert len(moments) == 2 and all(m[1:] == (spec_in, spec_in) for m in moments), (name, moments)  # AdamW's mu, nu
    # What a TPU run depends on, spelled out: FSDP splits the matrices over `fsdp`, fsdp_tp heads,
    # MLP width and vocabulary over `tensor` too.
    tp = "tensor" if place.strategy == "fsdp_tp" else None
    assert got[".params['h']['mlp']['c_fc']['kernel']"][1] == (None, "fsdp", tp)
    assert got[".params['h']['attn']['c_attn']['kernel']"][1] == (None, "fsdp", None, tp, None)
    assert got[".params['wte']"][1] == (tp, "fsdp")
    batch_spec = exported.in_shardings_jax(place.mesh)[len(got)].spec
    assert target.padded(batch_spec, 2) == (sharding.BATCH_AXES, None)


def test_the_train_step_computes_in_bfloat16_over_float32_state(train):
    mcfg, _, (state, _), exported, text = train
    floats = {n: v[0].dtype for n, v in _state_leaves(exported, state).items() if n.startswith(".params") or n.endswith("mu") or ".mu" in n or ".nu" in n}
    assert len(floats) == 3 * len(jax.tree.leaves(state.params)) and set(map(str, floats.values())) == {"float32"}
    dots = target.weight_dot_dtypes(text, mcfg)
    assert set(dots) >= {"['wte']", "['h']['attn']['c_attn']['kernel']", "['h']['mlp']['c_fc']['kernel']"}, dots
    assert all(kinds == {"bf16"} for kinds in dots.values()), dots


def test_the_donated_state_is_aliased_to_the_new_state(train):
    _, _, (state, _), _, text = train
    names = [n for n, _, _ in target.main_arguments(text) if n.startswith("state")]
    assert len(names) == len(jax.tree.leaves(state))
    assert target.donated_unaliased(text, "state") == []
    assert target.donated_unaliased(text, "batch") == ["batch['tokens']"]  # not donated: the check can tell


def test_the_eval_step_runs_the_splash_kernel_forward_only():
    tcfg, mcfg = small_config()
    place = target.placement(mcfg, V5E_8.abstract_mesh(tcfg.mesh), tcfg.strategy)
    fn, args = target.eval_program(mcfg, place, 16, SEQ)
    forward, backward = target.splash_kernels(fn.export(*args, platforms=("tpu",)).mlir_module())
    assert forward and not backward


def test_generation_decodes_on_the_path_attention_select_names():
    tcfg, mcfg = small_config()
    place = target.placement(mcfg, V5E_8.abstract_mesh(tcfg.mesh), tcfg.strategy)
    prompt = 128  # a multiple of 128: splash could take the prefill if select allowed it
    text = target.export_generate(mcfg, place, 1, prompt, 32, ("tpu",)).mlir_module()
    for impl in {attention.select(mcfg, prompt, decode=True, dropout=False), attention.select(mcfg, 1, decode=True, dropout=False)}:
        assert (impl == "splash") == bool(target.splash_kernels(text)[0]), impl
    assert attention.select(mcfg, prompt, decode=True, dropout=False) == "xla"
    # Decoded in chunks (a training sample on a pod): the same path, the carry (cache included) donated.
    start, chunk = target.export_generate(mcfg, place, 1, prompt, 32, ("tpu",), chunked=True)
    assert not target.splash_kernels(start.mlir_module())[0] and not target.kernels(chunk.mlir_module())
    carry_leaves = len(jax.tree.leaves(chunk.in_avals)) - len(jax.tree.leaves(target._abstract_params(mcfg, place))) - 5
    assert chunk.mlir_module().count("jax.buffer_donor") == carry_leaves > 0


def test_the_gpu_program_exports_with_xla_attention():
    """What can be checked of the GPU path without a GPU: XLA attention, the shardings, bfloat16,
    the donation (cuDNN's kernel cannot be exported: jax refuses, "cuDNN is not detected")."""
    tcfg, mcfg = small_config(attention="xla")
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1, 8, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, abstract_device=gpu)
    mcfg = replace(mcfg, attention="xla")
    fn, (state, batch) = target.train_program(mcfg, target.placement(mcfg, mesh, "fsdp"), *make_optimizer(tcfg, mcfg)[::-1], BATCH, SEQ, ACCUM)
    exported = fn.export(state, batch, platforms=("cuda",))
    text = exported.mlir_module()
    assert exported.platforms == ("cuda",) and not target.kernels(text) and "custom_call @cudnn" not in text
    dots = target.weight_dot_dtypes(text, mcfg)
    # The blocks' matmuls are bfloat16. The LM head's backward is not: for CUDA, jax lowers the
    # float32 logits' cotangent times the bfloat16 wte/activations as a float32 matmul (for TPU, a
    # mixed one), so on a GPU that part runs in float32.
    assert all(kinds == {"bf16"} for name, kinds in dots.items() if name.startswith("['h']")) and len(dots) == 5, dots
    assert dots["['wte']"] == {"bf16", "f32"}, dots
    assert target.donated_unaliased(text, "state") == []
    assert _state_leaves(exported, state)[".params['wte']"][1] == (None, "fsdp")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (jax's tpu extra) compiles for TPU without one")
def test_xla_tpu_compiles_the_train_step_for_a_slice_of_two_hosts():
    tcfg, mcfg = small_config()
    mesh = V5E_8.compile_mesh(tcfg.mesh)
    assert len({d.process_index for d in mesh.devices.flat}) == 2
    place = target.placement(mcfg, mesh, tcfg.strategy)
    fn, args = target.train_program(mcfg, place, *make_optimizer(tcfg, mcfg)[::-1], BATCH, SEQ, ACCUM)
    lowered = fn.lower(*args)
    assert target.splash_kernels(lowered.as_text())[1]
    m = lowered.compile().memory_analysis()
    assert m.alias_size_in_bytes > 0.9 * m.argument_size_in_bytes  # the state (nearly all of the arguments) is donated
    assert m.argument_size_in_bytes + m.temp_size_in_bytes < V5E_8.generation.hbm_gib * 2**30


def test_dry_run_for_a_tpu_prints_the_exported_programs(capsys):
    from gpt2_jax.train.cli import main

    assert main(["small", "--dry-run", "--tpu", "v5e-8", "mesh=1,4,2", "strategy=fsdp_tp"]) == 0
    out = capsys.readouterr().out
    assert "attention: splash (auto on TPU v5 lite, bfloat16); decoding: xla" in out
    assert "backward splash_mha_dkv_no_residuals x1, splash_mha_dq_no_residuals x1" in out
    assert "donated state aliased: 52 of 52 arrays" in out
    assert re.search(r"\['h'\]\['mlp'\]\['c_fc'\]\['kernel'\] +\[12, 768, 3072\] +float32 +\[-,fsdp,tensor\]", out), out
    assert "FLOPs per step (analytic 6N + 12LHQT, costs.flops_per_token): 448.4 TFLOP" in out
    if importlib.util.find_spec("libtpu") is None:
        assert "XLA:TPU's own figures need libtpu" in out
    for argv, error in [(["small", "--tpu", "v5e-8"], "give it with --dry-run"), (["small", "--dry-run", "--tpu", "v9-8"], "unknown TPU 'v9-8'"),
                        (["small", "--dry-run", "--tpu", "v4-6"], "v4-N counts TensorCores")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert error in err and len(err.strip().splitlines()) == 1, err
