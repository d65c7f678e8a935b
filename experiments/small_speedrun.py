"""GPT-2 small (124M) with Muon on FineWeb's 10B-token sample, stopping at 3.28 validation loss: the
NanoGPT speedrun's target (KellerJordan/modded-nanogpt) with the unchanged GPT-2 architecture.

The tokens it is expected to need, from modded-nanogpt's README of October 2024 (the Muon record of
its record table: "This will train a 124M-parameter transformer for 6200 steps on 3.25B tokens of
Fineweb, achieving ~3.278 validation loss"; "Trains 3x more efficiently (taking only 3.25B tokens
instead of 10B ...)"): 6,200 steps x 524,288 = 3,250,585,600 tokens; AdamW's record before it took
~5B (records/060624_AdamW: "batch size 2^19, so ~5B tokens"); llm.c's GPT-2 trainer, 10B. That
record also had rotary embeddings and RMSNorm; this run keeps GPT-2's learned positions and
LayerNorms, so expect more: 6.7B (10B / the README's "~1.5x better sample-efficiency") would not surprise.
Settings: the record's 6,200 steps with a linear warmdown over the last 1,800 (its warmdown_iters),
no warmup, no weight decay, Muon at 0.02 / momentum 0.95 / Nesterov / 5 Newton-Schulz steps for the
blocks' matrices and Adam at 0.0036 for the tied embedding (TrainConfig's Muon defaults and sources).
Validation every 125 steps (the record's val_loss_every); target_val_loss=3.28 saves and stops the run.

Compute at 3,250,585,600 tokens: 855,166,464 training FLOPs per token (6N + attention,
gpt2_jax.costs.flops_per_token, N = 123,653,376) x 3,250,585,600 = 2.78e18 FLOPs; an H100 SXM's dense
bfloat16 peak is 989 TFLOP/s, so at 50% MFU (494.5 TFLOP/s) 5,621 s: 1.56 H100-hours (11.7 minutes on
eight); at 6.7B tokens, 3.2 H100-hours. Validation adds ~5% (50 passes over ~10M tokens, forward only).

Our validation set is not modded-nanogpt's. Theirs: the first 10,485,760 tokens (train_gpt.py's
val_tokens) of fineweb_val_000000.bin, from their data/cached_fineweb10B.py (kjj0/fineweb10B-gpt2):
the first shard, 100M tokens, of llm.c's dev/data/fineweb.py tokenization of sample-10BT in the Hub's
row order, <|endoftext|> before each document. Ours (`fineweb`, like `fineweb_edu`): the documents
whose sha256(id) falls below 0.001 (~0.1%, ~10M tokens, spread over the whole sample), each followed
by <|endoftext|>, held out from training. Both are FineWeb documents kept out of training; the
losses are close, not the same number: 3.28 here is this project's reading of the target.
"""

CONFIG = {
    "size": "small",
    "dataset": "fineweb",  # python -m gpt2_jax.data prepare --dataset fineweb
    "seq_len": 1024,
    "batch_size": 512,  # 524,288 (2^19) tokens per step, as the record
    "grad_accum": "auto",  # the smallest whose compiled step fits the device (gpt2_jax.train.plan)
    "remat_policy": "auto",  # the lightest that fits at that grad_accum
    "steps": 6200,
    "optimizer": "muon",
    "schedule": "warmdown",
    "warmdown_frac": 0.2903,  # 1,800 of 6,200 steps
    "warmup_steps": "auto",  # none under muon
    "weight_decay": "auto",  # none under muon
    "dropout": 0.0,
    "mesh": "1,-1,1",
    "strategy": "fsdp",
    "scan_layers": True,
    "pad_vocab_multiple": 128,  # 50,304 rows: the LM-head matmul tiles evenly
    "eval_every": 125,
    "eval_batches": 0,  # the whole validation split
    "target_val_loss": 3.28,
    "sample_every": 1000,
    "ckpt_every": 1000,
    "log_every": 10,
}
