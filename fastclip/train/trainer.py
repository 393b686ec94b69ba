"""The trainer: a DeepSpeed engine around a two-tower model, the fused contrastive loss, gradient
caching, periodic evaluation and atomic checkpoints.

    from fastclip.train import train
    metrics = train(overrides={"output_dir": "runs/demo"})      # the built-in synthetic demo
    metrics = train("configs/siglip-webdataset.yaml", overrides={"train.zero_stage": 2})

One process needs no launcher (the rendezvous variables are set here); several come from
``torchrun`` or the ``deepspeed`` launcher. Every rank runs the same code; rank 0 writes logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time
from contextlib import nullcontext
from typing import Union

import torch

from fastclip.train import checkpoint as ckpt
from fastclip.train import data as data_lib
from fastclip.train.config import Config, ConfigError, load_config
from fastclip.train.evaluate import evaluate
from fastclip.train.gradcache import gradcache_step

LN_100 = math.log(100.0)


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
    if isinstance(config, Config):
        cfg = config
        for k, v in (overrides or {}).items():
            cfg.set(k, v)
        cfg.validate()
    elif isinstance(config, dict):
        cfg = Config.from_dict(config)
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
        if not cfg.output_dir:
            raise ConfigError(
                "output_dir: expected a directory for checkpoints and logs (--output-dir DIR), got None"
            )
        data_lib.check_paths(cfg.data, cfg.eval)
        on_cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
        if on_cpu and cfg.train.precision == "fp16":
            raise ConfigError(
                "train.precision: 'fp16' needs a CUDA device (DeepSpeed has no fp16 on CPU); use 'bf16' or 'fp32'"
            )
        self.cfg = cfg
        self.out = os.path.abspath(cfg.output_dir)
        self.ckpt_root = os.path.join(self.out, "checkpoints")
        self.rank, self.world, self.device = setup_distributed(cfg.train)
        self.local_batch, self.micro, self.chunks = cfg.check_world(self.world)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            cfg.train.precision
        ]
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
        self._seed(cfg.train.seed)
        self.tokenizer, self.model = self._build_model(model, tokenizer)
        self.stream, self.eval_sets = data_lib.build_data(
            cfg, self.model, self.tokenizer, self.rank, self.world, self.device
        )
        self.engine = self._build_engine()
        self.loss_fn = self._build_loss()
        self._seed(cfg.train.seed * 1000 + 1 + self.rank)  # per-rank randomness for dropout from here on
        self.step = 0
        self.history: list[dict] = []
        self.tb = None

    # ---- set-up ----------------------------------------------------------------------------
    def _seed(self, seed: int) -> None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    def _build_model(self, model, tokenizer):
        from fastclip.models import WordTokenizer, create_model, get_config, load_tokenizer

        mc, dc = self.cfg.model, self.cfg.data
        overrides = dict(resolved_overrides(mc))
        if model is not None:
            context = model.config.text.context_length
        else:
            context = get_config(mc.name, **overrides).text.context_length
        if tokenizer is None:
            if dc.tokenizer not in ("auto", "words"):
                tokenizer = load_tokenizer(dc.tokenizer, context_length=context)
            elif dc.kind == "synthetic":
                tokenizer = WordTokenizer(self._synthetic_vocab(), context_length=context)
            elif dc.kind == "csv":
                _, captions, _ = data_lib.read_table(
                    dc.train, dc.image_key, dc.caption_key, None, dc.delimiter, dc.root
                )
                extra = " ".join(
                    (self.cfg.eval.templates or [])
                    + (data_lib.read_classnames(self.cfg.eval.classnames) or [])
                )
                tokenizer = WordTokenizer(_words(captions + [extra]), context_length=context)
            else:
                raise ConfigError(
                    "data.tokenizer: webdataset data needs a tokenizer: expected the path of a Hugging Face "
                    f"tokenizer directory or tokenizer.json, got {dc.tokenizer!r}"
                )
        vocab = getattr(tokenizer, "vocab_size", None)
        if model is None:
            if vocab is not None and "vocab_size" not in overrides:
                overrides["vocab_size"] = int(vocab)
            model = create_model(mc.name, **overrides)
        if vocab is not None and vocab > model.config.text.vocab_size:
            raise ConfigError(
                f"model.overrides.vocab_size: expected >= the tokenizer's {vocab} tokens, "
                f"got {model.config.text.vocab_size}"
            )
        if isinstance(tokenizer, WordTokenizer) and self.rank == 0:
            with open(os.path.join(self.out, "vocab.txt"), "w") as f:
                f.write("\n".join(tokenizer.vocab) + "\n")
        return tokenizer, model

    def _synthetic_vocab(self):
        return data_lib.SyntheticShapes(8).vocabulary()

    def _image_size(self) -> int:
        return int(self.model.config.vision.image_size)

    def _param_groups(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            lname = name.lower()
            excluded = p.ndim < 2 or any(
                k in lname for k in ("norm", "bias", "embed", "logit_scale", "cls_token", "pos")
            )
            (no_decay if excluded else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.cfg.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def ds_config(self) -> dict:
        o, t = self.cfg.optim, self.cfg.train
        conf = {
            "train_batch_size": t.batch_size,
            "train_micro_batch_size_per_gpu": self.micro,
            "gradient_accumulation_steps": self.chunks,
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": o.lr,
                    "betas": list(o.betas),
                    "eps": o.eps,
                    "weight_decay": o.weight_decay,
                    "torch_adam": True,
                },
            },
            "zero_optimization": {"stage": t.zero_stage},
            "bf16": {"enabled": t.precision == "bf16"},
            "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 12},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if o.grad_clip > 0:
            conf["gradient_clipping"] = o.grad_clip
        return conf

    def _build_engine(self):
        import deepspeed

        o, steps = self.cfg.optim, self.cfg.train.steps

        def schedule(optimizer):
            def factor(s):  # s = optimizer steps taken so far; the lr of step s+1
                if s < o.warmup_steps:
                    return (s + 1) / o.warmup_steps
                progress = min(1.0, (s - o.warmup_steps) / max(1, steps - o.warmup_steps))
                return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

            return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

        self.model.to(self.device)
        engine, _, _, _ = deepspeed.initialize(
            model=self.model,
            model_parameters=self._param_groups(),
            config=self.ds_config(),
            lr_scheduler=schedule,
        )
        return engine

    def _build_loss(self):
        from fastclip import ClipLoss, SigLipLoss

        kind = self.cfg.model.loss
        siglip = getattr(self.model, "logit_bias", None) is not None
        if kind == "auto":
            kind = "siglip" if siglip else "clip"
        if kind == "siglip" and not siglip:
            raise ConfigError(
                f"model.loss: 'siglip' needs a model with a logit_bias ({self.cfg.model.name!r} has none)"
            )
        impl, dist_impl = self.cfg.model.loss_impl, self.cfg.model.dist_impl
        self.loss_kind = kind
        if self.world == 1:
            return ClipLoss(impl=impl) if kind == "clip" else SigLipLoss(impl=impl)
        if kind == "clip":
            kw = {"dist_impl": dist_impl} if dist_impl else {}
            loss = ClipLoss(
                local_loss=True, gather_with_grad=True, rank=self.rank, world_size=self.world, impl=impl, **kw
            )
        else:
            loss = SigLipLoss(rank=self.rank, world_size=self.world, dist_impl=dist_impl, impl=impl)
        return _DistributedLoss(loss, kind, impl)

    # ---- the loop --------------------------------------------------------------------------
    def fit(self) -> dict:
        self._resume()
        cfg, engine = self.cfg, self.engine
        if self.rank == 0:
            self._write_run_files()
            self._open_tensorboard()
        bar = self._progress()
        t_last, n_last, waited = time.time(), 0, 0.0
        final = {}
        while self.step < cfg.train.steps:
            t_wait = time.perf_counter()
            images, texts = self.stream.next_batch()  # token ids when the loader workers tokenized
            waited += time.perf_counter() - t_wait
            images = images.to(self.device, self.dtype, non_blocking=True)
            if not torch.is_tensor(texts):
                texts = self.tokenizer(list(texts))
            texts = texts.to(self.device, non_blocking=True)
            loss = self._train_step(images, texts)
            self.step += 1
            self._clamp_logit_scale()
            n_last += 1
            if bar is not None:
                bar.update(cfg.train.batch_size)
            if self.step % cfg.log.every == 0 or self.step == cfg.train.steps:
                loss = self._mean(loss)
                dt = time.time() - t_last
                row = {
                    "step": self.step,
                    "loss": loss,
                    "lr": engine.get_lr()[0],
                    "logit_scale": self._logit_scale(),
                    "samples_per_s": n_last * cfg.train.batch_size / max(dt, 1e-9),
                    "data_wait_frac": min(1.0, waited / max(dt, 1e-9)),  # rank 0's time in next_batch
                    "data_skipped": int(getattr(self.stream, "skipped", 0)),
                }
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"step {self.step}: the loss is {loss}; stopping (lower optim.lr?)"
                    )
                self._log(row)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{loss:.3f}", lr=f"{row['lr']:.2e}", scale=f"{row['logit_scale']:.1f}",
                        data=f"{row['data_wait_frac']:.0%}",
                    )
                t_last, n_last, waited = time.time(), 0, 0.0
            last = self.step == cfg.train.steps
            if last or (cfg.eval.every and self.step % cfg.eval.every == 0):
                final = self._evaluate(bar)
            if last or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                self._save()
        if bar is not None:
            bar.close()
        if not final:  # resumed at the end: evaluate the loaded weights
            final = self._evaluate(None)
        self._finish()
        return final

    def _train_step(self, images, texts) -> torch.Tensor:
        engine = self.engine
        if self.chunks == 1:
            loss = self.loss_fn(**engine(images, texts))
            engine.backward(loss)
            engine.step()
            return loss.detach()

        def backward(surrogate):
            engine.backward(surrogate, scale_wrt_gas=False)  # the cached gradients are already the mean's
            engine.step()  # DeepSpeed steps the optimizer only at the last micro-batch

        return gradcache_step(engine, self.loss_fn, images, texts, self.micro, backward=backward)

    # ---- logit scale -----------------------------------------------------------------------
    def _scale_param(self):
        return getattr(self.engine.module, "logit_scale", None)

    def _logit_scale(self) -> float:
        p = self._scale_param()
        if p is None:
            return float("nan")
        with self._gathered([p]):
            return float(p.detach().float().exp().reshape(-1)[0])

    def _clamp_logit_scale(self) -> None:
        """Clamp the raw logit_scale to [0, ln 100] on the fp32 master copy and on the model's copy."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        p = self._scale_param()
        if p is None:
            return
        master = safe_get_full_fp32_param(p)  # None without a separate master (fp32 at ZeRO 0)
        if master is not None:
            clamped = master.clamp(0.0, LN_100)
            if not torch.equal(clamped, master):
                safe_set_full_fp32_param(p, clamped)
        with self._gathered([p], modify=True), torch.no_grad():
            p.clamp_(0.0, LN_100)

    def _gathered(self, params, modify=False):
        if self.cfg.train.zero_stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    # ---- evaluation, logging ---------------------------------------------------------------
    def _evaluate(self, bar) -> dict:
        if not self.eval_sets:
            return {}
        module = self.engine.module
        metrics = {}
        # ZeRO-3 fetches partitioned parameters in forward hooks (collectives): every rank runs the
        # evaluation then; otherwise rank 0 alone does and broadcasts the numbers.
        everyone = self.cfg.train.zero_stage == 3
        with self._gathered(list(module.parameters())):
            if self.rank == 0 or everyone:
                t0 = time.time()
                for s in self.eval_sets:
                    metrics.update(
                        evaluate(
                            module,
                            self.tokenizer,
                            s,
                            batch_size=self.cfg.eval.batch_size,
                            device=self.device,
                            dtype=self.dtype,
                        )
                    )
                metrics["eval_seconds"] = time.time() - t0
        metrics = self._broadcast(metrics)
        if self.rank == 0:
            self._log({"step": self.step, **metrics})
            if bar is not None and "zeroshot_top1" in metrics:
                bar.write(
                    f"step {self.step}: zero-shot top-1 {metrics['zeroshot_top1']:.3f} "
                    f"(chance {metrics['zeroshot_chance']:.3f}), top-5 {metrics['zeroshot_top5']:.3f}, "
                    f"i2t R@1 {metrics['i2t_r1']:.3f}, t2i R@1 {metrics['t2i_r1']:.3f}"
                )
        return metrics

    def _log(self, row: dict) -> None:
        if self.rank != 0:
            return
        row = {k: (float(v) if isinstance(v, (float, torch.Tensor)) else v) for k, v in row.items()}
        self.history.append(row)
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def _progress(self):
        if self.rank != 0 or not self.cfg.log.progress:
            return None
        from tqdm.auto import tqdm

        t = self.cfg.train
        return tqdm(
            total=t.steps * t.batch_size, initial=self.step * t.batch_size, unit="sample", unit_scale=True,
            desc=f"train {self.cfg.model.name}", dynamic_ncols=True, file=sys.stderr,
        )  # fmt: skip

    def _open_tensorboard(self) -> None:
        if not self.cfg.log.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(
                f"log.tensorboard: true needs the tensorboard package ({exc}); pip install tensorboard"
            ) from None
        self.tb = SummaryWriter(os.path.join(self.out, "tensorboard"))

    def _write_run_files(self) -> None:
        import yaml

        with open(os.path.join(self.out, "config.yaml"), "w") as f:
            yaml.safe_dump(self.cfg.to_dict(), f, sort_keys=False)
        with open(os.path.join(self.out, "model_config.json"), "w") as f:
            json.dump(_asdict(self.model.config), f, indent=1)

    # ---- checkpoints -----------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"zero_stage": self.cfg.train.zero_stage, "config": self.cfg.to_dict()}

    def _save(self) -> None:
        ckpt.save(
            self.engine, self.ckpt_root, self.step, self.rank, self.world, self.stream.state_dict(),
            self._meta(), _barrier, self.cfg.checkpoint.keep,
        )  # fmt: skip

    def _resume(self) -> None:
        how = self.cfg.checkpoint.resume
        if how == "never":
            return
        path = ckpt.find_latest(self.ckpt_root) if how == "auto" else ckpt.resolve(how)
        if path is None:
            return
        meta, state = ckpt.load(self.engine, path, self.rank, self.world, self.cfg.train.zero_stage)
        if state["step"] != meta["step"]:
            raise ckpt.CheckpointError(
                f"{path}: rank {self.rank} state is for step {state['step']}, not {meta['step']}"
            )
        self.step = int(meta["step"])
        self.stream.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        if self.rank == 0:
            self._truncate_metrics(self.step)
            print(f"fastclip: resumed from {path} at step {self.step}", file=sys.stderr)

    def _truncate_metrics(self, step: int) -> None:
        """Drop rows logged after the checkpoint by a run that was then killed."""
        path = os.path.join(self.out, "metrics.jsonl")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        kept = [r for r in rows if r.get("step", 0) <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)
        self.history = kept

    def _finish(self) -> None:
        _barrier()
        if self.rank != 0:
            return
        if self.cfg.checkpoint.export:
            latest = ckpt.find_latest(self.ckpt_root)
            if latest is not None:
                ckpt.export_safetensors(latest, os.path.join(self.out, "model.safetensors"))
        if self.cfg.log.plot:
            plot_metrics(os.path.join(self.out, "metrics.jsonl"), os.path.join(self.out, "curves.png"))
        if self.tb is not None:
            self.tb.close()

    # ---- collectives -----------------------------------------------------------------------
    def _mean(self, t: torch.Tensor) -> float:
        t = t.detach().float().reshape(1).to(self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
            t /= self.world
        return float(t)

    def _broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


class _DistributedLoss(torch.nn.Module):
    """The fastclip distributed loss; until that exists (NotImplementedError), all-gathers the features
    with autograd and computes the loss of the global batch on every rank. With DeepSpeed's gradient
    averaging both give the gradient of the global loss."""

    def __init__(self, loss, kind, impl):
        super().__init__()
        self.loss, self.kind, self.impl, self.fallback = loss, kind, impl, False

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):
        if not self.fallback:
            try:
                return self.loss(image_features, text_features, logit_scale, logit_bias)
            except NotImplementedError:
                self.fallback = True
                if torch.distributed.get_rank() == 0:
                    print(
                        "fastclip: distributed loss not available; gathering features instead",
                        file=sys.stderr,
                    )
        from fastclip import clip_loss, siglip_loss

        image_all = torch.cat(_all_gather(image_features))
        text_all = torch.cat(_all_gather(text_features))
        if self.kind == "clip":
            return clip_loss(image_all, text_all, logit_scale, impl=self.impl)
        return siglip_loss(image_all, text_all, logit_scale, logit_bias, impl=self.impl)


def _all_gather(t: torch.Tensor):
    import torch.distributed.nn as dist_nn

    return dist_nn.all_gather(t.contiguous())


def resolved_overrides(mc) -> dict:
    """``model.overrides``, with None resolved: the demo's patch size for the tiny models, else nothing."""
    if mc.overrides is not None:
        return mc.overrides
    return {"patch_size": 8} if mc.name in ("tiny", "tiny-siglip") else {}


# ---- distributed set-up -------------------------------------------------------------------------


def setup_distributed(tc) -> tuple[int, int, torch.device]:
    """Rank, world size and device; initialises torch.distributed (and DeepSpeed's comm) once.

    Without a launcher the rendezvous variables are set for a single process."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise warns that it fell back to CPU
    import deepspeed

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = tc.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(tc.threads or cpu_threads())
    backend = tc.backend if tc.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device.type == "cpu":
        _skip_shm_comm_op()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    else:
        deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def cpu_threads() -> int:
    """Intra-op threads per process on CPU: the cores the 1-minute load average leaves idle, shared by
    this node's processes (at least 1). Oversubscribed OpenMP threads spin against each other: on a
    2-core machine busy with another job, 2 threads ran the demo ~10x slower than 1 thread."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, int(cores - busy + 0.5) // max(1, local))


def _skip_shm_comm_op() -> None:
    """DeepSpeed compiles a shared-memory all-reduce op for CPU at start-up (~25-50 s on a cold cache);
    the training collectives here go through gloo, so mark the op unavailable instead."""
    try:
        import deepspeed.ops as ds_ops

        ds_ops.__compatible_ops__ = {**ds_ops.__compatible_ops__, "deepspeed_shm_comm": False}
    except Exception:  # a DeepSpeed without this op: nothing to skip
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _words(texts) -> list[str]:
    import re

    seen = {}
    for t in texts:
        for w in re.findall(r"[a-z0-9']+|[^\sa-z0-9']", t.lower()):
            seen[w] = seen.get(w, 0) + 1
    return sorted(seen, key=lambda w: (-seen[w], w))


def _asdict(obj):
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(getattr(obj, "__dict__", {}))


# ---- plots ------------------------------------------------------------------------------------


def plot_metrics(metrics_path: str, png_path: str) -> str | None:
    """Loss and evaluation curves from a metrics.jsonl file -> a PNG (None when there is nothing to plot)."""
    if not os.path.isfile(metrics_path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if any(k.endswith(("top1", "_r1")) for k in r)]
    if not train_rows and not eval_rows:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if train_rows:
        a.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], lw=1.2)
    a.set(xlabel="step", ylabel="training loss", title="loss")
    a.grid(alpha=0.3)
    keys = [
        k
        for k in ("zeroshot_top1", "zeroshot_top5", "seen_zeroshot_top1", "i2t_r1", "t2i_r1")
        if any(k in r for r in eval_rows)
    ]
    for k in keys:
        pts = [(r["step"], r[k]) for r in eval_rows if k in r]
        b.plot(*zip(*pts), marker="o", ms=3, label=k)
    chance = next((r["zeroshot_chance"] for r in eval_rows if "zeroshot_chance" in r), None)
    if chance is not None:
        b.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    b.set(xlabel="step", ylabel="accuracy / recall", title="evaluation", ylim=(0, 1))
    b.grid(alpha=0.3)
    if keys:
        b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
