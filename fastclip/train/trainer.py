"""The trainer: assembles the components of a run and drives the loop.

    from fastclip.train import train
    metrics = train(overrides={"output_dir": "runs/demo"})      # the built-in synthetic demo
    metrics = train("configs/tiny-siglip-synthetic.yaml", overrides={"train.zero_stage": 2})

Components (each its own module): processes and collectives (``parallel``), the model, tokenizer and
loss (``build``), data (``data``), parameter groups and schedule (``optim``), the DeepSpeed engine
(``engine``), gradient caching (``gradcache``), the steps' finiteness checks (``step_checks``),
SIGTERM/SIGINT (``signals``), evaluation (``evaluate``), metrics and logging (``metrics``), checkpoints
(``checkpoint``, ``rank_state``, ``safe_load``), the output directory (``rundir``) and plots
(``plot``). One process needs no launcher; several come from ``torchrun`` or the ``deepspeed``
launcher. Every rank runs the same code; rank 0 writes logs.

Host synchronisations: a step reads nothing from the device. The finiteness checks are recorded on the
device and read, with the loss and logit scale of the metrics row, once per log interval (and before
an evaluation or a checkpoint that falls between two log steps): one synchronisation per
``log.every`` steps. With several ranks, the per-step agreement on signals is an all-reduce of a CPU
tensor over gloo, which waits for the other ranks but not for the GPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import time
from typing import Union

import torch

from fastclip.models.host_checked import values_checked_on_host
from fastclip.train import checkpoint as ckpt
from fastclip.train import data as data_lib
from fastclip.train import engine as engine_lib
from fastclip.train import rundir
from fastclip.train.build import build_loss, build_model, check_model_name, resolved_overrides  # noqa: F401
from fastclip.train.config import Config, ConfigError, load_config
from fastclip.train.evaluate import evaluate_sets
from fastclip.train.export import export_safetensors
from fastclip.train.gradcache import gradcache_step
from fastclip.train.metrics import MetricsLog, progress_bar
from fastclip.train.optim import param_groups
from fastclip.train.parallel import Comm, hang_point
from fastclip.train.plot import plot_metrics
from fastclip.train.signals import StopSignals, TrainingInterrupted
from fastclip.train.step_checks import StepChecks, check_batch_on_host


def train(
    config: Union[Config, dict, str, None] = None,
    *,
    overrides: dict | None = None,
    model=None,
    tokenizer=None,
) -> dict:
    """Train; returns the final evaluation metrics (every rank gets the same dict).

    ``config``: a :class:`Config`, a nested dict, a YAML/JSON path or None (defaults);
    ``overrides``: {"section.key": value}. ``model``/``tokenizer``: use these instead of
    ``create_model(config.model.name)`` and the data's tokenizer (a model following the
    ``fastclip.models`` contract; the tokenizer maps list[str] to a LongTensor).
    """
    if isinstance(config, (Config, dict)):
        cfg = config if isinstance(config, Config) else Config.from_dict(config)
        for k, v in (overrides or {}).items():
            cfg.set(k, v)
        cfg.validate()
    elif config is None or isinstance(config, (str, os.PathLike)):
        cfg = load_config(config, overrides)
    else:
        raise TypeError(f"config: expected a Config, dict, path or None, got {type(config).__name__}")
    return Trainer(cfg, model=model, tokenizer=tokenizer).fit()


class Trainer:
    def __init__(self, cfg: Config, *, model=None, tokenizer=None):
        cfg = copy.deepcopy(cfg)  # the resolved values (train.threads) are recorded in this copy only
        if not cfg.output_dir:
            raise ConfigError(
                "output_dir: expected a directory for checkpoints and logs (--output-dir DIR), got None"
            )
        rundir.check_output_dir(cfg.output_dir)
        data_lib.check_paths(cfg.data, cfg.eval)
        on_cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
        if on_cpu and cfg.train.precision == "fp16":
            raise ConfigError(
                "train.precision: 'fp16' needs a CUDA device (DeepSpeed has no fp16 on CPU); use 'bf16' or 'fp32'"
            )
        if model is None:
            check_model_name(cfg.model.name)
        self.cfg = cfg
        self.out = os.path.abspath(cfg.output_dir)
        self.ckpt_root = os.path.join(self.out, "checkpoints")
        self.lock, self._lock_error, self.signals = None, None, StopSignals()
        owns_group = not torch.distributed.is_initialized()
        try:
            # before anything reads or moves files: hold the directory (rank 0), then the checkpoint to
            # resume from and the config's changes, all before any process group starts
            self._hold_output_dir()
            self.resume_from, self.resume_meta = (None, None) if self._lock_error else self._find_resume()
            self.comm = Comm.setup(cfg.train, cfg.dist)
            self._set_up(cfg, model, tokenizer)
        except BaseException:
            # A set-up error (a missing tokenizer, a bad data file...) leaves no process group behind
            # when the trainer made it, and no lock or signal handler: the caller's next run starts clean.
            self._release()
            if owns_group and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            raise

    def _hold_output_dir(self) -> None:
        """Rank 0 locks the output directory (:class:`rundir.RunLock`) and removes a killed run's
        leftovers. A refusal in a one-process run raises at once; with several processes it is raised
        after the process group exists, on every rank together (no rank left waiting)."""
        if torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if rank != 0:
            return
        try:
            self.lock = rundir.RunLock.acquire(self.out)
        except ConfigError as exc:
            if world == 1:
                raise
            self._lock_error = exc
            return
        if self.lock.stale_pid:
            print(
                f"fastclip: {self.out} was held by pid {self.lock.stale_pid}, which ended without "
                "releasing it (killed or crashed); continuing in it",
                file=sys.stderr,
            )
        removed = rundir.clean_leftovers(self.out)
        if removed:
            print(f"fastclip: removed what an interrupted run left: {', '.join(removed)}", file=sys.stderr)

    def _release(self) -> None:
        """Unlock the output directory and put the previous signal handlers back (idempotent)."""
        if self.lock is not None:
            self.lock.release()
        self.signals.restore()

    def _set_up(self, cfg: Config, model, tokenizer) -> None:
        self.rank, self.world, self.device = self.comm.rank, self.comm.world, self.comm.device
        if self.world > 1 and self.comm.any_rank(self._lock_error is not None):
            raise self._lock_error or ConfigError(
                f"output_dir: rank 0 could not take {self.out} (its error says why); stopping"
            )
        if self.device.type == "cpu" and cfg.train.threads is None:
            cfg.train.threads = torch.get_num_threads()  # the default's value, saved in config.yaml
        self.local_batch, self.micro, self.chunks = cfg.check_world(self.world)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            cfg.train.precision
        ]
        self.step = self.start_step = 0
        self._saved_step = self._checked_step = None
        self.checks = StepChecks(self.device)  # non-finite inputs or losses, recorded on the device
        self.metrics = MetricsLog(self.out, self.rank, cfg.log.tensorboard)
        self._prepare_output_dir()
        self.complete = self.resume_meta is not None and self.resume_meta["step"] >= cfg.train.steps
        if self.complete:
            return
        self._seed(cfg.train.seed)
        self.tokenizer, self.model = build_model(cfg, self.out, self.rank, model, tokenizer)
        self.stream, self.eval_sets = data_lib.build_data(
            cfg, self.model, self.tokenizer, self.rank, self.world, self.device
        )
        groups = param_groups(self.model, cfg.optim.weight_decay)
        self.engine = engine_lib.build_engine(cfg, self.model, groups, self.micro, self.chunks, self.device)
        self.loss, self.loss_kind = build_loss(cfg, self.model, self.rank, self.world)
        self._seed(cfg.train.seed * 1000 + 1 + self.rank)  # per-rank randomness for dropout from here on

    # ---- set-up ----------------------------------------------------------------------------
    def _seed(self, seed: int) -> None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    def _find_resume(self):
        """(checkpoint directory, its verified trainer.json) to resume from, or (None, None). A config
        that differs from the checkpoint's in a key that changes training is refused here."""
        how = self.cfg.checkpoint.resume
        if how == "never":
            return None, None
        path = ckpt.find_latest(self.ckpt_root) if how == "auto" else ckpt.resolve(how)
        if path is None:
            return None, None
        meta = ckpt.verify(path)
        self.config_changes = rundir.check_config_change(
            meta["config"], self.cfg.to_dict(), self.cfg.checkpoint.allow_config_change, path
        )
        return path, meta

    def _prepare_output_dir(self) -> None:
        """A fresh run in a directory holding an earlier run moves that run's files aside first."""
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
            if self.resume_from is None and rundir.has_run(self.out):
                moved = rundir.set_aside(self.out)
                print(
                    f"fastclip: starting a new run; the earlier run's files were moved to {moved}",
                    file=sys.stderr,
                )
            if self.resume_from is not None and self.config_changes:
                print(
                    f"fastclip: resuming with changed config: {'; '.join(self.config_changes)}",
                    file=sys.stderr,
                )
        self.comm.barrier()

    # ---- the loop --------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``train.steps``; returns the final evaluation metrics. SIGTERM/SIGINT end the run
        after the current step with a checkpoint and :class:`TrainingInterrupted`."""
        try:
            return self._fit()
        finally:
            self._release()

    def _fit(self) -> dict:
        if self.complete:
            self.start_step = self.step = self.resume_meta["step"]
            if self.rank == 0:
                print(
                    f"fastclip: the run in {self.out} is complete (checkpoint at step {self.resume_meta['step']}, "
                    f"train.steps {self.cfg.train.steps}); nothing to do",
                    file=sys.stderr,
                )
            return self.comm.broadcast(self.metrics.last_eval() if self.rank == 0 else None)
        self._resume()
        self.start_step = self.step
        cfg = self.cfg
        if self.rank == 0:
            rundir.write_run_files(self.out, cfg, self.model.config, self.tokenizer)
            self.metrics.open()
        bar = progress_bar(cfg, self.rank, self.step)
        t_last, n_last, waited = time.time(), 0, 0.0
        final = {}
        while self.step < cfg.train.steps:
            self._stop_if_signalled(bar)
            hang_point(self.step + 1, self.rank)
            try:
                t_wait = time.perf_counter()
                batch = self.stream.next_batch()  # token ids when the loader workers tokenized
                waited += time.perf_counter() - t_wait
                images, texts, ids = self._batch_tensors(batch)
                with values_checked_on_host() if self._host_checked else contextlib.nullcontext():
                    loss = self._train_step(images, texts, ids)
            except RuntimeError as exc:
                if not self.comm.is_timeout(exc):
                    raise
                raise self.comm.timeout_error(exc, self.step + 1) from None
            self.step += 1
            engine_lib.clamp_logit_scale(cfg, self.engine)
            n_last += 1
            if bar is not None:
                bar.update(cfg.train.batch_size)
            if self.step % cfg.log.every == 0 or self.step == cfg.train.steps:
                self._log(bar, loss, t_last, n_last, waited)
                t_last, n_last, waited = time.time(), 0, 0.0
            last = self.step == cfg.train.steps
            if last or (cfg.eval.every and self.step % cfg.eval.every == 0):
                final = self._evaluate(bar)
            if last or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                self._save()
        if bar is not None:
            bar.close()
        self._finish()
        return final

    def _log(self, bar, loss: torch.Tensor, t_last: float, steps: int, waited: float) -> None:
        """The metrics row of a log step: its numbers come with the finiteness record in the interval's
        one host read (:meth:`_verify`, which raises for a non-finite value since the last read)."""
        cfg = self.cfg
        scale = engine_lib.logit_scale_tensor(cfg, self.engine)
        loss, scale = self._verify(self.comm.mean_tensor(loss), float("nan") if scale is None else scale)
        if not math.isfinite(loss):  # each rank's loss was finite, their mean is not
            raise FloatingPointError(f"step {self.step}: the loss is {loss}; stopping (lower optim.lr?)")
        dt = time.time() - t_last  # after the read: the interval's device work is done
        row = {
            "step": self.step,
            "loss": loss,
            "lr": self.engine.get_lr()[0],
            "logit_scale": scale,
            "samples_per_s": steps * cfg.train.batch_size / max(dt, 1e-9),
            "data_wait_frac": min(1.0, waited / max(dt, 1e-9)),  # this rank's time in next_batch
            "data_skipped": int(getattr(self.stream, "skipped", 0)),
        }
        self.metrics.log(row)
        if bar is not None:
            bar.set_postfix(
                loss=f"{loss:.3f}", lr=f"{row['lr']:.2e}", scale=f"{row['logit_scale']:.1f}",
                data=f"{row['data_wait_frac']:.0%}",
            )  # fmt: skip

    def _verify(self, *values) -> list[float]:
        """``values`` (scalar tensors or numbers) read on the host with the finiteness record, in one
        synchronisation; raises :class:`FloatingPointError` naming the first non-finite loss input or
        loss of the run (with several ranks: on every rank, the earliest of any rank's by
        :meth:`Failure.order`)."""
        values, failure = self.checks.read(*values)
        if self.world > 1 and self.comm.any_rank(failure is not None):
            failures = [f for f in self.comm.all_objects(failure) if f is not None]
            failure = min(failures, key=lambda f: f.order())  # ties: the lowest rank's
        if failure is not None:
            raise FloatingPointError(failure.message())
        self._checked_step = self.step
        return values

    def _verified(self) -> None:
        """The finiteness record read at this step (before an evaluation or a checkpoint: no checkpoint
        holds diverged weights)."""
        if self._checked_step != self.step:
            self._verify()

    def _batch_tensors(self, batch):
        """A stream's batch -> (images, token ids (b, T) or with hard negatives (b, 1 + K, T), ids or
        None) on the device. Captions not yet tokenized (lists of 1 + K with hard negatives) are
        tokenized here."""
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise TypeError(
                f"next_batch: expected (images, texts) or (images, texts, ids), got {type(batch).__name__}"
            )
        images, texts = batch[0], batch[1]
        ids = batch[2] if len(batch) == 3 and self.cfg.model.duplicates is not None else None
        k = int(self.cfg.model.hard_negatives)
        if not torch.is_tensor(texts):
            texts = list(texts)
            if k:
                flat = [t for row in texts for t in row]
                if len(flat) != len(texts) * (1 + k):
                    raise ValueError(
                        f"next_batch: expected each sample's caption and {k} hard negatives, got {len(flat)} "
                        f"captions for {len(texts)} samples"
                    )
                tokens = self.tokenizer(flat)
                texts = tokens.view(len(texts), 1 + k, *tokens.shape[1:])
            else:
                texts = self.tokenizer(texts)
        if k and (texts.dim() != 3 or texts.shape[1] != 1 + k):
            raise ValueError(
                f"next_batch: expected token ids (b, {1 + k}, T) for model.hard_negatives {k}, "
                f"got {tuple(texts.shape)}"
            )
        self._host_checked = check_batch_on_host(self.model, images, texts)  # no device read per step
        images = images.to(self.device, self.dtype, non_blocking=True)
        texts = texts.to(self.device, non_blocking=True)
        if ids is not None:
            ids = torch.as_tensor(ids).to(self.device, non_blocking=True)
        return images, texts, ids

    def _forward(self, images, texts) -> dict:
        """The engine's forward; with hard negatives the (b, 1 + K, T) texts go through the text tower in
        the same call, flattened, and come back as text_features (b, D) and negative_features (b, K, D)."""
        if texts.dim() != 3:
            return self.engine(images, texts)
        b, group = texts.shape[:2]
        out = dict(self.engine(images, texts.reshape(b * group, *texts.shape[2:])))
        feats = out["text_features"]
        feats = feats.view(b, group, *feats.shape[1:])
        out["text_features"], out["negative_features"] = feats[:, 0], feats[:, 1:]
        return out

    def _train_step(self, images, texts, ids=None) -> torch.Tensor:
        """One optimizer step; returns the detached loss. Non-finite loss inputs and a non-finite loss
        are recorded in ``self.checks`` (device ops), not raised here: a step reads nothing on the host."""
        engine, step = self.engine, self.step + 1
        loss_fn = self.checks.guard(self.loss, step, ids)
        if self.chunks == 1:
            loss = loss_fn(**self._forward(images, texts))
            engine.backward(loss)
            engine.step()
            loss = loss.detach()
        else:

            def backward(surrogate):
                # the cached gradients already are the mean's; DeepSpeed steps the optimizer only
                # at the last micro-batch (its gradient-accumulation boundary)
                engine.backward(surrogate, scale_wrt_gas=False)
                engine.step()

            loss = gradcache_step(
                self._forward, loss_fn, images, texts, self.micro, backward=backward, check_finite=False
            )
        self.checks.note_loss(step, loss)
        return loss

    def _stop_if_signalled(self, bar) -> None:
        """Between steps: when any rank got SIGTERM/SIGINT, every rank saves (unless this step's
        checkpoint exists) and raises :class:`TrainingInterrupted`. The ranks agree through one small
        all-reduce per step, so all stop after the same step. It stays per step, not per log interval:
        a signal is answered after one step, within a scheduler's grace period whatever ``log.every``
        is, and it costs no GPU synchronisation (a CPU tensor over gloo: :meth:`Comm.max_int`)."""
        signum = self.comm.max_int(self.signals.received)
        if not signum:
            return
        name = signal.Signals(signum).name
        path = None
        if self.step > self.start_step and self._saved_step != self.step:
            self._save()
        if self.step > 0:
            path = os.path.join(self.ckpt_root, ckpt.step_name(self.step))
        if bar is not None:
            bar.close()
        self.comm.barrier()
        if path is None:
            what = "before the first step; nothing to save"
        elif self.step > self.start_step:
            what = f"after step {self.step}; checkpoint saved: {path}; run the same command to resume"
        else:
            what = f"before training further (checkpoint at step {self.step} kept); run the same command to resume"
        raise TrainingInterrupted(signum, self.step, path, f"stopped by {name} {what}")

    # ---- evaluation ------------------------------------------------------------------------
    def _evaluate(self, bar) -> dict:
        if not self.eval_sets:
            return {}
        self._verified()
        module = self.engine.module
        metrics = {}
        # ZeRO-3 fetches partitioned parameters in forward hooks (collectives): every rank runs the
        # evaluation then; otherwise rank 0 alone does and broadcasts the numbers.
        everyone = self.cfg.train.zero_stage == 3
        with engine_lib.gathered(self.cfg, list(module.parameters())):
            if self.rank == 0 or everyone:
                metrics = evaluate_sets(
                    module, self.tokenizer, self.eval_sets,
                    batch_size=self.cfg.eval.batch_size, device=self.device, dtype=self.dtype,
                )  # fmt: skip
        metrics = self.comm.broadcast(metrics)
        if self.rank == 0:
            self.metrics.log({"step": self.step, **metrics})
            if bar is not None and "zeroshot_top1" in metrics:
                bar.write(
                    f"step {self.step}: zero-shot top-1 {metrics['zeroshot_top1']:.3f} "
                    f"(chance {metrics['zeroshot_chance']:.3f}), top-5 {metrics['zeroshot_top5']:.3f}, "
                    f"i2t R@1 {metrics['i2t_r1']:.3f}, t2i R@1 {metrics['t2i_r1']:.3f}"
                )
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------
    def _save(self) -> None:
        self._verified()
        meta = {"zero_stage": self.cfg.train.zero_stage, "config": self.cfg.to_dict()}
        ckpt.save(
            self.engine, self.ckpt_root, self.step, self.rank, self.world, self.stream.state_dict(), meta,
            barrier=self.comm.barrier, any_rank=self.comm.any_rank, keep=self.cfg.checkpoint.keep,
        )  # fmt: skip
        self._saved_step = self.step

    def _resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        meta, state = ckpt.load(
            self.engine, path, self.rank, self.world, self.cfg.train.zero_stage, meta=self.resume_meta
        )
        self.step = int(meta["step"])
        self.stream.load_state_dict(state["data"])
        from fastclip.train.rank_state import set_rng_state

        set_rng_state(state["rng"])
        if self.rank == 0:
            note = self.metrics.truncate_to(self.step)
            if note:
                print(f"fastclip: {note}", file=sys.stderr)
            if os.path.dirname(os.path.abspath(path)) == self.ckpt_root:
                moved = rundir.set_aside_later_checkpoints(self.out, self.ckpt_root, self.step)
                if moved:
                    print(f"fastclip: checkpoints after step {self.step} moved to {moved}", file=sys.stderr)
            print(f"fastclip: resumed from {path} at step {self.step}", file=sys.stderr)
        self.comm.barrier()

    def _finish(self) -> None:
        self.comm.barrier()
        if self.rank != 0:
            return
        if self.cfg.checkpoint.export:
            latest = ckpt.find_latest(self.ckpt_root)
            if latest is not None:
                export_safetensors(latest, os.path.join(self.out, "model.safetensors"))
        if self.cfg.log.plot:
            plot_metrics(self.metrics.path, os.path.join(self.out, "curves.png"))
        self.metrics.close()
