"""The real open_clip_train, on CPU, with open_clip's losses and through fastclip's launcher: same per-step losses?

Run it with benchmarks/open_clip_train_check.sh (which creates the venv it needs: torch 2.14.1 +
torchvision 0.29.1, open_clip_torch 3.3.0 and its training dependencies, fastclip editable). For each
kind (CLIP, SigLIP, distillation, CLIP with --accum-freq 2, CLIP with --local-loss --gather-with-grad)
and each process count (1: python -m; 2: torchrun --standalone, gloo), it runs

    python -m open_clip_train.main <arguments>                     (open_clip's losses)
    python -m fastclip.integrations.open_clip_train <arguments>    (fastclip's, through the launcher)

with the same arguments and seed, then compares every loss call's values and logit scale, per step
and per rank, at full precision (recorded by benchmarks/open_clip_train_harness/sitecustomize.py,
which also applies the CPU-only fixes: varied seeded synthetic data, no DDP device_ids on CPU, the
tiny model), and the loss values open_clip_train printed in its out.log. Exit status 1 when a
difference passes --tol + --rtol x |open_clip's value|, a run used the wrong loss class or the
launcher did not announce itself. fp32 by default (--tol 1e-5); with --precision amp_bf16 open_clip
computes its logits and loss in bf16 where fastclip accumulates in fp32, so the differences are
open_clip's bf16 rounding: --tol 0 --rtol 0.015625 (two bf16 ulps).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.path.join(HERE, "open_clip_train_harness")
MODEL = "fastclip-check-tiny"
KINDS = {
    "clip": [],
    "siglip": ["--siglip"],
    "distill": ["--distill-model", MODEL, "--distill-pretrained", "{teacher}"],
    "accum": ["--accum-freq", "2"],
    "clip-local": ["--local-loss", "--gather-with-grad"],
}
EXPECTED_CLASS = {
    "clip": "ClipLoss",
    "siglip": "SigLipLoss",
    "distill": "DistillClipLoss",
    "accum": "ClipLoss",
    "clip-local": "ClipLoss",
}
LOG_LOSS = re.compile(r"Train Epoch: \d+ \[.*?\].* LR: \S+ Logit Scale: \S+ (.*)$")


def make_teacher(path: str, seed: int) -> None:
    """A seeded tiny open_clip model saved as safetensors: the teacher of the distillation kind."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    open_clip.add_model_config(os.path.join(HARNESS, f"{MODEL}.json"))
    torch.manual_seed(seed + 1000)
    model = open_clip.create_model(MODEL)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def train_args(kind: str, world: int, opts, logs: str, name: str, teacher: str):
    steps, batch, seed = opts.steps, opts.batch_size, opts.seed
    extra = [a.format(teacher=teacher) for a in KINDS[kind]]
    accum = 2 if kind == "accum" else 1
    args = [
        "--dataset-type", "synthetic", "--train-num-samples", str(batch * world * steps * accum),
        "--batch-size", str(batch), "--epochs", "1", "--lr", "1e-3", "--lr-scheduler", "const",
        "--warmup", "0", "--precision", opts.precision, "--workers", "0", "--log-every-n-steps", "1",
        "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0",
        "--model", MODEL, "--seed", str(seed), "--device", "cpu", "--logs", logs, "--name", name,
    ]  # fmt: skip
    if world > 1:
        args += ["--dist-backend", "gloo"]
    return args + extra


def run_one(impl: str, kind: str, world: int, opts, root: str, teacher: str) -> dict:
    name = f"{kind}-w{world}-{impl}"
    module = "open_clip_train.main" if impl == "open_clip" else "fastclip.integrations.open_clip_train"
    logs = os.path.join(root, "logs")
    record = os.path.join(root, name)
    args = train_args(kind, world, opts, logs, name, teacher)
    if world == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        # "--": torchrun's parser refuses open_clip_train's --logs (ambiguous with its --logs-specs).
        cmd = [torchrun, "--standalone", f"--nproc-per-node={world}", "-m", module, "--", *args]
    env = dict(os.environ)
    env.update(
        PYTHONPATH=HARNESS + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        FASTCLIP_OCT_RECORD=record,
        FASTCLIP_OCT_SEED=str(opts.seed),
        OMP_NUM_THREADS="1",
    )
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=opts.timeout)
    seconds = time.time() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{name}: exit status {proc.returncode}\n$ {' '.join(cmd)}\n{tail}")
    ranks = []
    for rank in range(world):
        with open(f"{record}.rank{rank}.jsonl") as f:
            rows = [json.loads(line) for line in f]
        ranks.append({"loss_class": rows[0]["loss_class"], "calls": rows[1:]})
    with open(os.path.join(logs, name, "out.log")) as f:
        printed = [m.group(1) for m in map(LOG_LOSS.search, f) if m]
    return {
        "name": name,
        "seconds": round(seconds, 1),
        "ranks": ranks,
        "printed": printed,
        "stderr": proc.stderr,
    }


def compare(kind: str, world: int, ref: dict, ours: dict, tol: float, rtol: float) -> dict:
    problems = []
    if "fastclip: open_clip_train runs with fastclip's" not in ours["stderr"]:
        problems.append("the launcher's line is missing from the fastclip run's output")
    max_abs = max_rel = max_scale = 0.0
    over = 0  # loss values further than tol + rtol * |open_clip's| from open_clip's
    steps = 0
    for rank, (a, b) in enumerate(zip(ref["ranks"], ours["ranks"])):
        want = EXPECTED_CLASS[kind]
        if a["loss_class"] != f"open_clip.loss.{want}":
            problems.append(f"rank {rank}: open_clip run used {a['loss_class']}")
        if not (b["loss_class"].startswith("fastclip.") and b["loss_class"].endswith("." + want)):
            problems.append(f"rank {rank}: fastclip run used {b['loss_class']}")
        if len(a["calls"]) != len(b["calls"]) or not a["calls"]:
            problems.append(f"rank {rank}: {len(a['calls'])} vs {len(b['calls'])} loss calls")
        steps = max(steps, len(a["calls"]))
        for i, (x, y) in enumerate(zip(a["calls"], b["calls"])):
            if x["losses"].keys() != y["losses"].keys():
                problems.append(f"rank {rank} call {i}: keys {sorted(x['losses'])} vs {sorted(y['losses'])}")
                continue
            for k, v in x["losses"].items():
                d = abs(v - y["losses"][k])
                max_abs, max_rel = max(max_abs, d), max(max_rel, d / max(abs(v), 1e-12))
                over += d > tol + rtol * abs(v)
            d = abs(x["logit_scale"] - y["logit_scale"])
            max_scale = max(max_scale, d)
            over += d > tol + rtol * abs(x["logit_scale"])
    if over:
        problems.append(
            f"{over} loss or logit scale values differ by more than {tol:g} + {rtol:g} x |value| "
            f"(max {max_abs:.3g}, scale {max_scale:.3g})"
        )
    printed_differ = sum(p != q for p, q in zip(ref["printed"], ours["printed"]))
    if len(ref["printed"]) != len(ours["printed"]) or not ref["printed"]:
        problems.append(f"out.log: {len(ref['printed'])} vs {len(ours['printed'])} loss lines")
    return {
        "kind": kind, "processes": world, "loss_calls_per_rank": steps, "max_abs_loss_diff": max_abs,
        "max_rel_loss_diff": max_rel, "max_abs_logit_scale_diff": max_scale,
        "out_log_lines": len(ref["printed"]), "out_log_lines_differing": printed_differ,
        "first_loss": ref["ranks"][0]["calls"][0]["losses"] if ref["ranks"][0]["calls"] else None,
        "last_loss": ref["ranks"][0]["calls"][-1]["losses"] if ref["ranks"][0]["calls"] else None,
        "seconds": [ref["seconds"], ours["seconds"]], "problems": problems,
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {','.join(KINDS)}")
    p.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", help="open_clip_train's --precision (e.g. amp_bf16)")
    p.add_argument(
        "--tol",
        type=float,
        default=1e-5,
        help="largest |difference| accepted, loss and logit scale (1e-5: fp32)",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=0.0,
        help="plus this times |open_clip's value| (amp_bf16: 2**-6, two bf16 ulps)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--keep", help="keep the runs' logs and records in this directory")
    opts = p.parse_args(argv)
    kinds = [k for k in opts.kinds.split(",") if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        p.error(f"--kinds: unknown {bad}; expected some of {list(KINDS)}")
    procs = [int(n) for n in opts.procs.split(",") if n]
    if not procs or min(procs) < 1:
        p.error(f"--procs: expected positive integers, got {opts.procs!r}")

    root = opts.keep or tempfile.mkdtemp(prefix="fastclip-oct-")
    os.makedirs(root, exist_ok=True)
    teacher = os.path.join(root, "teacher.safetensors")
    if "distill" in kinds:
        make_teacher(teacher, opts.seed)
    results = []
    try:
        for kind in kinds:
            for world in procs:
                if kind == "clip-local" and world == 1:
                    continue  # local_loss/gather_with_grad only change anything with several processes
                ref = run_one("open_clip", kind, world, opts, root, teacher)
                ours = run_one("fastclip", kind, world, opts, root, teacher)
                r = compare(kind, world, ref, ours, opts.tol, opts.rtol)
                results.append(r)
                status = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
                print(
                    f"{kind:<10} {world} proc  {r['loss_calls_per_rank']} loss calls/rank  "
                    f"max |dloss| {r['max_abs_loss_diff']:.3g} (rel {r['max_rel_loss_diff']:.3g})  "
                    f"max |dscale| {r['max_abs_logit_scale_diff']:.3g}  out.log lines differing "
                    f"{r['out_log_lines_differing']}/{r['out_log_lines']}  loss {r['first_loss']} -> "
                    f"{r['last_loss']}  [{r['seconds'][0]} s, {r['seconds'][1]} s]  {status}",
                    flush=True,
                )
    finally:
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)
    if opts.json:
        import open_clip
        import torch

        import fastclip

        meta = {
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "fastclip": fastclip.__version__,
        }
        with open(opts.json, "w") as f:
            json.dump(
                {"versions": meta, "steps": opts.steps, "tol": opts.tol, "results": results}, f, indent=1
            )
    failed = [r for r in results if r["problems"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
