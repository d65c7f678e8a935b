"""GPT-2 small (124,439,808 parameters) on FineWeb-Edu's 10B-token sample: the reproduction people run.

The settings of karpathy/build-nanogpt's train_gpt2.py (the "Let's reproduce GPT-2 (124M)" lecture),
which take GPT-3's for its 125M model (Brown et al. 2020, table 2.1 and appendix B):
512 sequences x 1,024 tokens = 524,288 (2^19) tokens per step.
19,073 steps x 524,288 = 9,999,745,024 tokens: one pass over the sample's ~10B GPT-2 tokens.
Warmup 715 steps = 374,865,920 tokens (GPT-3's 375M), then cosine from the peak lr 6e-4 to 6e-5 (10%).
AdamW b1 0.9, b2 0.95, weight decay 0.1, clipping at 1.0 (TrainConfig's defaults).
Compute: 855,166,464 FLOPs per token (6N + attention, gpt2_jax.costs.flops_per_token) x 9,999,745,024
tokens = 8.55e18 FLOPs, 6.0 hours on one H100 (989 TFLOP/s bf16) at 40% MFU, 45 minutes on eight.
Validation loss (the held-out 0.1% of documents, ~10M tokens) and HellaSwag (all 10,042 items, the
0.2955 per-token figure of OpenAI's 124M weights to beat) every 250 steps, as the lecture does.
grad_accum and remat_policy auto: the smallest grad_accum, then the lightest remat, that fits.
"""

CONFIG = {
    "size": "small",
    "dataset": "fineweb_edu",  # python -m gpt2_jax.data prepare --dataset fineweb_edu
    "seq_len": 1024,
    "batch_size": 512,
    "grad_accum": "auto",  # the smallest whose compiled step fits the device (gpt2_jax.train.plan)
    "remat_policy": "auto",  # the lightest that fits at that grad_accum
    "steps": 19073,
    "optimizer": "adamw",  # or muon: Muon (muon_* settings) for the blocks' matrices, AdamW (lr) for the rest
    "lr": 6e-4,
    "warmup_steps": 715,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "dropout": 0.0,
    "mesh": "1,-1,1",
    "strategy": "fsdp",
    "scan_layers": True,
    "pad_vocab_multiple": 128,  # 50,304 rows: the LM-head matmul tiles evenly
    "eval_every": 250,
    "eval_batches": 0,  # the whole validation split
    "hellaswag_every": 250,
    "hellaswag_limit": 0,  # all 10,042 items ($GPT2_JAX_DATA_DIR/hellaswag/hellaswag_val.jsonl)
    "sample_every": 1000,
    "ckpt_every": 1000,
    "log_every": 10,
}
