"""The training loop: a sharded train step, and the periodic work around it registered as hooks.

`train` checks and plans everything it can before it touches the run directory (the model's
config, the data, the memory, the compiled step), then holds the directory (`gpt2_jax.run_dir`:
what each of its files is), resumes or initializes the state, and runs the steps.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from gpt2_jax import attention, checkpoint, costs, data, finetune, memory, run_dir as run_dir_lib, sharding, step as step_lib, weights
from gpt2_jax.config import ConfigError, ModelConfig, fields_where, replace
from gpt2_jax.data import DataError
from gpt2_jax.eval import tasks as eval_tasks
from gpt2_jax.eval.scoring import Scorer
from gpt2_jax.generate import Generator, SamplingConfig
from gpt2_jax.metrics import MetricsWriter
from gpt2_jax.tokenizer import get_tokenizer
from gpt2_jax.train.config import TrainConfig, TrainingError, resolve_dtype
from gpt2_jax.train.hooks import Hooks, Meter
from gpt2_jax.train.plan import Plan, dry_run_report, make_plan
from gpt2_jax.train.preemption import Interrupted, PreemptionGuard
from gpt2_jax.train.watchdog import Watchdog


def prepare_store(tcfg: TrainConfig):
    """The token store of `dataset=`, built by `gpt2_jax.data.prepare` (idempotent; process 0
    first, so processes never build it concurrently), or a finished one named by its location (a
    path, or a gs:// or s3:// URL: a pod prepares once and every host reads only its windows)."""
    n, i = jax.process_count(), jax.process_index()
    try:
        if i == 0:
            store = data.prepare(tcfg.dataset)
        if n > 1:
            multihost_utils.sync_global_devices("gpt2_jax data prepared")
        if i != 0:
            store = data.prepare(tcfg.dataset, progress=False)
    except DataError as e:
        raise _named(tcfg, e) from None
    return store


def _named(tcfg: TrainConfig, e: DataError) -> DataError:
    """The error with the setting named: "dataset=URL: ..." rather than "URL: ..."."""
    return DataError(f"dataset={tcfg.dataset}: {str(e).removeprefix(f'{tcfg.dataset}: ')}")


def load_data(tcfg: TrainConfig, seq_len: int, eval_batch_size: int, store=None) -> tuple[Iterator[np.ndarray], list[dict[str, np.ndarray]]]:
    """(this process's training batches [rows, seq_len+1], its share of the validation batches) of
    `store` (default: `prepare_store`). `eval_batch_size` counts rows of all processes together."""
    n, i = jax.process_count(), jax.process_index()
    store = prepare_store(tcfg) if store is None else store
    try:
        train = data.TrainLoader(
            store, "train", seq_len=seq_len, batch_size=tcfg.batch_size, seed=tcfg.seed, shard_index=i, shard_count=n
        )
        val = list(
            data.eval_batches(
                store, "validation", seq_len=seq_len, batch_size=eval_batch_size // n,
                max_batches=tcfg.eval_batches or None, shard_index=i, shard_count=n,
            )
        )
    except DataError as e:
        raise _named(tcfg, e) from None
    return train, val


def load_hellaswag(tcfg: TrainConfig) -> list[eval_tasks.HellaSwagItem]:
    """The HellaSwag items `hellaswag_every=` scores (the first `hellaswag_limit`), read by the
    evaluation's own reader from the data directory; none when it is off."""
    if not tcfg.hellaswag_every:
        return []
    _, root = data.resolve_dirs()
    try:
        return eval_tasks.hellaswag_items(tcfg.hellaswag_limit or None, root)
    except eval_tasks.EvalError as e:
        raise ConfigError(f"hellaswag_every={tcfg.hellaswag_every}: {e}") from None


def model_config(tcfg: TrainConfig, mcfg: ModelConfig) -> tuple[ModelConfig, int, attention.Choice]:
    """(the model config the run trains, its sequence length, its attention): the compute dtype
    resolved, init_from='s shape, the platform's attention implementation."""
    mcfg = resolve_dtype(tcfg, mcfg)
    if tcfg.init_from:
        try:
            mcfg = weights.run_config(tcfg.init_from, mcfg)
        except checkpoint.CheckpointError as e:
            raise ConfigError(f"init_from={tcfg.init_from}: {e}") from None
    seq_len = tcfg.seq_len or mcfg.n_ctx
    if seq_len > mcfg.n_ctx:
        raise ConfigError(f"seq_len={seq_len} exceeds the model context n_ctx={mcfg.n_ctx}")
    attn = attention.resolve(mcfg, jax.devices()[0], seq_len)
    return replace(mcfg, attention=attn.impl), seq_len, attn


# What a resume may change: how the run is laid out and driven (mesh and strategy: the checkpoint is
# resharded; grad_accum, the learning-rate schedule and steps, dropout, compute dtype, remat,
# attention, and the eval/sample/log/checkpoint periods). What it may not (`resume_keeps` in the
# configs' field metadata): the model's shape and parameter layout (the saved arrays would not fit)
# and the order of the data (data set, batch size, sequence length, seed): the data iterator's
# saved position means nothing under other settings.
FIXED_MODEL_KEYS = fields_where(ModelConfig, resume_keeps=True)
FIXED_TRAIN_KEYS = tuple(k for k in fields_where(TrainConfig, resume_keeps=True) if k != "seq_len")  # seq_len: below


def resume_differences(saved: dict, tcfg: TrainConfig, mcfg: ModelConfig) -> list[str]:
    """The settings of a checkpoint's run (`saved`: its run config) that this run may not change."""
    model, train_ = saved.get("model") or {}, saved.get("train") or {}
    out = [f"{k}={model[k]} (now {getattr(mcfg, k)})" for k in FIXED_MODEL_KEYS if k in model and model[k] != getattr(mcfg, k)]
    out += [f"{k}={train_[k]!r} (now {getattr(tcfg, k)!r})" for k in FIXED_TRAIN_KEYS if k in train_ and train_[k] != getattr(tcfg, k)]
    if "seq_len" in train_ and "n_ctx" in model:  # 0 means the model's context: compare what is used
        then, now = train_["seq_len"] or model["n_ctx"], tcfg.seq_len or mcfg.n_ctx
        if then != now:
            out.append(f"seq_len={then} (now {now})")
    return out


def resume(tcfg: TrainConfig, mcfg: ModelConfig, ckpt, target, train_batches, echo):
    """`(state, restored)`: the run's newest readable checkpoint restored onto `target` (a tree of
    ShapeDtypeStructs with shardings), the data iterator moved to where it was; `(None, None)`
    when the run has no checkpoint yet. A checkpoint of another kind of run is refused before
    anything is read or changed (ConfigError)."""
    steps = ckpt.steps()
    if not steps:
        return None, None
    if not tcfg.resume:
        raise ConfigError(f"{ckpt.directory} already holds checkpoints (steps {steps}); resume=true continues that run, or choose another run_dir=")
    try:
        restored = ckpt.restore_latest(target, check=lambda saved: resume_differences(saved, tcfg, mcfg))
    except checkpoint.IncompatibleCheckpoint as e:
        raise ConfigError(str(e)) from None
    if restored is None:
        raise TrainingError(f"no checkpoint in {ckpt.directory} could be restored (see above)")
    if restored.data_states:
        try:
            train_batches.set_state(restored.data_state)
        except (checkpoint.CheckpointError, DataError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"cannot resume the data iterator of checkpoint step {restored.step}: {e}") from None
    echo(f"resumed from checkpoint step {restored.step} in {ckpt.directory}" + (" (init_from= ignored)" if tcfg.init_from else ""))
    return restored.state, restored


def validation_loss(eval_step, params, batches, mesh) -> float:
    """Mean validation loss over `batches` (weights from each batch's "mask"); the evaluation
    report of a model on tasks is `gpt2_jax.eval.evaluate`."""
    loss_sum = weight = 0.0
    for t in sharding.bounded(lambda b: eval_step(params, sharding.shard_batch(b, mesh)), batches):
        loss_sum += float(t["loss_sum"])
        weight += float(t["weight"])
    return loss_sum / max(weight, 1.0)


def sample_text(mcfg: ModelConfig, params, place: sharding.Placement, tcfg: TrainConfig, seed: int,
                between: Callable[[], None] | None = None) -> str:
    """`tcfg.sample_prompt` (empty: <|endoftext|>) continued by `tcfg.sample_tokens` tokens, with
    generation's KV-cached decode on the training placement (top-k 1 is greedy). With `between`,
    the tokens are decoded in chunks and `between()` is called before each (it may raise to cut
    the sampling short)."""
    tok = get_tokenizer()
    n_new = min(tcfg.sample_tokens, mcfg.n_ctx - 1)
    ids = tok.encode_ordinary(tcfg.sample_prompt) if tcfg.sample_prompt else [tok.eot_token]
    sampling = SamplingConfig(max_new_tokens=n_new, greedy=tcfg.top_k == 1, top_k=0 if tcfg.top_k == 1 else tcfg.top_k, eot_id=None)
    result = Generator(mcfg, params, place).generate_tokens([ids], sampling, seed=seed, truncate="left", between=between)
    return tcfg.sample_prompt + tok.decode(result.rows()[0])


@dataclasses.dataclass
class Progress:
    """What the run has to report: the final record, the validation loss of each evaluated step, and
    its training time (the steps' wall clock since this start, periodic work excluded)."""

    final: dict[str, Any] = dataclasses.field(default_factory=dict)
    val_at: dict[int, float] = dataclasses.field(default_factory=dict)
    stopping: str | None = None  # the signal that asked the run to stop
    reached: bool = False  # a validation loss reached target_val_loss: the run stops after this step's work
    started: float = 0.0  # time.perf_counter() when the steps began
    periodic_s: float = 0.0  # seconds of periodic work (validation, HellaSwag, samples, saves) since then

    def train_seconds(self) -> float:
        return time.perf_counter() - self.started - self.periodic_s


class PeriodicWork:
    """The bodies of the training loop's hooks, and their registration with each one's period.

    They share the run's metrics writer, console and `Progress`; each takes (finished steps, state).
    The watchdog does not count periodic work. On several processes, a stop agreed during a
    validation, HellaSwag scoring or sampling cuts it short (at the same batch or chunk of tokens
    everywhere), and what is left of the step's periodic work is skipped for the save.
    """

    def __init__(self, tcfg, mcfg, place, *, run_dir, run_config, ckpt, guard, watchdog, eval_step, val_batches, train_batches, write,
                 resumed_from, tokens_per_step, hellaswag=()):
        self.tcfg, self.mcfg, self.place, self.tokens_per_step, self.resumed_from = tcfg, mcfg, place, tokens_per_step, resumed_from
        self.run_config, self.ckpt, self.guard, self.watchdog, self.write = run_config, ckpt, guard, watchdog, write
        self.eval_step, self.val_batches, self.train_batches = eval_step, val_batches, train_batches
        self.hellaswag, self.scorer = list(hellaswag), None
        self.writer = MetricsWriter(run_dir, jax.process_index() == 0, resumed_from)
        self.progress = Progress()

    def hooks(self, before) -> Hooks:
        """The loop's hooks, in the order they run; `before` reads the step's metrics first."""
        t = self.tcfg
        hooks = Hooks(before=before)
        hooks.add("preemption", self.periodic(self.check_preemption), every=1, at_end=False, reads_metrics=False)
        hooks.add("eval", self.periodic(self.validate, cut="the validation"), every=t.eval_every)
        if self.hellaswag:
            hooks.add("hellaswag", self.periodic(self.score_hellaswag, cut="HellaSwag scoring"), every=t.hellaswag_every)
        hooks.add("sample", self.periodic(self.sample, cut="sampling"), every=t.sample_every)
        hooks.add("save", self.periodic(self.save), every=t.ckpt_every,
                  when=lambda: self.progress.stopping is not None or self.progress.reached)
        return hooks

    def periodic(self, fn, cut: str = ""):
        """`fn` as periodic work, not counted by the watchdog; `cut` names work that a pod's agreed
        stop cuts short (or skips, once the run is stopping) so that the step is saved at once."""
        def run(done: int, state) -> None:
            if cut and self.guard.pod is not None and self.progress.stopping:
                return
            start = time.perf_counter()
            with self.watchdog.paused():
                try:
                    fn(done, state)
                except Interrupted:
                    self.progress.stopping = self.guard.reason
                    self.write(f"step {done:>6} | {self.guard.reason}: {cut} cut short, saving this step")
                finally:
                    self.progress.periodic_s += time.perf_counter() - start
        return run

    def metric_hooks(self) -> Hooks:
        """Hooks on each step's metrics, once they are on the host (one step behind the device)."""
        hooks = Hooks()
        hooks.add("progress", self.record, every=1)
        hooks.add("log", self.log, every=self.tcfg.log_every)
        return hooks

    def check_preemption(self, done: int, _) -> None:  # every step, on every host (a sync point on multi-host runs)
        if self.guard.stop(done):
            self.progress.stopping = self.guard.reason or "preemption"

    def validate(self, done: int, state) -> None:
        batches = self.val_batches if self.guard.pod is None else self._polled(self.val_batches)
        val_loss = validation_loss(self.eval_step, state.params, batches, self.place.mesh)
        self.progress.final["val_loss"] = self.progress.val_at[done] = val_loss
        self.writer.write(done, {"val_loss": val_loss})
        self.write(f"step {done:>6} | val loss {val_loss:.4f}")
        target = self.tcfg.target_val_loss
        if target and val_loss <= target and not self.progress.reached:
            # Every process computed the same loss (sums reduced over all devices), so every process
            # decides to stop at this same step without a further exchange.
            self.progress.reached = True
            seconds = self.progress.train_seconds()  # this validation's time is not yet counted
            tokens = done * self.tokens_per_step
            self.progress.final["target_val_loss"] = {
                "target": target, "val_loss": val_loss, "step": done, "tokens": tokens, "train_seconds": round(seconds, 3),
                "since_step": self.resumed_from,
            }
            since = f" since the resume at step {self.resumed_from}" if self.resumed_from else ""
            self.write(
                f"step {done:>6} | target_val_loss={target:g} reached (val loss {val_loss:.4f}): {tokens:,} tokens, "
                f"{seconds:,.1f} s of training{since} (evaluation, sampling and saving not counted); saving and stopping"
            )

    def _polled(self, batches):
        """`batches`, the pod's agreed stop polled before each (it may fall inside a validation)."""
        for batch in batches:
            self.guard.cut()
            yield batch

    def score_hellaswag(self, done: int, state) -> None:
        """HellaSwag's three accuracies (in %) of the current weights, scored on the training placement."""
        if self.scorer is None:  # compiled once; later calls score the weights of their step
            rows = self.tcfg.batch_size // max(1, self.tcfg.grad_accum)  # a micro-batch: known to fit
            self.scorer = Scorer(self.mcfg, state.params, batch_size=rows, placement=self.place)
            self.scorer.between = self.guard.cut if self.guard.pod is not None else None
        else:
            self.scorer.use_params(state.params)
        result = eval_tasks.score_hellaswag(self.scorer, self.hellaswag)
        metrics = {f"hellaswag_{k}": v for k, v in result["metrics"].items()}
        self.progress.final.update(metrics)
        self.writer.write(done, metrics)
        self.write(f"step {done:>6} | hellaswag ({len(self.hellaswag)} items) " + " | ".join(f"{k} {v:.2f}%" for k, v in result["metrics"].items()))

    def sample(self, done: int, state) -> None:
        between = self.guard.cut if self.guard.pod is not None else None  # a pod's agreed stop may fall inside
        text = self.progress.final["sample"] = sample_text(self.mcfg, state.params, self.place, self.tcfg, self.tcfg.seed + done, between)
        self.writer.text(done, "sample", text)
        self.write(f"step {done:>6} | sample:\n{text}\n")

    def save(self, done: int, state) -> None:
        final = self.progress.final
        metrics = {"loss": final["loss"]} if "loss" in final else {}
        if done in self.progress.val_at:
            metrics[checkpoint.BEST_METRIC] = self.progress.val_at[done]
        if self.ckpt.save(done, state, data_state=self.train_batches.get_state(), config=self.run_config, metrics=metrics):
            self.write(f"step {done:>6} | saving checkpoint to {self.ckpt.directory / str(done)}")
        self.writer.flush()  # on an object store, the records up to this checkpoint are in metrics.jsonl

    def record(self, done: int, m: dict[str, float]) -> None:
        self.progress.final.update(step=done, loss=m["loss"], tokens_per_s=m["tokens_per_s"])

    def log(self, done: int, m: dict[str, float]) -> None:
        self.writer.write(done, m)
        self.write(
            f"step {done:>6} | loss {m['loss']:.4f} | grad norm {m['grad_norm']:.3f} | lr {m['lr']:.2e} | "
            f"{m['tokens_per_s']:,.0f} tok/s" + (f" | MFU {100 * m['mfu']:.1f}%" if "mfu" in m else "")
        )


def train(tcfg: TrainConfig, mcfg: ModelConfig, run_dir: Path, *, echo=print, dry_run: bool = False) -> dict[str, Any]:
    """Train; returns the final record (step, loss, val_loss, sample, tokens_per_s). With `dry_run`,
    stop once the step is planned and compiled (nothing allocated, nothing written) and print the plan.

    Everything that can refuse the run is checked before the run directory is touched, and a start
    that fails later leaves the directory as it found it (`run_dir.hold`)."""
    say = echo if jax.process_index() == 0 else (lambda *_: None)
    mcfg, seq_len, attn = model_config(tcfg, mcfg)
    examples = None
    if tcfg.finetune_data:  # the step is compiled for the fine-tuning examples' length
        examples, seq_len = finetune.read_examples(tcfg, mcfg)
    hellaswag = load_hellaswag(tcfg)  # a missing file stops the run before anything is compiled
    say(f"memory estimate: {preflight(tcfg, mcfg, seq_len)}")  # before anything is built or written
    store = None if dry_run or examples is not None else prepare_store(tcfg)  # an unreachable store: refused now
    plan = make_plan(tcfg, mcfg, seq_len)  # grad_accum and remat_policy resolved, the step compiled
    say(f"micro-batch: {plan.describe()}")
    if dry_run:
        say(dry_run_report(plan))
        return {"dry_run": True, "grad_accum": plan.tcfg.grad_accum, "remat_policy": plan.mcfg.remat_policy, "bytes": plan.bytes}
    micro = plan.tcfg.batch_size // plan.tcfg.grad_accum
    if examples is not None:
        batches = finetune.load_data(plan.tcfg, examples, seq_len, micro)
    else:
        batches = load_data(plan.tcfg, seq_len, micro, store)
    with run_dir_lib.hold(run_dir, say) as run:
        return _train(plan, attn, run, say, hellaswag, batches)


def preflight(tcfg: TrainConfig, mcfg: ModelConfig, seq_len: int) -> memory.Estimate:
    """The memory a step needs per device, from the shapes alone; refused when it cannot fit even
    in the most favourable setting that auto could choose (one sequence per device, full remat)."""
    data, fsdp, tensor = sharding.resolve_mesh_shape(tcfg.mesh, jax.device_count())
    shards = {"dp": 1, "fsdp": fsdp, "fsdp_tp": fsdp * tensor}[tcfg.strategy]
    rows = max(1, tcfg.batch_size // tcfg.grad_accum // (data * fsdp)) if tcfg.grad_accum else 1
    cfg = replace(mcfg, remat_policy="full") if mcfg.remat_policy == "auto" else mcfg
    estimate = memory.train_estimate(
        cfg, rows_per_device=rows, seq_len=seq_len, param_shards=shards,
        tensor=tensor if tcfg.strategy == "fsdp_tp" else 1, grad_accum=tcfg.grad_accum or 2,
    )
    memory.check(
        estimate, f"training {tcfg.size} with {rows} sequence(s) of {seq_len} tokens per device", LOWER_TRAIN_MEMORY,
        override_gib=tcfg.device_memory_gib,
    )
    return estimate


LOWER_TRAIN_MEMORY = "lower batch_size= or raise grad_accum=, set remat_policy=full, or spread the model over more devices (mesh=, strategy=)"


def _start(plan: Plan, run: run_dir_lib.Run, ckpt, train_batches, say) -> tuple[Any, int, Any]:
    """(the state, its step, the restored checkpoint or None): the run's newest readable checkpoint,
    else init_from='s weights or a fresh init, created directly on the shardings (never in memory
    twice); the start recorded in the run directory."""
    tcfg, mcfg, place = plan.tcfg, plan.mcfg, plan.place
    state, restored = resume(tcfg, mcfg, ckpt, plan.abstract, train_batches, say)
    init = None
    if restored is None and tcfg.init_from:  # a resumed run does not read init_from='s weights
        try:
            init = weights.load(tcfg.init_from, mcfg, placement=place)[1]
        except checkpoint.CheckpointError as e:
            raise ConfigError(f"init_from={tcfg.init_from}: {e}") from None
    if restored is None:
        state, _ = step_lib.init_train_state_sharded(mcfg, plan.tx, tcfg.seed, place.mesh, place.rules, init)
    start_step = int(jax.device_get(state.step))
    changes = run.record_start({"model": mcfg.to_dict(), "train": dataclasses.asdict(tcfg)}, start_step)
    if restored is not None and changes:
        say("changed since the last start: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    return state, start_step, restored


def _train(plan: Plan, attn, run: run_dir_lib.Run, say, hellaswag, batches) -> dict[str, Any]:
    tcfg, mcfg, seq_len, place = plan.tcfg, plan.mcfg, plan.seq_len, plan.place
    train_batches, val_batches = batches
    ckpt = checkpoint.Checkpointer(run.path, checkpoint.CheckpointOptions(tcfg.ckpt_keep, tcfg.ckpt_keep_best, tcfg.ckpt_async))
    state, start_step, _ = _start(plan, run, ckpt, train_batches, say)
    announce(say, tcfg, mcfg, place, seq_len, attn, run.path)
    main_process = jax.process_index() == 0
    bar = tqdm(range(start_step, tcfg.steps), desc="train", unit="step", disable=not main_process, dynamic_ncols=True)
    guard, watchdog = PreemptionGuard(), Watchdog(run.path, tcfg.hang_timeout_s)
    work = PeriodicWork(
        tcfg, mcfg, place, run_dir=run.path, run_config={"model": mcfg.to_dict(), "train": dataclasses.asdict(tcfg)},
        ckpt=ckpt, guard=guard, watchdog=watchdog, eval_step=step_lib.compile_eval_step(mcfg, place.mesh, place.rules, plan.shardings.params),
        val_batches=val_batches, train_batches=train_batches, write=bar.write if main_process else (lambda *_: None),
        resumed_from=start_step, tokens_per_step=tcfg.batch_size * seq_len, hellaswag=hellaswag,
    )
    meter = Meter(
        work.metric_hooks(), bar, tokens_per_step=tcfg.batch_size * seq_len, flops_per_token=costs.flops_per_token(mcfg, seq_len),
        peak_flops=costs.peak_flops(jax.devices()[0]), last_step=tcfg.steps, start_step=start_step,
    )
    with guard:
        try:
            with watchdog:  # the steps only: waiting for the last save is not watched
                _steps(plan, state, start_step, train_batches, work, meter, bar)
        except TrainingError as e:
            ckpt.abort()
            last = ckpt.latest_step()
            raise TrainingError(f"{e}; last good checkpoint: " + (f"step {last} in {ckpt.directory}" if last else "none")) from None
        except BaseException:  # on a pod, no process may wait for this one's part of a save
            ckpt.abort()
            raise
        finally:
            ckpt.close()
            bar.close()
            work.writer.close()
    return finish(work.progress, ckpt, run, start_step)


def _steps(plan: Plan, state, start_step: int, train_batches, work: "PeriodicWork", meter: Meter, bar) -> None:
    """The steps from `start_step`, each followed by the hooks it makes due; after the last, the
    hooks that run at the end (unless a signal stopped the run)."""
    tcfg, progress = plan.tcfg, work.progress
    hooks = work.hooks(before=meter.flush)
    progress.started = time.perf_counter()
    for step in bar:
        batch = next(train_batches)  # fine-tuning batches are dicts with a "mask"
        state, metrics = plan.train_step(state, sharding.shard_batch(batch if isinstance(batch, dict) else {"tokens": batch}, plan.place.mesh))
        meter.push(step, metrics)  # dispatch step t, then read step t-1's metrics while t runs
        work.watchdog.beat()
        if step + 1 < tcfg.steps:
            hooks.run(step + 1, state)
            if progress.stopping:
                progress.final["stopped"] = progress.stopping
                break
            if progress.reached:  # target_val_loss: this step was saved
                break
    meter.flush()
    if not progress.stopping and not progress.reached:
        hooks.run(tcfg.steps, state, end=True)
        if progress.stopping:  # a pod's agreed stop fell inside the last validation
            progress.final["stopped"] = progress.stopping


def announce(say, tcfg: TrainConfig, mcfg: ModelConfig, place: sharding.Placement, seq_len: int, attn, run_dir: Path) -> None:
    """What is about to run, printed once: model, devices, mesh, batch, attention; warnings."""
    say(
        f"training {tcfg.size} ({mcfg.n_layer}x{mcfg.n_embd}, {mcfg.n_head} heads, {mcfg.dtype}) on "
        f"{jax.device_count()} {jax.devices()[0].device_kind} device(s), mesh {dict(place.mesh.shape)}, "
        f"{tcfg.strategy}; {tcfg.steps} steps of {tcfg.batch_size} x {seq_len} tokens; run dir {run_dir}"
    )
    undivided = sharding.tensor_undivided(mcfg, place.mesh) if tcfg.strategy == "fsdp_tp" else {}
    if undivided:
        say(
            f"warning: tensor={place.mesh.shape['tensor']} does not divide {', '.join(undivided.values())}: "
            "those stay whole and are computed on every tensor rank (choose a tensor size that divides them)"
        )
    say(f"attention: {attn}" + (" (attention dropout runs on xla)" if mcfg.attn_pdrop > 0 and attn.impl != "xla" else ""))


def finish(progress: Progress, ckpt, run: run_dir_lib.Run, start_step: int) -> dict[str, Any]:
    """Check that the last step's checkpoint exists, write final.json; the final record."""
    saved_step = progress.final.get("step", start_step)
    if saved_step not in ckpt.steps():
        last = ckpt.latest_step()
        raise TrainingError(
            f"the checkpoint of step {saved_step} was not saved (see above); the newest saved checkpoint is "
            + (f"step {last} in {ckpt.directory}" if last else "none")
        )
    run.write_final(progress.final)
    return progress.final
