"""What `vulture src tests/vulture_allowlist.py --min-confidence 80` would report in src/ but is kept
on purpose, each with its reason (test_architecture.py::test_no_dead_code runs it). vulture reads
this file, nothing imports it: each line names what it keeps."""
# ruff: noqa

# gpt2_jax.harness.adapter.GPT2JaxLM.tok_encode: lm-eval's TemplateLM declares
# tok_encode(string, add_special_tokens=None) and its callers pass it by name; GPT-2 adds no special
# tokens, so the adapter takes the argument and ignores it.
add_special_tokens
