"""Every command the README shows is exercised somewhere: a test named here runs it (or the same
entry point with the same flags on a tiny model), or .ci/run does. A command added to the README
without a test fails this file."""

import re
import subprocess

from conftest import ROOT

# README command (comments stripped) -> the tests that run it. Commands that need an accelerator or a
# corpus not on the CI machine (OpenWebText, OpenAI's weights) point at the tests that run the same
# entry point and flags on a tiny model or a test-made file.
COVERAGE = {
    "make install": [".ci/run", "tests/test_install.py::test_make_install_defaults_to_cpu"],
    "make install ACCEL=cuda": ["tests/test_install.py::test_make_install_installs_the_extra_and_never_torch"],
    "make install ACCEL=tpu": ["tests/test_install.py::test_make_install_installs_the_extra_and_never_torch"],
    "pip install -e .": ["tests/test_install.py::test_user_requirements_hold_no_test_only_package"],
    'pip install -e ".[cuda]"': ["tests/test_install.py::test_accelerator_extras_name_jax_extras"],
    'pip install -e ".[tpu]"': ["tests/test_install.py::test_accelerator_extras_name_jax_extras"],
    "make test": [".ci/run"],
    "make test-slow": [".ci/run"],
    "make train": ["tests/test_train.py::test_make_train_reaches_val_loss_6"],
    "make eval MODEL=runs/tiny-... SPLIT=valid": ["tests/test_train.py::test_make_train_reaches_val_loss_6"],
    "make sample MODEL=runs/tiny-...": ["tests/test_train.py::test_make_train_reaches_val_loss_6"],
    "python -m gpt2_jax.plot runs/tiny-...": ["tests/test_train.py::test_make_train_reaches_val_loss_6",
                                              "tests/test_plot.py::test_cli_writes_png"],
    "make prepare DATASET=openwebtext": ["tests/test_data.py::test_openwebtext_layouts_with_held_out_subsets"],
    "make train SIZE=medium": ["tests/test_train.py::test_every_experiment_loads",
                               "tests/test_sharding.py::test_presets_build_sharded_state_abstractly"],
    'make train SIZE=medium ARGS="grad_accum=8 mesh=2,-1,1"': ["tests/test_train.py::test_overrides_are_type_checked",
                                                               "tests/test_sharding.py::test_mesh_matches_one_device"],
    "make train SIZE=medium ARGS=--dry-run": ["tests/test_plan.py::test_make_train_medium_fits_the_device_it_is_started_on",
                                              "tests/test_plan.py::test_dry_run_prints_the_plan_and_writes_nothing"],
    "python -m gpt2_jax.train medium --dry-run --tpu v5e-8": ["tests/test_tpu_export.py::test_dry_run_for_a_tpu_prints_the_exported_programs"],
    "python -m gpt2_jax.convert inspect path/to/gpt2": ["tests/test_convert.py::test_cli_from_hf_to_hf_round_trip"],
    "python -m gpt2_jax.convert from-hf path/to/gpt2 ckpt/gpt2": ["tests/test_convert.py::test_cli_from_hf_to_hf_round_trip"],
    "python -m gpt2_jax.convert to-hf ckpt/gpt2 out/gpt2-hf": ["tests/test_convert.py::test_cli_from_hf_to_hf_round_trip"],
    "make prepare DATASET=tiny_shakespeare": ["tests/test_data.py::test_tiny_shakespeare_counts_equal_direct_tokenization"],
    "python -m gpt2_jax.data prepare --dataset text_files --files 'corpus/**/*.jsonl' --field text": [
        "tests/test_data.py::test_text_files_equals_direct_tokenization_and_reports_bad_bytes"],
    "python -m gpt2_jax.data prepare --dataset openwebtext --manual-dir /data": [
        "tests/test_data.py::test_openwebtext_layouts_with_held_out_subsets"],
    'make train SIZE=small ARGS="steps=1000 mesh=1,-1,1"': ["tests/test_train.py::test_short_run_writes_the_run_directory",
                                                            "tests/test_train.py::test_every_experiment_loads"],
    "python -m gpt2_jax.train medium grad_accum=32 lr=2e-4 n_layer=12": ["tests/test_train.py::test_overrides_are_type_checked"],
    "python -m gpt2_jax.train --help": ["tests/test_readme.py::test_help_of_every_entry_point"],
    "python -m gpt2_jax.train large --coordinator host0:1234 --num-processes 4 --process-id $RANK mesh=1,-1,1": [
        "tests/test_train_multiprocess.py::test_two_processes_match_one_process"],
    "make eval MODEL=runs/tiny-... TASKS=wikitext2,ptb,lambada SPLIT=valid": [
        "tests/test_eval.py::test_make_train_then_make_eval_every_task"],
    "python -m gpt2_jax.eval --model path/to/gpt2 --task all --compare paper": [
        "tests/test_eval.py::test_every_task_end_to_end", "tests/test_eval.py::test_full_bytes_split_and_paper_column"],
    "make paper-table MODEL=path/to/gpt2": ["tests/test_eval.py::test_full_bytes_split_and_paper_column"],
    'make paper-table MODEL=path/to/gpt2 EVAL_ARGS="--stride n_ctx"': [
        "tests/test_eval.py::test_stride_n_ctx_is_the_non_overlapping_protocol"],
    'python -m gpt2_jax.generate --model path/to/gpt2 --prompt "In a shocking finding," --seed 0': [
        "tests/test_generate.py::test_cli_streams_the_same_text_as_the_library"],
    'python -m gpt2_jax.generate --model runs/tiny-... --prompt "ROMEO:" --top-k 40 --max-new-tokens 64': [
        "tests/test_generate.py::test_cli_streams_the_same_text_as_the_library"],
    "python -m gpt2_jax.generate --model path/to/gpt2 --unconditional --num-samples 4 --top-p 0.9": [
        "tests/test_generate.py::test_cli_one_line_errors", "tests/test_generate.py::test_nucleus_set_equals_the_sorted_definition"],
    'make sample MODEL=path/to/gpt2 PROMPT="ROMEO:"': ["tests/test_train.py::test_make_train_reaches_val_loss_6"],
    "python -m gpt2_jax.generate --model path/to/gpt2 --task summarize --input cnn_dm.jsonl --output preds.jsonl": [
        "tests/test_generate.py::test_run_task_summarize_and_translate_report_their_metrics"],
    "python -m gpt2_jax.generate --model path/to/gpt2 --task translate --input wmt.jsonl --shots 5": [
        "tests/test_generate.py::test_run_task_summarize_and_translate_report_their_metrics",
        "tests/test_generate.py::test_task_cli_qa_writes_predictions"],
    "python -m gpt2_jax.generate --model path/to/gpt2 --task coqa --input coqa-dev-v1.0.json --output coqa_preds.jsonl": [
        "tests/test_generate.py::test_task_cli_coqa_stops_at_the_end_of_the_line"],
    'make finetune MODEL=path/to/gpt2 DATA=pairs.jsonl ARGS="steps=500 lr=3e-5"': [
        "tests/test_finetune.py::test_finetune_through_the_train_entry_point"],
    'python -m gpt2_jax.train finetune init_from=path/to/gpt2 finetune_data=qa.jsonl "prompt_template=Q: {question}\\nA:" "completion_template= {answer}"': [
        "tests/test_finetune.py::test_finetune_through_the_train_entry_point",
        "tests/test_finetune_data.py::test_read_pairs_and_templates"],
    'python -m gpt2_jax.generate --model runs/finetune-... --prompt "Q: What is 3+3? A:" --greedy': [
        "tests/test_finetune.py::test_finetuned_greedy_completions_match_training"],
    "python -m gpt2_jax.train small run_dir=runs/s ckpt_every=1000 ckpt_keep=3 ckpt_keep_best=1": [
        "tests/test_checkpoint_resume.py::test_exact_resume_after_sigterm"],
    "python -m gpt2_jax.checkpoint ls runs/s": ["tests/test_checkpoint.py::test_ls_lists_steps_metrics_size_and_config"],
    # Reproduce GPT-2 124M: the downloads are the released layouts the tests write themselves.
    'hf download HuggingFaceFW/fineweb-edu --repo-type dataset --include "sample/10BT/*" --local-dir $GPT2_JAX_DATA_DIR/fineweb_edu': [
        "tests/test_data.py::test_fineweb_edu_from_parquet_with_held_out_documents"],
    "curl --create-dirs -o $GPT2_JAX_DATA_DIR/hellaswag/hellaswag_val.jsonl https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl": [
        "tests/test_eval.py::test_hellaswag_equals_an_independent_hf_computation"],
    "make prepare DATASET=fineweb_edu": ["tests/test_data.py::test_fineweb_edu_from_parquet_with_held_out_documents"],
    'make train SIZE=small_fineweb ARGS="run_dir=runs/gpt2-124m"': [
        "tests/test_train.py::test_small_fineweb_is_the_reproduction_settings", "tests/test_train.py::test_hellaswag_during_training"],
    'hf download HuggingFaceFW/fineweb --repo-type dataset --include "sample/10BT/*" --local-dir $GPT2_JAX_DATA_DIR/fineweb': [
        "tests/test_data.py::test_fineweb_from_parquet_with_held_out_documents"],
    "make prepare DATASET=fineweb": ["tests/test_data.py::test_fineweb_from_parquet_with_held_out_documents"],
    'make train SIZE=small_speedrun ARGS="run_dir=runs/speedrun"': [
        "tests/test_train.py::test_small_speedrun_is_the_speedrun_settings",
        "tests/test_train.py::test_target_val_loss_stops_saves_and_reports"],
    "python -m gpt2_jax.plot runs/gpt2-124m": ["tests/test_train.py::test_hellaswag_during_training",
                                               "tests/test_plot.py::test_hellaswag_is_a_third_panel"],
    "python -m gpt2_jax.eval --model runs/gpt2-124m --task hellaswag --compare paper": [
        "tests/test_eval.py::test_hellaswag_reference_stands_beside_the_per_token_variant",
        "tests/test_eval.py::test_every_task_end_to_end"],
    "make paper-table MODEL=runs/gpt2-124m": ["tests/test_eval.py::test_full_bytes_split_and_paper_column"],
    "python -m gpt2_jax.harness --model gpt2_jax --model_args model=runs/gpt2-124m --tasks hellaswag,arc_easy,piqa,winogrande": [
        "tests/test_harness.py::test_lm_eval_command_line"],
    'pip install -e ".[harness]"': ["tests/test_install.py::test_harness_extra_is_lm_eval"],
    # A TPU pod with a bucket: the same commands against a local GCS emulator.
    'pip install -e ".[tpu,gcs]"': ["tests/test_install.py::test_object_store_extras",
                                    "tests/test_install.py::test_accelerator_extras_name_jax_extras"],
    "python -m gpt2_jax.data prepare --dataset openwebtext --manual-dir /data --cache-dir gs://my-bucket/cache": [
        "tests/test_storage_data.py::test_prepare_uploads_shards_then_manifest",
        "tests/test_data.py::test_openwebtext_layouts_with_held_out_subsets"],
    "python -m gpt2_jax.train medium run_dir=gs://my-bucket/runs/medium dataset=gs://my-bucket/cache/tokens/openwebtext": [
        "tests/test_storage_multihost.py::test_pod_run_on_a_bucket_killed_and_resumed_exactly",
        "tests/test_storage.py::test_training_run_round_trip_on_a_bucket"],
    "python -m gpt2_jax.harness --model gpt2_jax --model_args model=runs/tiny-... --tasks hellaswag,lambada_openai --batch_size 16": [
        "tests/test_harness.py::test_lm_eval_command_line", "tests/test_harness.py::test_every_figure_equals_lm_eval_hf_backend"],
}

ENTRY_POINTS = ["config", "convert", "data", "train", "eval", "generate", "checkpoint", "plot", "harness"]


def readme_commands() -> list[str]:
    """Shell commands in the README's ```bash blocks (comments dropped, continuation lines joined)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        pending = ""
        for line in block.splitlines():
            line = (pending + " " + line.strip()).strip() if pending else line.strip()
            if line.endswith("\\") or line.count('"') % 2:  # continued, or a quoted newline
                pending = line.rstrip("\\").strip()
                continue
            pending = ""
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def test_every_readme_command_is_exercised():
    commands = readme_commands()
    assert len(commands) >= 20
    missing = [c for c in commands if c not in COVERAGE]
    assert not missing, f"README commands without a test: {missing}"
    ci = (ROOT / ".ci" / "run").read_text()
    for command in set(commands):
        for ref in COVERAGE[command]:
            if ref == ".ci/run":
                assert command in ci, f".ci/run does not run {command!r}"
                continue
            path, name = ref.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{ref} does not exist"


def test_make_commands_expand():
    """`make -n` on each README make command: every target and variable it names exists."""
    for command in readme_commands():
        if not command.startswith("make ") or command.split()[1] in ("install", "test", "test-slow"):
            continue  # installs and test runs: tests/test_install.py and .ci/run
        args = re.findall(r'(\w+="[^"]*"|\S+)', command.removeprefix("make "))
        args = [a.replace('"', "") for a in args]
        proc = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"{command}: {proc.stderr}"
        assert "-m gpt2_jax." in proc.stdout, f"{command} runs no gpt2_jax entry point: {proc.stdout}"


def test_help_of_every_entry_point():
    import sys

    # Started together: most of each one's time is importing (the machine's cores share the work).
    procs = {name: subprocess.Popen([sys.executable, "-m", f"gpt2_jax.{name}", "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name in ENTRY_POINTS}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "usage:" in out, f"gpt2_jax.{name} --help: {err[-500:]}"
