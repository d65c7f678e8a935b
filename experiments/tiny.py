"""tiny (4 layers x 256, 4 heads, ~16M parameters) on Tiny Shakespeare: the CPU demo, `make train`.

Tiny Shakespeare is ~338k GPT-2 tokens; 90% (~304k) is the training split.
16 sequences x 128 tokens = 2,048 tokens per step; 300 steps = 614,400 tokens, about two epochs.
On a 2-core CPU that is ~1,000+ tokens/s, so about 8 minutes.
"""

CONFIG = {
    "size": "tiny",
    "dataset": "tiny_shakespeare",
    "seq_len": 128,
    "batch_size": 16,
    "steps": 300,
    "lr": 1e-3,
    "warmup_steps": 20,
    "dropout": 0.0,  # pretraining without dropout, as nanoGPT does
    "mesh": "1,-1,1",
    "strategy": "fsdp",
    "eval_every": 100,
    "log_every": 25,
    "sample_prompt": "ROMEO:",
    "sample_tokens": 48,
}
