import json
import types

import pytest

from gpt2_jax.generate import tasks
from gpt2_jax.generate.tasks import TaskError
from gpt2_jax.tokenizer import get_tokenizer


def test_paper_decoding_settings():
    # section 3.6: "Top-k random sampling with k = 2", 100 tokens; 3.7/3.8: greedy decoding
    assert tasks.TASKS["summarize"].sampling == dict(max_new_tokens=100, top_k=2, greedy=False)
    assert tasks.TASKS["translate"].sampling["greedy"] and tasks.TASKS["qa"].sampling["greedy"]
    # CoQA: greedy decoding, to the end of the line
    assert tasks.TASKS["coqa"].sampling["greedy"] and tasks.TASKS["coqa"].stop_at_newline


def test_summarize_format_and_first_three_sentences():
    assert tasks.summarize_prompt("  An article.\n") == "An article.\nTL;DR:"
    enc = get_tokenizer()
    assert tasks.summarize_tokens("  An article.\n", 100) == enc.encode_ordinary("An article.\nTL;DR:")
    gen = " The cat sat. It was happy!\nThen it left? Nobody knew. More text"
    assert tasks.summary_from_generation(gen) == "The cat sat. It was happy! Then it left?"
    assert tasks.summary_from_generation(" One.<|endoftext|>Two. Three.") == "One."


def test_translate_format_and_first_sentence():
    text = tasks.translate_prompt([("Hello.", "Bonjour."), ("Thank you.", "Merci.")], "Good night.")
    assert text == "Hello. = Bonjour.\nThank you. = Merci.\nGood night. ="
    assert tasks.translation_from_generation(" Bonne nuit. Et puis\nHello. = Bonjour.") == "Bonne nuit."
    assert tasks.translation_from_generation("\n") == ""


def test_qa_format_and_answer():
    text = tasks.qa_prompt([("Who wrote Hamlet?", "Shakespeare")], "What is 2+2?")
    assert text == "Q: Who wrote Hamlet?\nA: Shakespeare\n\nQ: What is 2+2?\nA:"
    assert tasks.qa_prompt([], "Why?", context="A story.") == "A story.\n\nQ: Why?\nA:"
    assert tasks.answer_from_generation(" four\n\nQ: next") == "four"


def test_metrics():
    r = tasks.rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert r == {"rouge1": 100.0, "rouge2": 100.0, "rougeLsum": 100.0, "r_avg": 100.0}
    # ROUGE-Lsum matches sentence by sentence: the same two sentences in the other order keep every
    # word of the longest common subsequences (plain ROUGE-L would give 50). ROUGE-2: 4 of 5 bigrams.
    r = tasks.rouge(["The dog ran. The cat sat."], ["The cat sat. The dog ran."])
    assert r["rouge1"] == 100.0 and r["rougeLsum"] == 100.0 and r["rouge2"] == pytest.approx(80.0)
    assert r["r_avg"] == pytest.approx((100 + 80 + 100) / 3)
    r = tasks.rouge(["the cat"], ["a dog ran"])
    assert r["rouge1"] == 0.0
    # ROUGE-1 F1 of 2 shared unigrams out of 3 and 4: 2 * (2/3 * 2/4) / (2/3 + 2/4)
    assert tasks.rouge(["the cat sat"], ["the cat ran off"])["rouge1"] == pytest.approx(100 * 4 / 7)
    assert tasks.bleu(["le chat est sur le tapis"], ["le chat est sur le tapis"])["bleu"] == pytest.approx(100.0)
    assert tasks.bleu(["xyz"], ["le chat est sur le tapis"])["bleu"] < 1.0
    assert tasks.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    em = tasks.exact_match(["the Eiffel tower.", "Paris", "no"], [["Eiffel Tower"], ["London", "paris"], ["yes"]])
    assert em["exact_match"] == pytest.approx(200 / 3)


def _write(tmp_path, lines, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_read_jsonl(tmp_path):
    p = _write(tmp_path, [json.dumps({"question": "q1", "answer": "a"}), "",
                          json.dumps({"question": "q2", "answers": ["b", "c"]}), json.dumps({"question": "q3"})])
    recs = tasks.read_jsonl(p, "qa")
    assert [r["answers"] for r in recs[:2]] == [["a"], ["b", "c"]] and "answers" not in recs[2]
    assert tasks.score("qa", ["a", "c", "x"], recs) is None  # one record has no reference
    assert tasks.score("qa", ["a", "c"], recs[:2]) == {"exact_match": 100.0}


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
        tasks.read_jsonl(_write(tmp_path, lines), task)


def test_read_jsonl_missing_and_binary(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        tasks.read_jsonl(tmp_path / "nope.jsonl", "qa")
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TaskError, match="not UTF-8"):
        tasks.read_jsonl(bad, "qa")


def test_task_prompts_drop_oldest_examples_to_fit():
    examples = [{"source": f"sentence number {i} is here.", "target": f"phrase {i}."} for i in range(6)]
    rec = {"source": "last one."}
    full = tasks.task_prompts("translate", [rec], examples, room=10_000)[0]
    tight = tasks.task_prompts("translate", [rec], examples, room=len(full) - 1)[0]
    from gpt2_jax.tokenizer import get_tokenizer

    text = get_tokenizer().decode(tight)
    assert len(tight) < len(full) and "sentence number 0" not in text and text.endswith("last one. =")
    assert "sentence number 5 is here. = phrase 5." in text


def test_summarize_keeps_the_start_of_an_over_long_article():
    first = "The mayor of Thornbury opened the new bridge on Monday morning."
    article = first + " " + " ".join(f"Paragraph {i} adds more detail about the bridge." for i in range(400))
    enc = get_tokenizer()
    room = 1024 - 100  # the paper's context minus the 100 new tokens
    assert len(enc.encode_ordinary(article)) > 3 * room
    (tokens,) = tasks.task_prompts("summarize", [{"article": article}], [], room)
    text = enc.decode(tokens)
    assert len(tokens) == room and text.startswith(first) and text.endswith("\nTL;DR:")
    assert "Paragraph 399" not in text  # the tail is what goes
    with pytest.raises(TaskError, match="no room for an article"):
        tasks.summarize_tokens(article, 3)


STORY = "Anna has a red bicycle. She rides it to school every day with her brother Tom."


def _coqa_file(tmp_path, **dialog):
    turns = [("What color is Anna's bicycle?", "red", ["Red", "it is red"]),
             ("Where does she ride it?", "to school", ["school", "To school every day"]),
             ("With whom?", "her brother Tom", ["Tom", "with her brother"])]
    record = {
        "source": "test", "id": "d1", "filename": "story.txt", "story": STORY,
        "questions": [{"input_text": q, "turn_id": i + 1} for i, (q, _, _) in enumerate(turns)],
        "answers": [{"input_text": a, "span_text": a, "turn_id": i + 1} for i, (_, a, _) in enumerate(turns)],
        "additional_answers": {str(k): [{"input_text": extra[k], "turn_id": i + 1} for i, (_, _, extra) in enumerate(turns)]
                               for k in range(2)},
        **dialog,
    }
    path = tmp_path / "coqa.json"
    path.write_text(json.dumps({"version": "1.0", "data": [record]}))
    return path


def test_coqa_prompts_carry_the_story_and_the_dialogue_so_far(tmp_path):
    records = tasks.read_records(_coqa_file(tmp_path), "coqa")
    assert [r["turn_id"] for r in records] == [1, 2, 3]
    assert records[1]["answers"] == ["to school", "school", "To school every day"]
    assert tasks.coqa_prompt(STORY, records[2]["history"], records[2]["question"]) == (
        STORY + "\n\n"
        "Q: What color is Anna's bicycle?\nA: red\n"
        "Q: Where does she ride it?\nA: to school\n"
        "Q: With whom?\nA:"
    )
    assert tasks.coqa_prompt(STORY, [], records[0]["question"]) == STORY + "\n\nQ: What color is Anna's bicycle?\nA:"
    # Too long for the context: the oldest turns go first, the story and the question stay.
    enc = get_tokenizer()
    full = tasks.task_prompts("coqa", records[2:], [], room=10_000)[0]
    (tight,) = tasks.task_prompts("coqa", records[2:], [], room=len(full) - 1)
    assert enc.decode(tight) == STORY + "\n\nQ: Where does she ride it?\nA: to school\nQ: With whom?\nA:"


def test_coqa_f1_follows_the_official_definition():
    # One reference: word F1 after SQuAD/CoQA normalization. "the red one" vs "red": articles go,
    # P = 1/2, R = 1: F1 = 2/3.
    assert tasks.coqa_scores(["the red one"], [["Red"]]) == {"f1": pytest.approx(100 * 2 / 3), "exact_match": 0.0}
    # Several references: each left out in turn, the best of the rest taken, the n results averaged.
    golds = ["to school", "school", "To school every day"]
    f1 = lambda ref, pred: tasks.word_f1(ref, pred)
    assert f1("To school every day", "school") == pytest.approx(2 * (1 * 0.25) / 1.25)
    expect = (max(f1("school", "school"), f1("To school every day", "school"))
              + max(f1("to school", "school"), f1("To school every day", "school"))
              + max(f1("to school", "school"), f1("school", "school"))) / 3
    got = tasks.coqa_scores(["school"], [golds])
    assert got["f1"] == pytest.approx(100 * expect) and got["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)
    assert got["exact_match"] == pytest.approx(100 * 2 / 3)  # exact against "school" in two of the three pools
    # Empty answers agree only with empty answers; punctuation and case never count.
    assert tasks.word_f1("", "") == 1.0 and tasks.word_f1("", "red") == 0.0
    assert tasks.word_f1("Tom!", "tom") == 1.0


class _FakeGenerator:
    """Answers each prompt's last question from a table, as greedy decoding that stops at the newline
    would; records what it was asked."""

    def __init__(self, answers: dict[str, str]):
        self.config = types.SimpleNamespace(n_ctx=1024)
        self.answers, self.calls = answers, []

    def generate_tokens(self, batch, sampling, *, seed, truncate):
        enc = get_tokenizer()
        self.calls.append((batch, sampling))
        rows = [enc.encode_ordinary(" " + self.answers[enc.decode(p).rsplit("Q: ", 1)[1].removesuffix("\nA:")])
                for p in batch]
        return types.SimpleNamespace(rows=lambda: rows)


def test_coqa_run_task_greedy_to_the_end_of_the_line(tmp_path):
    from gpt2_jax.generate import SamplingConfig

    records = tasks.read_records(_coqa_file(tmp_path), "coqa")
    gen = _FakeGenerator({"What color is Anna's bicycle?": "Red.", "Where does she ride it?": "school",
                          "With whom?": "her dog"})
    out = tmp_path / "pred.jsonl"
    report = tasks.run_task(gen, "coqa", records, SamplingConfig(**tasks.TASKS["coqa"].sampling), output=str(out))
    (batch, sampling), = gen.calls
    enc = get_tokenizer()
    assert [enc.decode(p) for p in batch] == [
        tasks.coqa_prompt(STORY, r["history"], r["question"]) for r in records]
    assert sampling.greedy and set(sampling.stop_ids) == set(tasks.newline_ids())
    assert enc.encode_ordinary("\n")[0] in sampling.stop_ids and enc.encode_ordinary("\n\n")[0] in sampling.stop_ids
    assert report["sampling"]["stop"] == "end of line" and report["records"] == 3
    # Turn 1: exact in every pool. Turn 2: as in the test above. Turn 3: "her" shared with two of the
    # three references (P = 1/2, R = 1/3: F1 = 0.4), and every pool holds one of them.
    assert report["metrics"]["f1"] == pytest.approx(100 * (1 + (1 + 2 / 3 + 1) / 3 + 0.4) / 3)
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["prediction"] for p in preds] == ["Red.", "school", "her dog"]
    assert all("story" not in p and "history" not in p for p in preds)
    with pytest.raises(TaskError, match="coqa takes no in-context examples"):
        tasks.run_task(gen, "coqa", records, sampling, shots=1)


@pytest.mark.parametrize(
    "change, msg",
    [
        (dict(story=""), '"story" must be a non-empty string'),
        (dict(answers=[]), '"questions" and "answers" must be lists of the same length'),
        (dict(additional_answers={"0": []}), '"additional_answers" must map names'),
        (dict(questions=[{"input_text": "Q1?", "turn_id": 1}, {"input_text": "Q2?", "turn_id": 2},
                         {"input_text": "Q3?", "turn_id": 7}]), "answer 2 belongs to another turn"),
        (dict(questions=[{"text": "Q1?", "turn_id": 1}, {"input_text": "Q2?", "turn_id": 2},
                         {"input_text": "Q3?", "turn_id": 3}]), 'questions\\[0\\]: expected an object with an "input_text"'),
    ],
)
def test_coqa_file_errors(tmp_path, change, msg):
    with pytest.raises(TaskError, match=msg):
        tasks.read_records(_coqa_file(tmp_path, **change), "coqa")


def test_coqa_file_that_is_not_one(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"data": 3}')
    with pytest.raises(TaskError, match='not a CoQA file'):
        tasks.read_records(bad, "coqa")
    bad.write_text('{"data": [')
    with pytest.raises(TaskError, match=r"x.json:1: not valid JSON"):
        tasks.read_records(bad, "coqa")
