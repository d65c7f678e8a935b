"""What a train step costs: analytic FLOPs per token and devices' peak FLOP/s, for MFU.

The training loop reads these every step. What the compiled program really does (its HLO's FLOPs,
its collectives and what they should move in theory) is `gpt2_jax.hlo` and `gpt2_jax.hlo.theory`,
which only the dry run, the benchmarks and the tests need.
"""

from __future__ import annotations

from gpt2_jax.config import ModelConfig

# Peak dense bfloat16 FLOP/s per device, keyed by a substring of `jax.devices()[0].device_kind`;
# the first match wins, so the more specific names come first. Sources: NVIDIA's H100/H200/A100
# datasheets, Google Cloud's TPU system-architecture pages.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v4", 275e12),
)


def peak_flops(device) -> float | None:
    """Peak bf16 FLOP/s of `device`, or None (CPU and unknown devices: no MFU is shown)."""
    if device.platform == "cpu":
        return None
    for key, flops in PEAK_FLOPS:
        if key.lower() in device.device_kind.lower():
            return flops
    return None


def flops_per_token(mcfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12*L*H*Q*T (PaLM paper, appendix B).

    N counts every parameter except the position table (wte is also the LM head matmul, wpe is a
    lookup); 6N is the forward+backward matmuls, 12*L*H*Q*T the attention scores and mixing, with L
    layers, H heads of width Q and T the sequence length.
    """
    n = mcfg.n_params - (mcfg.padded_vocab_size - mcfg.vocab_size) * mcfg.n_embd - mcfg.n_ctx * mcfg.n_embd
    return 6.0 * n + 12.0 * mcfg.n_layer * mcfg.n_head * mcfg.head_dim * seq_len


def newton_schulz_flops(mcfg: ModelConfig, ns_steps: int = 5) -> float:
    """Matmul FLOPs of Muon's Newton-Schulz iterations in one optimizer step, on one copy of the
    hidden matrices (gpt2_jax.optim.HIDDEN_MATRICES: per layer q, k, v and the attention's c_proj,
    D x D, and the MLP's c_fc and c_proj, D x 4D).

    For X of m x n with m <= n (the iteration runs on the wider orientation) each step computes
    A = X X^T (2m^2 n), A A (2m^3) and (bA + cA^2) X (2m^2 n): 4m^2 n + 2m^3; the elementwise work
    (O(mn)) is left out.
    """
    def per_step(rows: int, cols: int) -> float:
        m, n = min(rows, cols), max(rows, cols)
        return 4.0 * m * m * n + 2.0 * m ** 3

    d, f = mcfg.n_embd, mcfg.n_inner
    per_layer = 4 * per_step(d, d) + per_step(d, f) + per_step(f, d)
    return ns_steps * mcfg.n_layer * per_layer
