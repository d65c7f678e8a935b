import json

import pytest

from gpt2_jax import prompts
from gpt2_jax.prompts import TaskError


def test_paper_decoding_settings():
    # section 3.6: "Top-k random sampling with k = 2", 100 tokens; 3.7/3.8: greedy decoding
    assert prompts.TASKS["summarize"].sampling == dict(max_new_tokens=100, top_k=2, greedy=False)
    assert prompts.TASKS["translate"].sampling["greedy"] and prompts.TASKS["qa"].sampling["greedy"]


def test_summarize_format_and_first_three_sentences():
    assert prompts.summarize_prompt("  An article.\n") == "An article.\nTL;DR:"
    gen = " The cat sat. It was happy!\nThen it left? Nobody knew. More text"
    assert prompts.summary_from_generation(gen) == "The cat sat. It was happy! Then it left?"
    assert prompts.summary_from_generation(" One.<|endoftext|>Two. Three.") == "One."


def test_translate_format_and_first_sentence():
    text = prompts.translate_prompt([("Hello.", "Bonjour."), ("Thank you.", "Merci.")], "Good night.")
    assert text == "Hello. = Bonjour.\nThank you. = Merci.\nGood night. ="
    assert prompts.translation_from_generation(" Bonne nuit. Et puis\nHello. = Bonjour.") == "Bonne nuit."
    assert prompts.translation_from_generation("\n") == ""


def test_qa_format_and_answer():
    text = prompts.qa_prompt([("Who wrote Hamlet?", "Shakespeare")], "What is 2+2?")
    assert text == "Q: Who wrote Hamlet?\nA: Shakespeare\n\nQ: What is 2+2?\nA:"
    assert prompts.qa_prompt([], "Why?", context="A story.") == "A story.\n\nQ: Why?\nA:"
    assert prompts.answer_from_generation(" four\n\nQ: next") == "four"


def test_metrics():
    r = prompts.rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert r == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    r = prompts.rouge(["the cat"], ["a dog ran"])
    assert r["rouge1"] == 0.0
    # ROUGE-1 F1 of 2 shared unigrams out of 3 and 4: 2 * (2/3 * 2/4) / (2/3 + 2/4)
    assert prompts.rouge(["the cat sat"], ["the cat ran off"])["rouge1"] == pytest.approx(100 * 4 / 7)
    assert prompts.bleu(["le chat est sur le tapis"], ["le chat est sur le tapis"])["bleu"] == pytest.approx(100.0)
    assert prompts.bleu(["xyz"], ["le chat est sur le tapis"])["bleu"] < 1.0
    assert prompts.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    em = prompts.exact_match(["the Eiffel tower.", "Paris", "no"], [["Eiffel Tower"], ["London", "paris"], ["yes"]])
    assert em["exact_match"] == pytest.approx(200 / 3)


def _write(tmp_path, lines, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_read_jsonl(tmp_path):
    p = _write(tmp_path, [json.dumps({"question": "q1", "answer": "a"}), "",
                          json.dumps({"question": "q2", "answers": ["b", "c"]}), json.dumps({"question": "q3"})])
    recs = prompts.read_jsonl(p, "qa")
    assert [r["answers"] for r in recs[:2]] == [["a"], ["b", "c"]] and "answers" not in recs[2]
    assert prompts.score("qa", ["a", "c", "x"], recs) is None  # one record has no reference
    assert prompts.score("qa", ["a", "c"], recs[:2]) == {"exact_match": 100.0}


@pytest.mark.parametrize(
    "task, lines, msg",
    [
        ("qa", ["{not json"], "t.jsonl:1: not valid JSON"),
        ("qa", ["[1, 2]"], "expected a JSON object"),
        ("qa", [json.dumps({"q": "x"})], "missing field 'question'"),
        ("qa", [json.dumps({"question": "x", "answers": []})], "non-empty list"),
        ("summarize", [json.dumps({"article": "a"}), json.dumps({"article": 3})], "t.jsonl:2: field 'article'"),
        ("translate", [json.dumps({"source": "  "})], "non-empty string"),
        ("translate", [""], "holds no records"),
    ],
)
def test_read_jsonl_errors(tmp_path, task, lines, msg):
    with pytest.raises(TaskError, match=msg):
        prompts.read_jsonl(_write(tmp_path, lines), task)


def test_read_jsonl_missing_and_binary(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        prompts.read_jsonl(tmp_path / "nope.jsonl", "qa")
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TaskError, match="not UTF-8"):
        prompts.read_jsonl(bad, "qa")


def test_task_prompts_drop_oldest_examples_to_fit():
    examples = [{"source": f"sentence number {i} is here.", "target": f"phrase {i}."} for i in range(6)]
    rec = {"source": "last one."}
    full = prompts.task_prompts("translate", [rec], examples, room=10_000)[0]
    tight = prompts.task_prompts("translate", [rec], examples, room=len(full) - 1)[0]
    from gpt2_jax.tokenizer import get_tokenizer

    text = get_tokenizer().decode(tight)
    assert len(tight) < len(full) and "sentence number 0" not in text and text.endswith("last one. =")
    assert "sentence number 5 is here. = phrase 5." in text
