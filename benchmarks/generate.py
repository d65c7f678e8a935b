"""Decode throughput: gpt2_jax's KV-cached generation versus HF transformers `generate`.

Both run the same randomly initialized model (ours, exported with `convert.save_hf`) on the same
prompt, on this machine's CPU, in the same process. Each setting is timed `--repeats` times,
alternating the two implementations, and the best time is kept (the machine may be shared). The
figure is new tokens per second of a whole `generate` call (prefill of the short prompt included,
compilation excluded); greedy rows also check that both produced the same tokens.

    python benchmarks/generate.py --size small --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np


def sampling_costs(batch: int = 8, vocab: int = 50257, repeats: int = 10) -> None:
    """Milliseconds per call of each way of choosing tokens from [batch, vocab] logits."""
    import jax.numpy as jnp

    from gpt2_jax.generate import filter_logits

    x = 3.0 * jax.random.normal(jax.random.key(0), (batch, vocab))
    fns = {
        "argmax (greedy)": lambda x: jnp.argmax(x, -1),
        "lax.top_k, k=40": lambda x: jax.lax.top_k(x, 40),
        "full sort": lambda x: jnp.sort(x, -1),
        "nucleus mask, top_p=0.9 (bisection)": lambda x: filter_logits(x, 0, 0.9)[0],
    }
    print(f"| selection over {batch} x {vocab:,} logits | ms |")
    print("|---|---:|")
    for name, fn in fns.items():
        f = jax.jit(fn)
        jax.block_until_ready(f(x))
        t0 = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(f(x))
        print(f"| {name} | {(time.perf_counter() - t0) / repeats * 1e3:.1f} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small", help="model size preset (random weights)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to time")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best kept)")
    p.add_argument("--torch-threads", type=int, nargs="+", default=None,
                   help="torch thread counts to try for HF (best kept; default 1 and all cores: on a busy "
                        "machine OpenMP with every core can be several times slower than one thread)")
    p.add_argument("--modes", nargs="+", default=["greedy", "top-k 40"], choices=["greedy", "top-k 40"],
                   help="decoding modes to time")
    p.add_argument("--sampling-costs", action="store_true",
                   help="only time the token-selection operations (argmax, top-k, sort, nucleus) and exit")
    args = p.parse_args(argv)
    if args.sampling_costs:
        sampling_costs()
        return 0

    import torch
    from transformers import GPT2LMHeadModel

    from gpt2_jax import convert
    from gpt2_jax.config import get_model_config
    from gpt2_jax.generate import Generator, SamplingConfig
    from gpt2_jax.model import init_params

    thread_counts = args.torch_threads or sorted({1, torch.get_num_threads()})
    cfg = get_model_config(args.size)
    params = init_params(cfg, jax.random.key(0))
    with tempfile.TemporaryDirectory() as d:
        convert.save_hf(cfg, params, d)
        hf = GPT2LMHeadModel.from_pretrained(d).eval()
    gen = Generator(cfg, params)
    rng = np.random.RandomState(0)
    N = args.new_tokens
    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"(threads tried: {thread_counts}); {args.size}, prompt {args.prompt_len}, {N} new tokens", flush=True)
    print("| mode | batch | gpt2_jax tok/s | HF generate tok/s | speedup | same tokens |")
    print("|---|---:|---:|---:|---:|---|")
    for mode in args.modes:
        greedy = mode == "greedy"
        sampling = SamplingConfig(max_new_tokens=N, greedy=greedy, top_k=0 if greedy else 40, eot_id=None)
        for B in args.batch_sizes:
            prompt = rng.randint(0, cfg.vocab_size, (B, args.prompt_len))
            ours_out = gen.generate_tokens(prompt.tolist(), sampling, seed=0).tokens  # compiles
            x = torch.tensor(prompt)
            hf_kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=N, min_new_tokens=N, pad_token_id=0,
                         do_sample=not greedy, top_k=40 if not greedy else None)
            with torch.no_grad():
                hf_out = hf.generate(x, **hf_kw)[:, args.prompt_len:].numpy()  # warm-up
            t_ours, t_hf = [], {n: [] for n in thread_counts}
            for r in range(args.repeats):
                t0 = time.perf_counter()
                gen.generate_tokens(prompt.tolist(), sampling, seed=r)
                t_ours.append(time.perf_counter() - t0)
                for n in thread_counts:
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        hf.generate(x, **hf_kw)
                    t_hf[n].append(time.perf_counter() - t0)
            best_threads = min(thread_counts, key=lambda n: min(t_hf[n]))
            ours_tps, hf_tps = B * N / min(t_ours), B * N / min(t_hf[best_threads])
            same = str(bool((ours_out == hf_out).all())) if greedy else "n/a (sampled)"
            print(f"| {mode} | {B} | {ours_tps:.1f} | {hf_tps:.1f} ({best_threads} thr) | {ours_tps / hf_tps:.2f}x "
                  f"| {same} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
