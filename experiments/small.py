"""GPT-2 small (12 layers x 768, 12 heads, 124,439,808 parameters) on OpenWebText.

Paper shapes (Radford et al. 2019, table 2): context 1024, batch 512 sequences.
512 sequences x 1,024 tokens = 524,288 tokens per step.
4,800 steps x 524,288 = 2,516,582,400 tokens, ~20 tokens per parameter (the
compute-optimal ~20 of Hoffmann et al. 2022; GPT-2's own token count was not published).
Warmup 715 steps = 375M tokens, GPT-3's warmup (Brown et al. 2020, appendix B).
grad_accum and remat_policy auto: the trainer compiles the step abstractly and takes the smallest
grad_accum, then the lightest remat, that fits the device (`--dry-run` shows the choice; the
README's size table gives it for 1 and 8 GPUs of 80 GB and 8 chips of 16 GB).
Peak lr 6e-4: GPT-3 paper table 2.1 for the model of this size (see gpt2_jax.optim.PEAK_LR).
"""

CONFIG = {
    "size": "small",
    "dataset": "openwebtext",
    "seq_len": 1024,
    "batch_size": 512,
    "grad_accum": "auto",  # the smallest whose compiled step fits the device (gpt2_jax.train.plan)
    "steps": 4800,
    "optimizer": "adamw",  # or muon: Muon (muon_* settings) for the blocks' matrices, AdamW (lr) for the rest
    "warmup_steps": 715,
    "dropout": 0.0,
    "mesh": "1,-1,1",
    "strategy": "fsdp",
    "scan_layers": True,
    "remat_policy": "auto",  # the lightest that fits at that grad_accum
    "pad_vocab_multiple": 128,  # 50,304 rows: the LM-head matmul tiles evenly
    "eval_every": 500,
    "eval_batches": 100,
    "sample_every": 2000,
    "log_every": 10,
}
