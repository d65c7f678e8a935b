"""tiny (4 layers x 256, 4 heads, ~16M parameters) on Tiny Shakespeare: the CPU demo, `make train`.

Tiny Shakespeare is ~338k GPT-2 tokens; the TFDS train split (90%) is ~304k of them.
8 sequences x 128 tokens = 1,024 tokens per step; 250 steps = 256,000 tokens, ~0.84 epoch.
Small batches early in training buy more updates per token. FLOPs per token ~6 x 16M (the tied
50,257 x 256 LM head is most of it), so a 2-core CPU runs ~1,000 tokens/s: about 5 minutes of training.
"""

CONFIG = {
    "size": "tiny",
    "dataset": "tiny_shakespeare",
    "seq_len": 128,
    "batch_size": 8,
    "grad_accum": "auto",  # the smallest whose compiled step fits the device (gpt2_jax.train.plan)
    "remat_policy": "auto",  # the lightest that fits at that grad_accum
    "steps": 250,
    "optimizer": "adamw",  # or muon: Muon (muon_* settings) for the blocks' matrices, AdamW (lr) for the rest
    "lr": 1e-3,
    "warmup_steps": "auto",  # the optimizer's: 20 under adamw, none under muon (gpt2_jax.train.config)
    "dropout": 0.0,  # pretraining without dropout, as nanoGPT does
    "mesh": "1,-1,1",
    "strategy": "fsdp",
    "eval_every": 125,
    "log_every": 25,
    "sample_prompt": "ROMEO:",
    "sample_tokens": 48,
}
