"""The cached sentence-transformers losses under DeepSpeed ZeRO-2 and ZeRO-3 (issue 30).

Oracle: the same ``SentenceTransformerTrainer`` run without DeepSpeed (same tiny offline BERT, data,
seed; plain SGD, constant learning rate, no clipping, no weight decay), and sentence-transformers'
non-cached ``MultipleNegativesRankingLoss`` as the baseline. With SGD a parameter's update is
``-lr * grad``, so a gradient accumulated twice shows as a first-step update twice the reference's.

Two levels:
* in process, no DeepSpeed: fastclip's one-backward path (``gradcache_backward="graph"``, the path it
  takes under DeepSpeed) gives sentence-transformers' loss and every parameter's gradient (cached MNRL
  with dropout, symmetric, GIST with a re-tokenizing guide, MatryoshkaLoss), and feeds each
  parameter's gradient accumulation ONCE per backward, where sentence-transformers' hook feeds it once
  per mini-batch (what DeepSpeed ZeRO-2/3 reject);
* end to end: one subprocess per configuration (no DeepSpeed, ZeRO-2, ZeRO-3; DeepSpeed's CPU
  accelerator, one gloo rank), run concurrently: per-step losses, the first step's update and the
  final weights of fastclip's cached losses equal the run without DeepSpeed; sentence-transformers'
  own cached loss stops at the first step with DeepSpeed's "Gradient computed twice" assertion (the
  README quotes this, for the installed version; the test says so when that changes).

``test_fastclip_cached_losses_under_zero_on_cuda`` (gpu) repeats the end-to-end check on one CUDA
device (NCCL, CUDA dropout). ``python tests/test_st_deepspeed.py report OUT.json`` runs every
configuration: one rank with ZeRO-1/2/3, plus runs only recorded (sentence-transformers'
CachedGISTEmbedLoss, its cached loss with gradient accumulation and with activation checkpointing,
fastclip forced to the hook path), and two ranks (torchrun, gloo) with ZeRO-2/3 against DDP; its
output is benchmarks/results/st_deepspeed_2026-12-04_cpu.{json,log}, quoted in
docs/sentence_transformers_deepspeed.md.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the worker runs this file as a script
import _st_fixtures as F  # noqa: E402

from fastclip.integrations import _st_gradcache  # noqa: E402

ROWS, BATCH, STEPS, MINI, LR = 48, 8, 3, 3, 0.2  # mini-batches of 3 over 8 rows: an uneven split
# fp32, 3 steps. Measured (benchmarks/results/st_deepspeed_2026-12-04_cpu.log): <= 3.3e-6 in the losses,
# <= 5.2e-6 in the weights; a gradient accumulated twice moves the first update by up to 0.11.
LOSS_ATOL = 2e-5
WEIGHT_ATOL = 2e-5
# name -> (loss, gradient accumulation steps, model): the runs each configuration makes
TESTED = {
    "mnrl": ("st.MultipleNegativesRankingLoss", 1, "model"),
    "st_cached": ("st.CachedMultipleNegativesRankingLoss", 1, "model"),
    "fc_cached": ("fc.CachedMultipleNegativesRankingLoss", 1, "model"),
    # 2 micro-batches per step (DeepSpeed scales each backward by 1/2) and dropout (the replayed RNG)
    "fc_cached_gas2_dropout": ("fc.CachedMultipleNegativesRankingLoss", 2, "dropout"),
    "fc_gist": ("fc.CachedGISTEmbedLoss", 1, "model"),
}
FASTCLIP_RUNS = ["fc_cached", "fc_cached_gas2_dropout", "fc_gist"]
RECORDED = {  # report only
    "st_gist": ("st.CachedGISTEmbedLoss", 1, "model"),
    "fc_cached_hook": ("fc.CachedMultipleNegativesRankingLoss/hook", 1, "model"),
    "st_cached_gas2_dropout": ("st.CachedMultipleNegativesRankingLoss", 2, "dropout"),
    "fc_cached_gas2": ("fc.CachedMultipleNegativesRankingLoss", 2, "model"),
    "fc_cached_dropout": ("fc.CachedMultipleNegativesRankingLoss", 1, "dropout"),
    # the model's own (non-reentrant, transformers' default) activation checkpointing inside each mini-batch
    "fc_cached_gc_dropout": (
        "fc.CachedMultipleNegativesRankingLoss",
        1,
        "dropout",
        {"gradient_checkpointing": True},
    ),
    "st_cached_gc_dropout": (
        "st.CachedMultipleNegativesRankingLoss",
        1,
        "dropout",
        {"gradient_checkpointing": True},
    ),
}


# ---- the worker: one configuration, every run, in a fresh process ----------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(model) -> dict[str, torch.Tensor]:
    """Every parameter, whole (gathered under ZeRO-3; one rank, so nothing leaves the process)."""
    params = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


def _make_loss(spec: str, model, guide):
    from sentence_transformers.sentence_transformer import losses as st

    from fastclip.integrations import sentence_transformers as fc

    path, _, mode = spec.partition("/")
    lib, name = path.split(".")
    cls = getattr({"st": st, "fc": fc}[lib], name)
    kwargs = {} if "Cached" not in name else {"mini_batch_size": MINI}
    loss = cls(model, guide, temperature=0.05, **kwargs) if "GIST" in name else cls(model, **kwargs)
    if mode:
        loss.gradcache_backward = mode
    return loss


def _run(spec, gas, model, guide, stage, out_dir, device, extra=None):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    texts = F.sentences(2 * ROWS, seed=5)
    data = Dataset.from_dict({"anchor": texts[:ROWS], "positive": texts[ROWS:]})
    ds_config = None
    if stage is not None:
        ds_config = {
            "zero_optimization": {"stage": stage},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_allow_untested_optimizer": True,  # torch SGD: the update is -lr * grad
        }
    args = SentenceTransformerTrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=gas,
        max_steps=STEPS, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=device == "cpu", seed=0, deepspeed=ds_config, dataloader_drop_last=True, disable_tqdm=True, **(extra or {}),
    )  # fmt: skip
    losses: list[float] = []
    first: dict[str, torch.Tensor] = {}

    class Recorder(SentenceTransformerTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float(loss.detach()))  # one value per micro-batch, before any scaling
            return loss

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 1:
                first.update(_weights(model))

    w0 = _weights(model)
    trainer = Recorder(model=model, args=args, train_dataset=data, loss=_make_loss(spec, model, guide))
    trainer.add_callback(FirstStep())
    trainer.train()
    w1 = _weights(trainer.model)
    return {
        "losses": losses,
        "first_update": {n: (first[n] - w0[n]).flatten().tolist() for n in w0},
        "final_update": {n: (w1[n] - w0[n]).flatten().tolist() for n in w0},
    }


def worker(stage: int | None, dirs: dict[str, str], names: list[str], out: str, device: str = "cpu") -> None:
    """Run ``names`` (keys of TESTED / RECORDED) in one configuration; results -> ``out`` (JSON).
    ``device="cuda"``: DeepSpeed's CUDA accelerator and NCCL, fp32 (the gpu-marked test)."""
    t0 = time.time()
    label = ("no DeepSpeed" if stage is None else f"ZeRO-{stage}") + f" ({device})"
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if stage is not None:
        os.environ["DS_ACCELERATOR"] = device
        if "RANK" not in os.environ:  # one rank; under torchrun (report's 2-rank runs) its own
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))  # fmt: skip
    if stage is not None and device == "cpu":
        import deepspeed.ops as ds_ops

        table = getattr(ds_ops, "__compatible_ops__", None)
        if isinstance(table, dict):  # gloo does the collectives: skip building DeepSpeed's shm op
            ds_ops.__compatible_ops__ = {**table, "deepspeed_shm_comm": False}
    runs = {**TESTED, **RECORDED}
    # Every model is loaded before the first TrainingArguments: with a ZeRO-3 config alive,
    # from_pretrained partitions the weights at load (zero.Init), and the guide is no engine's module.
    models = {name: F.load_model(dirs[runs[name][2]]) for name in names}
    guide = F.load_model(dirs["guide"]).to(device)
    print(f"[{time.time() - t0:.1f} s] {label}: imports and models", file=sys.stderr, flush=True)
    guide.eval()
    guide.requires_grad_(False)  # never trained: outside the optimizer (under ZeRO, outside the engine)
    results = {}
    for name in names:
        spec, gas, _, *extra = runs[name]
        start = time.time()
        try:
            run_dir = os.path.join(os.path.dirname(out), name)
            res = _run(spec, gas, models[name], guide, stage, run_dir, device, *extra)
        except Exception as exc:  # recorded: sentence-transformers' own cached loss stops here
            res = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}",
                   "traceback": traceback.format_exc()[-2500:]}  # fmt: skip
        res.update(loss=spec, gas=gas, model=runs[name][2], seconds=round(time.time() - start, 2))
        print(f"[{time.time() - t0:.1f} s] {label}: {name} {res['seconds']} s", file=sys.stderr, flush=True)
        results[name] = res
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump({"stage": stage, "world": int(os.environ.get("WORLD_SIZE", "1")), "runs": results}, f)
    print(f"[{time.time() - t0:.1f} s] {label}: written", file=sys.stderr, flush=True)


def build_dirs(root: str) -> dict[str, str]:
    return {
        "model": F.build_model_dir(os.path.join(root, "model"), seed=0),
        "dropout": F.build_model_dir(os.path.join(root, "dropout"), seed=0, dropout=0.1),
        "guide": F.build_model_dir(os.path.join(root, "guide"), seed=1, vocab_order=F.WORDS[::-1]),
    }


def launch(stages, dirs, names, root, ranks: int = 1, timeout: int = 420, device: str = "cpu") -> dict:
    """One worker per configuration (``ranks`` > 1: a torchrun of ``ranks`` processes), all at once;
    {"none" | "1" | "2" | "3": {name: run}} ("none": without DeepSpeed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    runner = [sys.executable]
    if ranks > 1:
        runner += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    procs = {}
    for stage in stages:
        key = "none" if stage is None else str(stage)
        os.makedirs(os.path.join(root, key), exist_ok=True)
        out = os.path.join(root, key, "result.json")
        cmd = [
            *runner,
            os.path.abspath(__file__),
            "worker",
            key,
            json.dumps(dirs),
            ",".join(names),
            out,
            device,
        ]
        popen = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs[key] = (popen, out)
    results = {}
    for key, (proc, out) in procs.items():
        log, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {key} exited {proc.returncode}:\n{log[-4000:]}")
        with open(out) as f:
            results[key] = json.load(f)["runs"]
    return results


# ---- comparisons -------------------------------------------------------------------------------------


def update_mismatch(got: dict, ref: dict, atol: float) -> str | None:
    """None when every parameter's update equals the reference's within ``atol``; else where it does
    not, with the ratio of the update norms (2.0: a gradient accumulated twice)."""
    worst, where = 0.0, None
    got_sq = ref_sq = 0.0
    for name, r in ref.items():
        g, r = torch.tensor(got[name], dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
        got_sq += float(g.square().sum())
        ref_sq += float(r.square().sum())
        err = float((g - r).abs().max()) if r.numel() else 0.0
        if err > worst:
            worst, where = err, name
    if worst <= atol:
        return None
    ratio = (got_sq / ref_sq) ** 0.5 if ref_sq else float("inf")
    return f"max |diff| {worst:.3g} at {where}; |update| / |reference update| = {ratio:.4f}"


def loss_mismatch(got: list[float], ref: list[float], atol: float) -> str | None:
    if len(got) != len(ref):
        return f"{len(got)} losses vs {len(ref)}"
    diff = [abs(a - b) for a, b in zip(got, ref)]
    if max(diff) <= atol:
        return None
    step = diff.index(max(diff))
    return f"micro-batch {step}: loss {got[step]!r} vs {ref[step]!r} (|diff| {max(diff):.3g})"


def compare(run: dict, ref: dict) -> list[str]:
    """Failures of one run against the reference run (empty when it matches)."""
    if "error" in run:
        return [f"failed: {run['error']}"]
    out = [loss_mismatch(run["losses"], ref["losses"], LOSS_ATOL)]
    out.append(update_mismatch(run["first_update"], ref["first_update"], WEIGHT_ATOL))
    out.append(update_mismatch(run["final_update"], ref["final_update"], WEIGHT_ATOL))
    labels = ("losses", "first step's update", "final weights")
    return [f"{label}: {msg}" for label, msg in zip(labels, out) if msg]


def report(out_json: str) -> None:
    """Every configuration, every run: one rank (ZeRO-1/2/3, all runs) and two ranks (torchrun, gloo;
    ZeRO-2/3 against DDP, fastclip's runs and the baseline only: a rank that fails leaves the other
    waiting in a collective). The summary to stdout, everything to ``out_json``."""
    import tempfile

    import deepspeed
    import sentence_transformers
    import transformers

    root = tempfile.mkdtemp(prefix="st_deepspeed_")
    dirs = build_dirs(os.path.join(root, "models"))
    start = time.time()
    groups = {
        "1 rank": launch([None, 1, 2, 3], dirs, [*TESTED, *RECORDED], os.path.join(root, "r1"), timeout=900),
        "2 ranks": launch(
            [None, 2, 3], dirs, ["mnrl", *FASTCLIP_RUNS], os.path.join(root, "r2"), ranks=2, timeout=900
        ),
    }
    summary = {}
    for group, results in groups.items():
        print(
            f"== {group}: per-step losses (one per micro-batch) and max |difference| to the run without DeepSpeed"
        )
        for name, ref in results["none"].items():
            print(f"no DeepSpeed {name:22s} {ref.get('error') or [round(x, 6) for x in ref['losses']]}")
        for stage in [k for k in results if k != "none"]:
            for name, run in results[stage].items():
                row = _row(run, results["none"][name])
                summary[f"{group}/zero{stage}/{name}"] = row
                shown = row.get("error") or (
                    f"{[round(x, 6) for x in row['losses']]}  loss {row['max_abs_loss_diff']:.2g}  "
                    f"step-1 update {row['max_abs_first_update_diff']:.2g}  "
                    f"final weights {row['max_abs_final_update_diff']:.2g}"
                    + ("" if not row["failures"] else f"  FAILS: {row['failures']}")
                )
                print(f"ZeRO-{stage}       {name:22s} {shown}")
        for stage, runs in results.items():
            diff = loss_mismatch(runs["fc_cached"]["losses"], results["none"]["mnrl"]["losses"], LOSS_ATOL)
            print(
                f"{stage}: fastclip cached == non-cached MNRL without DeepSpeed (atol {LOSS_ATOL}): {diff or 'yes'}"
            )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": "cpu, 2 shared cores (DeepSpeed CPU accelerator, gloo)",
        "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "sentence_transformers": sentence_transformers.__version__, "transformers": transformers.__version__,
        "setup": {"rows": ROWS, "per_device_batch": BATCH, "steps": STEPS, "mini_batch_size": MINI, "lr": LR,
                  "optimizer": "torch SGD, constant lr, no clipping, no weight decay",
                  "model": "2-layer BERT, hidden 32 (tests/_st_fixtures.py)",
                  "runs": {**TESTED, **RECORDED}},
        "seconds": round(time.time() - start, 1),
        "command": "python tests/test_st_deepspeed.py report " + out_json,
    }  # fmt: skip
    raw = {
        group: {s: {n: {k: v for k, v in r.items() if not k.endswith("_update")} for n, r in runs.items()}
                for s, runs in results.items()}
        for group, results in groups.items()
    }  # fmt: skip
    with open(out_json, "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": raw}, f, indent=1)
    shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {out_json} ({meta['seconds']} s)")


def _row(run: dict, ref: dict) -> dict:
    if "error" in run or "error" in ref:
        return {"error": run.get("error") or f"reference: {ref['error']}"}
    row = {"losses": run["losses"], "reference_losses": ref["losses"]}
    row["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(run["losses"], ref["losses"]))
    for key in ("first_update", "final_update"):
        row[f"max_abs_{key}_diff"] = max(
            float((torch.tensor(run[key][n]) - torch.tensor(v)).abs().max()) for n, v in ref[key].items() if v
        )
    row["failures"] = compare(run, ref)
    return row


# ---- the tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("st_ds_models")
    return {
        "model": F.load_model(F.build_model_dir(str(root / "model"), seed=0)),
        "dropout": F.load_model(F.build_model_dir(str(root / "dropout"), seed=2, dropout=0.1)),
        "guide_retok": F.load_model(
            F.build_model_dir(str(root / "guide_retok"), seed=3, vocab_order=F.WORDS[::-1])
        ),
    }


def _cases(models):
    from sentence_transformers.sentence_transformer import losses as st_losses

    from fastclip.integrations import sentence_transformers as fc

    m, d, g = models["model"], models["dropout"], models["guide_retok"]
    return {
        "cached mnrl triplets, dropout": (d, 3, lambda: fc.CachedMultipleNegativesRankingLoss(d, mini_batch_size=4)),
        "cached symmetric pairs": (m, 2, lambda: fc.CachedMultipleNegativesSymmetricRankingLoss(m, mini_batch_size=4)),
        "cached gist triplets, re-tokenizing guide": (
            m, 3, lambda: fc.CachedGISTEmbedLoss(m, g, temperature=0.05, mini_batch_size=4)),
        "matryoshka over cached mnrl": (
            m, 2, lambda: st_losses.MatryoshkaLoss(
                m, fc.CachedMultipleNegativesRankingLoss(m, mini_batch_size=4), [32, 16])),
    }  # fmt: skip


def _set_mode(loss, mode):
    """Set ``gradcache_backward`` on the cached loss itself (a MatryoshkaLoss holds it in ``.loss``; a
    cached MNRL holds a plain MNRL there, which has no such attribute)."""
    inner = loss if hasattr(loss, "gradcache_backward") else loss.loss
    assert hasattr(inner, "gradcache_backward"), type(inner)
    inner.gradcache_backward = mode
    return loss


CASES = ["cached mnrl triplets, dropout", "cached symmetric pairs", "cached gist triplets, re-tokenizing guide",
         "matryoshka over cached mnrl"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_one_backward_path_equals_hook_path(models, case):
    """gradcache_backward="graph" (DeepSpeed's path) == "hook" (sentence-transformers'): loss, every grad."""
    model, columns, make = _cases(models)[case]
    feats = F.batch(model, 6, columns, seed=1)
    hook = F.run_loss(_set_mode(make(), "hook"), model, feats, seed=3)
    graph = F.run_loss(_set_mode(make(), "graph"), model, feats, seed=3)
    assert len(hook[1]) > 10
    failures = F.compare(case, graph, hook, rtol=1e-5, atol=1e-7)
    assert not failures, "\n".join(failures)


def _accumulations(loss, model, feats):
    counts = {n: 0 for n, p in model.named_parameters() if p.requires_grad}
    hooks = [
        p.register_post_accumulate_grad_hook(lambda _p, n=n: counts.__setitem__(n, counts[n] + 1))
        for n, p in model.named_parameters()
        if p.requires_grad
    ]
    try:
        F.run_loss(loss, model, feats)
    finally:
        for h in hooks:
            h.remove()
    return {n: c for n, c in counts.items() if c}


def test_one_backward_path_accumulates_each_gradient_once(models):
    """What DeepSpeed ZeRO-2/3 need: each parameter's gradient accumulation hook fires once per
    backward. sentence-transformers' hook fires it once per mini-batch (2 columns x 2 mini-batches)."""
    from fastclip.integrations import sentence_transformers as fc

    model = models["model"]
    feats = F.batch(model, 6, 2, seed=2)
    graph = _accumulations(
        _set_mode(fc.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3), "graph"), model, feats
    )
    hook = _accumulations(
        _set_mode(fc.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3), "hook"), model, feats
    )
    assert len(graph) > 10 and set(graph.values()) == {1}, {n: c for n, c in graph.items() if c != 1}
    assert set(hook.values()) == {4}, hook  # the collision with DeepSpeed, shown without it


def test_gradcache_backward_option(models):
    from fastclip.integrations import sentence_transformers as fc

    model = models["model"]
    loss = fc.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
    assert loss.gradcache_backward == "auto" and not _st_gradcache.use_graph(loss)  # no DeepSpeed engine
    loss.gradcache_backward = "graph"
    assert _st_gradcache.use_graph(loss)
    loss.gradcache_backward = "engine"
    with pytest.raises(ValueError, match=r"gradcache_backward: expected one of .* got 'engine'"):
        loss(F.batch(model, 4, 2), None)
    with torch.no_grad():  # evaluation: no backward, sentence-transformers' forward
        loss.gradcache_backward = "graph"
        ref = fc.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
        feats = F.batch(model, 4, 2)
        assert torch.equal(loss([dict(f) for f in feats], None), ref([dict(f) for f in feats], None))


def test_doubled_gradient_is_caught():
    """The end-to-end check's own check: a first-step update twice the reference's fails, naming 2.0."""
    ref = {"w": [0.1, -0.2, 0.05], "b": [0.01]}
    doubled = {k: [2 * x for x in v] for k, v in ref.items()}
    assert update_mismatch(ref, ref, WEIGHT_ATOL) is None
    msg = update_mismatch(doubled, ref, WEIGHT_ATOL)
    assert msg is not None and "= 2.0000" in msg


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("st_ds_runs"))
    dirs = build_dirs(os.path.join(root, "models"))
    return launch([None, 2, 3], dirs, list(TESTED), root)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_fastclip_cached_losses_under_zero_equal_no_deepspeed(end_to_end, stage):
    """Per-step losses, the first SGD step's update (2x: a gradient accumulated twice) and the final
    weights of fastclip's cached losses under ZeRO-{2,3} == the same run without DeepSpeed."""
    failures = []
    for name in ["mnrl", *FASTCLIP_RUNS]:
        ref = end_to_end["none"][name]
        assert "error" not in ref, f"{name} without DeepSpeed: {ref['error']}"
        failures += [f"ZeRO-{stage} {name}: {f}" for f in compare(end_to_end[str(stage)][name], ref)]
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_fastclip_cached_equals_uncached_baseline(end_to_end):
    """Without dropout, the cached loss's per-step losses are the non-cached MNRL's, in every configuration."""
    ref = end_to_end["none"]["mnrl"]
    for stage in ("none", "2", "3"):
        msg = loss_mismatch(end_to_end[stage]["fc_cached"]["losses"], ref["losses"], LOSS_ATOL)
        assert msg is None, f"{stage}: fastclip cached vs sentence-transformers MNRL: {msg}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_sentence_transformers_cached_loss_under_zero_as_recorded(end_to_end, stage):
    """What the README and docs/sentence_transformers_deepspeed.md say about the installed
    sentence-transformers: its CachedMultipleNegativesRankingLoss runs without DeepSpeed and stops at
    the first step under ZeRO-2/3 with DeepSpeed's assertion."""
    import sentence_transformers

    ref = end_to_end["none"]["st_cached"]
    assert (
        "error" not in ref
        and loss_mismatch(ref["losses"], end_to_end["none"]["mnrl"]["losses"], LOSS_ATOL) is None
    )
    run = end_to_end[str(stage)]["st_cached"]
    expected = "Gradient computed twice" if stage == 2 else "AssertionError"
    assert "error" in run and expected in run["error"], (
        f"sentence-transformers {sentence_transformers.__version__}'s CachedMultipleNegativesRankingLoss now "
        f"gives {run.get('error') or compare(run, ref) or 'the reference run'} under ZeRO-{stage}: "
        "update README.md and docs/sentence_transformers_deepspeed.md"
    )


@pytest.mark.gpu
@pytest.mark.slow
def test_fastclip_cached_losses_under_zero_on_cuda(tmp_path):
    """As the CPU test, on one CUDA device (NCCL, fp32): also checks what the CPU cannot, that the
    checkpointed mini-batches replay CUDA dropout (the checkpoint stashes the RNG of the devices its
    tensor arguments are on). Not run on machines without CUDA (conftest skips it, saying so)."""
    names = ["mnrl", *FASTCLIP_RUNS, "fc_cached_dropout"]
    results = launch([None, 2, 3], build_dirs(str(tmp_path / "models")), names, str(tmp_path), device="cuda")
    failures = []
    for stage in ("2", "3"):
        for name in names:
            failures += [
                f"ZeRO-{stage} {name}: {f}" for f in compare(results[stage][name], results["none"][name])
            ]
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        key = sys.argv[2]
        stage = None if key == "none" else int(key)
        worker(stage, json.loads(sys.argv[3]), sys.argv[4].split(","), sys.argv[5], *sys.argv[6:7])
        os._exit(0)  # results are written: skip the interpreter's teardown of DeepSpeed and gloo (seconds)
    elif sys.argv[1] == "report":
        report(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} report OUT.json | worker STAGE DIRS NAMES OUT [DEVICE]")
