"""Fine-tune a trained GPT-2 on prompt/completion pairs: `make finetune MODEL=dir DATA=pairs.jsonl`.

The model's shape and weights come from init_from (MODEL); only completion tokens are scored, the
GPT-2 paper's conditional likelihood p(output | input) (gpt2_jax.finetune).
8 pairs per step, each padded to the longest pair (seq_len 0), 300 steps = 2,400 examples seen;
the last 5% of the pairs are held out for the validation loss when there are at least 20.
"""

CONFIG = {
    "size": "small",  # only bounds seq_len here: the checkpoint's shape replaces the preset's
    "seq_len": 0,
    "batch_size": 8,
    "steps": 300,
    "lr": 5e-5,
    "warmup_steps": 20,
    "weight_decay": 0.0,
    "dropout": 0.1,  # the released GPT-2 checkpoints' dropout
    "eval_every": 50,
    "log_every": 10,
    "sample_tokens": 32,
}
