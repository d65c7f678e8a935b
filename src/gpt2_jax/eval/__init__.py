"""Zero-shot evaluation as in the GPT-2 paper: `python -m gpt2_jax.eval --model M --task T,...`.

`scoring` holds the batched, sharded scorer and the sliding windows; `tasks` one record per data
set (`TASKS`: its file, code, protocol and published figures) and `hellaswag_items` for training;
`perplexity` and `accuracy` the tasks' readers and scorers, `common` what they share; `detokenize`
the benchmarks' detokenizers; `report` running tasks into the JSON report and the table; `cli` the
command line.
"""

from gpt2_jax.eval.detokenize import count_words, moses_detokenize, ptb_detokenize, wikitext_detokenize
from gpt2_jax.eval.report import evaluate, params_sha256, render_table, write_report
from gpt2_jax.eval.scoring import Scorer, Window, sliding_windows
from gpt2_jax.eval.tasks import TASKS, EvalError, EvalTask, HellaSwagItem, Options, hellaswag_items, parse_tasks

__all__ = [
    "TASKS", "EvalError", "EvalTask", "HellaSwagItem", "Options", "Scorer", "Window", "count_words", "evaluate",
    "hellaswag_items", "moses_detokenize", "params_sha256", "parse_tasks", "ptb_detokenize", "render_table",
    "sliding_windows", "wikitext_detokenize", "write_report",
]
