"""Training loop and entry point: `python -m gpt2_jax.train [EXPERIMENT] [key=value ...]`.

EXPERIMENT names a file in experiments/ (tiny, small, medium, large, xl) or is a path to one; its
`CONFIG = {...}` literal is read with `ast.literal_eval` (never executed). `key=value` overrides
any TrainConfig field, or a ModelConfig shape field (n_layer=6), type-checked.

Run directory (RUN_DIR, `run_dir=` or runs/EXPERIMENT-TIME): config.json (resolved train and
model configs), metrics.jsonl, tensorboard/.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gpt2_jax.config import ATTENTION_IMPLS, DTYPES, SIZES, ConfigError, ModelConfig, get_model_config, parse_overrides, replace
from gpt2_jax.data import DataError
from gpt2_jax.sharding import STRATEGIES, ShardingError

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the model's shape (that is `size` + ModelConfig)."""

    size: str = "tiny"  # model preset
    dataset: str = "tiny_shakespeare"
    seq_len: int = 0  # tokens per sequence; 0 = the model's n_ctx
    batch_size: int = 16  # sequences per optimizer step, all devices and micro-batches together
    grad_accum: int = 1  # micro-batches per step (batch_size / grad_accum run at once)
    steps: int = 300
    lr: float = 0.0  # peak learning rate; 0 = the size's default (optim.PEAK_LR)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dropout: float = 0.0  # embedding, attention and residual dropout (nanoGPT pretrains with 0)
    compute_dtype: str = "auto"  # auto = bfloat16 on GPU/TPU, float32 on CPU; params stay float32
    mesh: str = "1,-1,1"  # data,fsdp,tensor device counts; -1 = the rest
    strategy: str = "fsdp"  # dp | fsdp | fsdp_tp
    eval_every: int = 100  # steps between validation losses (and at the end); 0 = only at the end
    eval_batches: int = 0  # validation batches per evaluation; 0 = the whole split
    sample_every: int = 0  # steps between text samples; 0 = only at the end
    sample_tokens: int = 64
    sample_prompt: str = ""  # empty = start from <|endoftext|>
    top_k: int = 40  # 1 = greedy
    log_every: int = 10  # steps between lines in metrics.jsonl / TensorBoard / the console
    seed: int = 0
    run_dir: str = ""  # default runs/EXPERIMENT-YYYYmmdd-HHMMSS
    # Checkpoints in RUN_DIR/checkpoints (gpt2_jax.checkpoint), saved asynchronously every
    # ckpt_every steps, at the end and on SIGTERM/SIGINT; the latest ckpt_keep and the best
    # ckpt_keep_best by validation loss are kept. resume: continue from the newest readable one.
    resume: bool = True
    ckpt_every: int = 500  # 0 = only at the end (and when stopped by a signal)
    ckpt_keep: int = 3
    ckpt_keep_best: int = 1
    ckpt_async: bool = True
    # Fine-tuning (gpt2_jax.finetune). init_from: start from this checkpoint, run or HF GPT-2
    # directory (its shape replaces the size preset's); finetune_data: a jsonl of prompt/completion
    # pairs used instead of `dataset`, the loss counting completion tokens only; the templates
    # render each record's fields into the prompt and the completion.
    init_from: str = ""
    finetune_data: str = ""
    prompt_template: str = "{prompt}"
    completion_template: str = "{completion}"

    def __post_init__(self):
        if self.size not in SIZES:
            raise ConfigError(f"unknown size {self.size!r}; valid sizes: {', '.join(SIZES)}")
        if self.compute_dtype not in ("auto",) + DTYPES:
            raise ConfigError(f"unknown compute_dtype {self.compute_dtype!r}; valid: auto, {', '.join(DTYPES)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        for name in ("batch_size", "grad_accum", "steps", "sample_tokens", "top_k", "log_every", "ckpt_keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("seq_len", "warmup_steps", "eval_every", "eval_batches", "sample_every", "lr", "weight_decay", "grad_clip", "ckpt_every", "ckpt_keep_best"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")


# ModelConfig fields that TrainConfig sets, so that one value cannot come from two places.
_MANAGED_MODEL_KEYS = {"dtype": "compute_dtype", "embd_pdrop": "dropout", "attn_pdrop": "dropout", "resid_pdrop": "dropout"}


class TrainingError(RuntimeError):
    """A run that cannot continue (e.g. the loss became NaN)."""


# ----------------------------------------------------------------------------- configuration


def find_experiment(name: str) -> Path:
    """An experiment name (tiny, small, ...) or a path -> the experiment file."""
    if name.endswith(".py") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"experiment file {name} does not exist")
        return path
    for root in (Path.cwd(), REPO_ROOT):
        path = root / "experiments" / f"{name}.py"
        if path.is_file():
            return path
    known = sorted(p.stem for p in (REPO_ROOT / "experiments").glob("*.py") if not p.stem.startswith("_"))
    raise ConfigError(f"unknown experiment {name!r}; valid: {', '.join(known)} (or a path to an experiment file)")


def load_experiment(path: Path) -> dict[str, Any]:
    """The `CONFIG = {...}` dict literal of an experiment file, read without executing it."""
    try:
        tree = ast.parse(Path(path).read_text(), filename=str(path))
    except SyntaxError as e:
        raise ConfigError(f"{path}: not valid Python ({e.msg}, line {e.lineno})") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "CONFIG" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise ConfigError(f"{path}: CONFIG must be a literal dict of plain values") from None
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: CONFIG must be a dict")
            return value
    raise ConfigError(f"{path}: no `CONFIG = {{...}}` assignment")


def resolve_config(settings: dict[str, Any]) -> tuple[TrainConfig, ModelConfig]:
    """Split `settings` into TrainConfig and ModelConfig fields, type-checked; unknown keys refused.

    The model's compute dtype ("auto" still unresolved) and dropout come from the TrainConfig.
    """
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    train_kw, model_kw = {}, {}
    for key, value in settings.items():
        if key in _MANAGED_MODEL_KEYS:
            raise ConfigError(f"set {_MANAGED_MODEL_KEYS[key]}= instead of {key}=")
        if key in train_keys:
            train_kw[key] = value
        elif key in model_keys:
            model_kw[key] = value
        else:
            valid = sorted(train_keys) + sorted(model_keys - set(_MANAGED_MODEL_KEYS))
            raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(valid)}")
    tcfg = replace(TrainConfig(), **train_kw)
    mcfg = get_model_config(tcfg.size, **model_kw)
    mcfg = replace(mcfg, embd_pdrop=tcfg.dropout, attn_pdrop=tcfg.dropout, resid_pdrop=tcfg.dropout)
    if tcfg.seq_len > mcfg.n_ctx:
        raise ConfigError(f"seq_len={tcfg.seq_len} exceeds the model context n_ctx={mcfg.n_ctx}")
    return tcfg, mcfg


def resolve_dtype(tcfg: TrainConfig, mcfg: ModelConfig) -> ModelConfig:
    """Fill in compute_dtype=auto: bfloat16 on GPU/TPU, float32 on CPU (XLA:CPU bf16 matmuls are slow)."""
    import jax

    dtype = tcfg.compute_dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return replace(mcfg, dtype=dtype)


# ----------------------------------------------------------------------------- data


def load_data(tcfg: TrainConfig, seq_len: int, eval_batch_size: int) -> tuple[Iterator[np.ndarray], list[dict[str, np.ndarray]]]:
    """(this process's training batches [rows, seq_len+1], its share of the validation batches).

    The token store is built by `gpt2_jax.data.prepare` (idempotent; process 0 first, so processes
    never build it concurrently). `eval_batch_size` counts rows of all processes together.
    """
    import jax

    from gpt2_jax import data

    n, i = jax.process_count(), jax.process_index()
    if i == 0:
        store = data.prepare(tcfg.dataset)
    if n > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("gpt2_jax data prepared")
    if i != 0:
        store = data.prepare(tcfg.dataset, progress=False)
    train = data.TrainLoader(
        store, "train", seq_len=seq_len, batch_size=tcfg.batch_size // n, seed=tcfg.seed, shard_index=i, shard_count=n
    )
    val = list(
        data.eval_batches(
            store, "validation", seq_len=seq_len, batch_size=eval_batch_size // n,
            max_batches=tcfg.eval_batches or None, shard_index=i, shard_count=n,
        )
    )
    return train, val


# ----------------------------------------------------------------------------- sampling


def make_sampler(mcfg: ModelConfig, mesh, rules, n_new: int, top_k: int):
    """A jitted `sample(params, buf [1, n_ctx], prompt_len, key) -> buf` that appends `n_new` tokens.

    Each token is one full forward over the fixed-size buffer (simple; no key/value cache).
    """
    import jax
    import jax.numpy as jnp

    from gpt2_jax.model import GPT2
    from gpt2_jax.sharding import sharded_jit

    model = GPT2(mcfg)
    rules = tuple((k, None if k == "act_batch" else v) for k, v in rules)  # a batch of one row

    def sample(params, buf_1T, prompt_len, key):
        def body(i, buf_1T):
            pos = prompt_len + i - 1
            logits_V = model.apply({"params": params}, buf_1T)[0, pos]
            if top_k > 1:
                kth = jax.lax.top_k(logits_V, top_k)[0][-1]
                logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
                tok = jax.random.categorical(jax.random.fold_in(key, i), logits_V)
            else:
                tok = jnp.argmax(logits_V)
            return jax.lax.dynamic_update_slice(buf_1T, tok.astype(jnp.int32).reshape(1, 1), (0, pos + 1))

        return jax.lax.fori_loop(0, n_new, body, buf_1T)

    return sharded_jit(sample, mesh, rules)


def sample_text(sampler, params, mcfg: ModelConfig, prompt: str, n_new: int, seed: int) -> str:
    """Continue `prompt` (empty = from <|endoftext|>) with up to `n_new` sampled tokens."""
    import jax

    from gpt2_jax.tokenizer import get_tokenizer

    tok = get_tokenizer()
    ids = tok.encode_ordinary(prompt) if prompt else [tok.eot_token]
    ids = ids[-(mcfg.n_ctx - n_new) :]
    buf = np.zeros((1, mcfg.n_ctx), np.int32)
    buf[0, : len(ids)] = ids
    out = np.asarray(jax.device_get(sampler(params, buf, len(ids), jax.random.key(seed))))
    new = [int(t) for t in out[0, len(ids) : len(ids) + n_new]]
    return prompt + tok.decode([t for t in new if t < tok.n_vocab])


# ----------------------------------------------------------------------------- logging


class MetricsWriter:
    """metrics.jsonl and TensorBoard event files in the run directory (process 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the loop


def resume(tcfg: TrainConfig, mcfg: ModelConfig, ckpt, target, train_batches, echo):
    """`(state, restored)`: the run's newest readable checkpoint restored onto `target` (a tree of
    ShapeDtypeStructs with shardings), the data iterator moved to where it was; `(None, None)`
    when the run has no checkpoint yet."""
    from gpt2_jax import checkpoint

    steps = ckpt.steps()
    if not steps:
        return None, None
    if not tcfg.resume:
        raise ConfigError(f"{ckpt.directory} already holds checkpoints (steps {steps}); resume=true continues that run, or choose another run_dir=")
    restored = ckpt.restore_latest(target)
    if restored is None:
        raise TrainingError(f"no checkpoint in {ckpt.directory} could be restored (see above)")
    saved = (restored.config or {}).get("model", {})
    keys = ("n_layer", "n_embd", "n_head", "n_ctx", "vocab_size", "pad_vocab_multiple", "scan_layers")
    diff = [f"{k}={saved[k]} (now {getattr(mcfg, k)})" for k in keys if k in saved and saved[k] != getattr(mcfg, k)]
    if diff:
        raise ConfigError(f"checkpoint step {restored.step} in {ckpt.directory} has another model shape: {', '.join(diff)}")
    if restored.data_states:
        try:
            train_batches.set_state(restored.data_state)
        except (checkpoint.CheckpointError, DataError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"cannot resume the data iterator of checkpoint step {restored.step}: {e}") from None
    echo(f"resumed from checkpoint step {restored.step} in {ckpt.directory}" + (" (init_from= ignored)" if tcfg.init_from else ""))
    return restored.state, restored


def evaluate(eval_step, params, batches, mesh) -> float:
    """Mean validation loss over `batches` (weights from each batch's "mask")."""
    from gpt2_jax.sharding import bounded, shard_batch

    loss_sum = weight = 0.0
    for t in bounded(lambda b: eval_step(params, shard_batch(b, mesh)), batches):
        loss_sum += float(t["loss_sum"])
        weight += float(t["weight"])
    return loss_sum / max(weight, 1.0)


def train(tcfg: TrainConfig, mcfg: ModelConfig, run_dir: Path, *, echo=print) -> dict[str, Any]:
    """Train; returns the final record (step, loss, val_loss, sample, tokens_per_s)."""
    import jax
    from tqdm import tqdm

    from gpt2_jax import attention, checkpoint, costs, finetune, optim, sharding, step as step_lib

    is_main = jax.process_index() == 0
    mcfg = resolve_dtype(tcfg, mcfg)
    # A run that resumes restores its own checkpoint: the weights of init_from= are not read then.
    resuming = tcfg.resume and bool(checkpoint.complete_steps(run_dir / checkpoint.CHECKPOINTS_DIR))
    init_params = None
    if tcfg.init_from and resuming:
        mcfg = finetune.init_config(tcfg.init_from, mcfg)
    elif tcfg.init_from:
        mcfg, init_params = finetune.load_init(tcfg.init_from, mcfg)
    seq_len = tcfg.seq_len or mcfg.n_ctx
    if seq_len > mcfg.n_ctx:
        raise ConfigError(f"seq_len={seq_len} exceeds the model context n_ctx={mcfg.n_ctx}")
    attn = attention.resolve(mcfg, jax.devices()[0], seq_len)
    mcfg = replace(mcfg, attention=attn.impl)  # recorded in config.json as chosen
    mesh = sharding.make_mesh(tcfg.mesh)
    rules = sharding.logical_rules(tcfg.strategy, mesh, mcfg)
    sharding.check_batch(tcfg.batch_size, tcfg.grad_accum, mesh)
    micro = tcfg.batch_size // tcfg.grad_accum
    if micro % jax.process_count():
        raise ShardingError(f"micro-batch of {micro} sequences does not divide over {jax.process_count()} processes")
    if tcfg.finetune_data:
        train_batches, val_batches, seq_len = finetune.load_data(tcfg, mcfg, micro)
    else:
        train_batches, val_batches = load_data(tcfg, seq_len, micro)

    peak = tcfg.lr or optim.PEAK_LR[tcfg.size]
    schedule = optim.lr_schedule(peak, tcfg.warmup_steps, tcfg.steps, tcfg.min_lr_ratio)
    tx = optim.make_optimizer(
        schedule, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps, weight_decay=tcfg.weight_decay, grad_clip=tcfg.grad_clip
    )

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", {"model": mcfg.to_dict(), "train": dataclasses.asdict(tcfg)})
    writer = MetricsWriter(run_dir, is_main)

    abstract, shardings = step_lib.state_shardings(mcfg, tx, mesh, rules)
    if mesh.size > 1:
        sharding.check_params_sharded(shardings.params, tcfg.strategy, shapes=abstract.params)
    ckpt = checkpoint.Checkpointer(
        run_dir, checkpoint.CheckpointOptions(tcfg.ckpt_every, tcfg.ckpt_keep, tcfg.ckpt_keep_best, tcfg.ckpt_async)
    )
    # Restored straight onto the shardings, or created there: the state is never in memory twice.
    state, restored = resume(tcfg, mcfg, ckpt, abstract, train_batches, echo if is_main else lambda *_: None)
    if restored is None:
        state, _ = step_lib.init_train_state_sharded(mcfg, tx, tcfg.seed, mesh, rules, init_params)
        del init_params
    run_config = {"model": mcfg.to_dict(), "train": dataclasses.asdict(tcfg)}
    val_at: dict[int, float] = {}
    train_step = step_lib.compile_train_step(mcfg, tx, schedule, tcfg.grad_accum, mesh, rules, shardings)
    eval_step = step_lib.compile_eval_step(mcfg, mesh, rules, shardings.params)
    n_new = min(tcfg.sample_tokens, mcfg.n_ctx - 1)
    sampler = make_sampler(mcfg, mesh, rules, n_new, tcfg.top_k)

    tokens_per_step = tcfg.batch_size * seq_len
    fpt = costs.flops_per_token(mcfg, seq_len)
    peak_device = costs.peak_flops(jax.devices()[0])
    start_step = int(jax.device_get(state.step))
    if is_main:
        echo(
            f"training {tcfg.size} ({mcfg.n_layer}x{mcfg.n_embd}, {mcfg.n_head} heads, {mcfg.dtype}) on "
            f"{jax.device_count()} {jax.devices()[0].device_kind} device(s), mesh {dict(mesh.shape)}, "
            f"{tcfg.strategy}; {tcfg.steps} steps of {tcfg.batch_size} x {seq_len} tokens; run dir {run_dir}"
        )
        undivided = sharding.tensor_undivided(mcfg, mesh) if tcfg.strategy == "fsdp_tp" else {}
        if undivided:
            echo(
                f"warning: tensor={mesh.shape['tensor']} does not divide {', '.join(undivided.values())}: "
                "those stay whole and are computed on every tensor rank (choose a tensor size that divides them)"
            )
        echo(f"attention: {attn}" + (" (attention dropout runs on xla)" if mcfg.attn_pdrop > 0 and attn.impl != "xla" else ""))

    final: dict[str, Any] = {}
    last = {"time": None, "step": start_step}
    rate = {"tokens_per_s": float("nan")}

    def record(step: int, metrics) -> None:
        """Bring one step's metrics to the host, check them, log them."""
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(m["loss"]):
            raise TrainingError(f"loss is {m['loss']} at step {step + 1}; stopping (try a lower lr= or a longer warmup_steps=)")
        now = time.perf_counter()
        if last["time"] is not None and step > last["step"]:
            rate["tokens_per_s"] = (step - last["step"]) * tokens_per_step / (now - last["time"])
        if last["time"] is None or step > last["step"]:
            last.update(time=now, step=step)
        m["tokens_seen"] = (step + 1) * tokens_per_step
        m["tokens_per_s"] = rate["tokens_per_s"]
        postfix = {"loss": f"{m['loss']:.3f}", "tok/s": f"{m['tokens_per_s']:,.0f}"}
        if peak_device and math.isfinite(m["tokens_per_s"]):
            m["mfu"] = m["tokens_per_s"] / jax.device_count() * fpt / peak_device
            postfix["mfu"] = f"{100 * m['mfu']:.1f}%"
        bar.set_postfix(postfix, refresh=False)
        final.update(step=step + 1, loss=m["loss"], tokens_per_s=m["tokens_per_s"])
        if (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps:
            writer.write(step + 1, m)
            if is_main:
                bar.write(
                    f"step {step + 1:>6} | loss {m['loss']:.4f} | grad norm {m['grad_norm']:.3f} | "
                    f"lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s" + (f" | MFU {100 * m['mfu']:.1f}%" if "mfu" in m else "")
                )

    def validate_and_sample(done: int, force: bool) -> None:
        if force or (tcfg.eval_every and done % tcfg.eval_every == 0):
            val_loss = evaluate(eval_step, state.params, val_batches, mesh)
            writer.write(done, {"val_loss": val_loss})
            final["val_loss"] = val_at[done] = val_loss
            if is_main:
                bar.write(f"step {done:>6} | val loss {val_loss:.4f}")
        if force or (tcfg.sample_every and done % tcfg.sample_every == 0):
            text = sample_text(sampler, state.params, mcfg, tcfg.sample_prompt, n_new, tcfg.seed + done)
            writer.text(done, "sample", text)
            final["sample"] = text
            if is_main:
                bar.write(f"step {done:>6} | sample:\n{text}\n")

    def save(done: int) -> None:
        metrics = {"loss": final["loss"]} if "loss" in final else {}
        if done in val_at:
            metrics[checkpoint.BEST_METRIC] = val_at[done]
        if ckpt.save(done, state, data_state=train_batches.get_state(), config=run_config, metrics=metrics) and is_main:
            bar.write(f"step {done:>6} | saving checkpoint to {ckpt.directory / str(done)}")

    bar = tqdm(range(start_step, tcfg.steps), desc="train", unit="step", disable=not is_main, dynamic_ncols=True)
    pending = None
    guard = checkpoint.PreemptionGuard(ckpt).__enter__()  # SIGTERM/SIGINT: stop after this step
    try:
        for step in bar:
            batch = next(train_batches)  # fine-tuning batches are dicts with a "mask"
            batch = sharding.shard_batch(batch if isinstance(batch, dict) else {"tokens": batch}, mesh)
            state, metrics = train_step(state, batch)  # dispatch step t ...
            if pending is not None:
                record(*pending)  # ... then read step t-1's metrics while t runs
            pending = (step, metrics)
            done = step + 1
            if done < tcfg.steps and (
                (tcfg.eval_every and done % tcfg.eval_every == 0) or (tcfg.sample_every and done % tcfg.sample_every == 0)
            ):
                record(*pending)
                pending = None
                validate_and_sample(done, force=False)
            stop = guard.stop(done)  # every step, on every host (a sync point on multi-host runs)
            if done < tcfg.steps and (stop or ckpt.should_save(done)):
                if pending is not None:
                    record(*pending)  # a NaN loss stops here, before the state is saved
                    pending = None
                save(done)
                if stop:
                    final["stopped"] = guard.signal_name or "preemption"
                    break
        if pending is not None:
            record(*pending)
        if "stopped" not in final:
            validate_and_sample(tcfg.steps, force=True)
            save(tcfg.steps)
    except TrainingError as e:
        ckpt.wait()
        last = ckpt.latest_step()
        raise TrainingError(f"{e}; last good checkpoint: " + (f"step {last} in {ckpt.directory}" if last else "none")) from None
    finally:
        guard.__exit__()
        ckpt.close()
        bar.close()
        writer.close()
    saved_step = final.get("step", start_step)
    if saved_step not in ckpt.steps():
        last = ckpt.latest_step()
        raise TrainingError(
            f"the checkpoint of step {saved_step} was not saved (see above); the newest saved checkpoint is "
            + (f"step {last} in {ckpt.directory}" if last else "none")
        )
    if is_main:
        write_json_atomic(run_dir / "final.json", {k: v for k, v in final.items()})
    return final


# ----------------------------------------------------------------------------- CLI


def _default_run_dir(experiment: str) -> Path:
    import jax

    stamp = int(time.time())
    if jax.process_count() > 1:  # every process must agree on the directory
        from jax.experimental import multihost_utils

        stamp = int(multihost_utils.broadcast_one_to_all(np.int64(stamp)))
    return Path("runs") / f"{Path(experiment).stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(stamp))}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_jax.train",
        description="Train GPT-2 on a device mesh. Example: python -m gpt2_jax.train small steps=1000 mesh=1,-1,1",
        epilog="TrainConfig keys (default): "
        + ", ".join(f"{f.name} ({f.default!r})" for f in dataclasses.fields(TrainConfig))
        + ". ModelConfig keys (dataclass default; the size preset sets the shape): "
        + ", ".join(f"{f.name} ({f.default!r})" for f in dataclasses.fields(ModelConfig) if f.name not in _MANAGED_MODEL_KEYS)
        + f". attention is one of {', '.join(ATTENTION_IMPLS)}: auto takes cuDNN flash attention on NVIDIA GPUs"
        " (bfloat16/float16) and the Pallas splash kernel on TPUs, XLA elsewhere; the choice is printed and"
        " recorded in config.json.",
    )
    parser.add_argument(
        "experiment", nargs="?", default="tiny",
        help="experiment name in experiments/ (tiny, small, medium, large, xl) or path to an experiment file (default tiny)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="override a TrainConfig field (steps=100, lr=3e-4, mesh=2,4,1, ...) or a model shape field (n_layer=6)",
    )
    parser.add_argument("--coordinator", help="host:port of process 0, for multi-process runs without a cluster launcher")
    parser.add_argument("--num-processes", type=int, help="number of processes in a multi-process run")
    parser.add_argument("--process-id", type=int, help="this process's index in a multi-process run")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if "=" in args.experiment:  # only overrides were given
        overrides.insert(0, args.experiment)
        args.experiment = "tiny"

    try:
        settings = load_experiment(find_experiment(args.experiment))
        settings.update(parse_overrides(overrides))
        tcfg, mcfg = resolve_config(settings)
        from gpt2_jax import sharding

        sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        import jax

        mesh = sharding.make_mesh(tcfg.mesh)  # fail fast on a bad mesh or batch
        sharding.check_batch(tcfg.batch_size, tcfg.grad_accum, mesh)
        run_dir = Path(tcfg.run_dir) if tcfg.run_dir else _default_run_dir(args.experiment)
        final = train(tcfg, mcfg, run_dir)
    except (ConfigError, ShardingError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, OSError) as e:  # OSError: e.g. a run directory that is not writable
        print(f"error: {e}", file=sys.stderr)
        return 1
    if final.get("stopped"):
        if jax.process_index() == 0:
            again = list(argv if argv is not None else sys.argv[1:])
            if not tcfg.run_dir:
                again.append(f"run_dir={run_dir}")
            print(
                f"stopped by {final['stopped']} after step {final['step']}; checkpoint saved in {run_dir / 'checkpoints'}. "
                f"To resume: python -m gpt2_jax.train {shlex.join(again)}"
            )
        return 0
    if jax.process_index() == 0:
        summary = f"done: {final['step']} steps, loss {final['loss']:.4f}"
        if "val_loss" in final:
            summary += f", val loss {final['val_loss']:.4f}"
        print(summary + f"; run dir {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
