"""Published figures of OpenAI's GPT-2 that our own stand beside: the paper's zero-shot results and
the HellaSwag accuracies of the released weights.

Numbers only (no jax, no scorer), so the evaluation report (`gpt2_jax.eval.tasks`, one record per
task naming its figures here) and the training curves (`gpt2_jax.plot`) both import them at will.
Each figure is metric -> released size (small/medium/large/xl: the paper's 117M/345M/762M/1542M
models) -> value, with only the sizes its source gives.
"""

from __future__ import annotations

PAPER_SOURCE = "Radford et al. 2019, Language Models are Unsupervised Multitask Learners, Table 3 (test sets)"


def _table3(small: float, medium: float, large: float, xl: float) -> dict[str, float]:
    return {"small": small, "medium": medium, "large": large, "xl": xl}


# The paper's Table 3, zero-shot, one figure per task and size. LAMBADA's protocol there is
# unpublished: its figures go beside our last-token variant (gpt2_jax.eval's LAMBADA_FOOTNOTE says why).
WIKITEXT2 = {"ppl_word": _table3(29.41, 22.76, 19.93, 18.34)}
WIKITEXT103 = {"ppl_word": _table3(37.50, 26.37, 22.05, 17.48)}
PTB = {"ppl_word": _table3(65.85, 47.33, 40.31, 35.76)}
LAMBADA = {"acc_last_token": _table3(45.99, 55.48, 60.12, 63.24), "ppl_last_token": _table3(35.13, 15.60, 10.87, 8.63)}
CBT_CN = {"acc": _table3(87.65, 92.35, 93.45, 93.30)}
CBT_NE = {"acc": _table3(83.4, 87.1, 88.0, 89.05)}
ENWIK8 = {"bits_per_byte": _table3(1.16, 1.01, 0.97, 0.93)}
TEXT8 = {"bits_per_char": _table3(1.17, 1.06, 1.02, 0.98)}
LM1B = {"ppl_word": _table3(75.20, 55.72, 44.575, 42.16)}

# HellaSwag postdates the paper: OpenAI's released weights on all 10,042 validation items, scored as
# gpt2_jax.eval's hellaswag task does (karpathy/build-nanogpt and karpathy/llm.c, hellaswag.py, where
# acc_sum is called acc and acc_per_token acc_norm).
HELLASWAG = {"acc_sum": {"small": 28.59, "xl": 38.42}, "acc_per_token": {"small": 29.55, "xl": 48.93}}
