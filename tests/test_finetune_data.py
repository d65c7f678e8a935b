import json

import numpy as np
import pytest

from gpt2_jax import finetune
from gpt2_jax.config import ConfigError
from gpt2_jax.tokenizer import EOT_ID, get_tokenizer


def _jsonl(tmp_path, rows, name="pairs.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_pack_example_masks_exactly_the_completion():
    tokens, mask = finetune.pack_example([10, 11, 12], [20, 21, EOT_ID], seq_len=8)
    np.testing.assert_array_equal(tokens, [10, 11, 12, 20, 21, EOT_ID, EOT_ID, EOT_ID, EOT_ID])
    # position j predicts tokens[j + 1]: positions 2, 3, 4 predict 20, 21, <|endoftext|>
    np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1, 0, 0, 0])
    scored = tokens[1:][mask == 1]
    np.testing.assert_array_equal(scored, [20, 21, EOT_ID])


def test_read_pairs_and_templates(tmp_path):
    p = _jsonl(tmp_path, [{"prompt": "2+2=", "completion": " 4"}, "", {"prompt": "3+3=", "completion": " 6"}])
    assert finetune.read_pairs(p) == [("2+2=", " 4"), ("3+3=", " 6")]
    q = _jsonl(tmp_path, [{"question": "Who?", "answer": "Me", "extra": 1}], "qa.jsonl")
    assert finetune.read_pairs(q, "Q: {question}\nA:", " {answer}") == [("Q: Who?\nA:", " Me")]
    # a backslash-n typed on a command line is a newline
    assert finetune.read_pairs(q, "Q: {question}\\nA:", " {answer}") == [("Q: Who?\nA:", " Me")]


@pytest.mark.parametrize(
    "rows, templates, msg",
    [
        (["{bad"], (), "pairs.jsonl:1: not valid JSON"),
        (["[1]"], (), "expected a JSON object"),
        ([{"prompt": "a"}], (), "field 'completion' is missing"),
        ([{"prompt": "a", "completion": 3}], (), "not a string"),
        ([{"prompt": "a", "completion": "  "}], (), "empty prompt or completion"),
        ([""], (), "holds no examples"),
        ([{"prompt": "a", "completion": "b"}], ("{prompt.__class__}", "{completion}"), "plain"),
        ([{"prompt": "a", "completion": "b"}], ("{prompt", "{completion}"), "not a valid template"),
    ],
)
def test_read_pairs_errors(tmp_path, rows, templates, msg):
    with pytest.raises(ConfigError, match=msg):
        finetune.read_pairs(_jsonl(tmp_path, rows), *templates)


def test_encode_pairs_truncates_prompt_from_the_left():
    enc = get_tokenizer()
    long_prompt = "one two three four five six seven eight nine ten"
    (p, c), = finetune.encode_pairs([(long_prompt, " eleven")], seq_len=6)
    assert c == enc.encode(" eleven") + [EOT_ID]
    assert p == enc.encode(long_prompt)[-(7 - len(c)):] and len(p) + len(c) == 7
    with pytest.raises(ConfigError, match="does not fit seq_len=2"):
        finetune.encode_pairs([("a", " b c d e")], seq_len=2)


def test_pair_loader_is_deterministic_shardable_and_resumable():
    examples = [([i + 1], [100 + i, EOT_ID]) for i in range(5)]
    a = finetune.PairLoader(examples, 4, global_batch=4, seed=3)
    batches = [next(a) for _ in range(5)]
    assert batches[0]["tokens"].shape == (4, 5) and batches[0]["mask"].shape == (4, 4)
    # every example appears exactly 4 times in 5 steps of 4 rows (4 epochs of 5)
    firsts = np.concatenate([b["tokens"][:, 0] for b in batches])
    assert sorted(firsts.tolist()) == sorted(list(range(1, 6)) * 4)
    # two shards of 2 rows make up the global batch
    s0 = finetune.PairLoader(examples, 4, 4, 3, shard_index=0, shard_count=2)
    s1 = finetune.PairLoader(examples, 4, 4, 3, shard_index=1, shard_count=2)
    np.testing.assert_array_equal(np.concatenate([next(s0)["tokens"], next(s1)["tokens"]]), batches[0]["tokens"])
    # the state holds no process count: saved by the 2 processes, continued by 4
    assert s0.get_state() == s1.get_state()
    quarters = [finetune.PairLoader(examples, 4, 4, 3, shard_index=i, shard_count=4) for i in range(4)]
    for q in quarters:
        q.set_state(s1.get_state())
    np.testing.assert_array_equal(np.concatenate([next(q)["tokens"] for q in quarters]), batches[1]["tokens"])
    b = finetune.PairLoader(examples, 4, 4, 3)
    b.set_state(a.get_state() | {"step": 3})
    np.testing.assert_array_equal(next(b)["tokens"], batches[3]["tokens"])


def test_eval_batches_and_split():
    examples = [([1, 2], [3, EOT_ID])] * 5
    batches = finetune.eval_batches(examples, 6, batch_size=2)
    assert len(batches) == 3 and batches[-1]["mask"][1].sum() == 0 and batches[0]["mask"].sum() == 4
    train, val = finetune.split_validation(list(range(40)))
    assert val == [38, 39] and train == list(range(38))
    assert finetune.split_validation(list(range(5))) == (list(range(5)), [])
