"""Train-step throughput: gpt2_jax vs Hugging Face GPT2LMHeadModel + torch.optim.AdamW, same run.

    python benchmarks/train_step.py [--configs tiny mini small] [--rounds 3]

Both sides train the same shape (vocab 50,257, dropout 0, float32) on the same random batch with
AdamW (b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1) and global-norm clipping at 1.0. After a
warm-up step each (JAX compiles there), the two are timed in alternating rounds so that load from
other processes falls on both alike. Prints tokens/s and the ratio ours / HF.
"""

import argparse
import sys
import time

import numpy as np

CONFIGS = {  # name: (n_layer, n_embd, n_head, seq_len, batch)
    "tiny": (4, 256, 4, 128, 8),
    "mini": (6, 384, 6, 256, 4),
    "small": (12, 768, 12, 256, 4),
}


def ours(n_layer, n_embd, n_head, seq, batch, tokens):
    import jax

    from gpt2_jax import optim, sharding, step
    from gpt2_jax.config import ModelConfig

    cfg = ModelConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_ctx=seq, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    rules = sharding.logical_rules("dp", mesh, cfg)
    sched = optim.lr_schedule(3e-4, 0, 1000)
    tx = optim.make_optimizer(sched)
    state, sh = step.init_train_state_sharded(cfg, tx, 0, mesh, rules)
    fn = step.compile_train_step(cfg, tx, sched, 1, mesh, rules, sh)
    b = sharding.shard_batch({"tokens": tokens}, mesh)
    box = {"state": state}

    def run():
        box["state"], m = fn(box["state"], b)
        jax.block_until_ready(m["loss"])

    return run


def hf(n_layer, n_embd, n_head, seq, batch, tokens):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    x = torch.as_tensor(tokens[:, :-1], dtype=torch.long)
    y = torch.as_tensor(tokens[:, 1:], dtype=torch.long)

    def run():
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="shapes to compare")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (2 steps each side per round)")
    args = parser.parse_args(argv)
    print("| config | layers x width | batch x seq | gpt2_jax tok/s | HF torch tok/s | ratio |")
    print("|---|---|---|---:|---:|---:|")
    for name in args.configs:
        L, D, N, T, B = CONFIGS[name]
        tokens = np.random.default_rng(0).integers(0, 50257, (B, T + 1)).astype(np.int32)
        runners = {"ours": ours(L, D, N, T, B, tokens), "hf": hf(L, D, N, T, B, tokens)}
        for run in runners.values():
            run()  # warm-up (JAX compiles here)
        elapsed = {k: 0.0 for k in runners}
        for _ in range(args.rounds):
            for k, run in runners.items():
                t = time.perf_counter()
                run()
                run()
                elapsed[k] += time.perf_counter() - t
        tps = {k: 2 * args.rounds * B * T / v for k, v in elapsed.items()}
        print(f"| {name} | {L} x {D} | {B} x {T} | {tps['ours']:,.0f} | {tps['hf']:,.0f} | {tps['ours'] / tps['hf']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
