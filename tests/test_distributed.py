"""Distributed losses on gloo (CPU): rank-for-rank parity with open_clip's loss.py and the reference.

Start-up of a spawned world costs seconds, so each world size runs ONE world in which every case
runs; each rank writes its failures and measurements to a JSON file that the test reads back.
Checks per case: loss value and the gradients of image features, text features, logit_scale and
logit_bias on every rank, against open_clip's own ClipLoss/SigLipLoss in the same world (float64:
tight tolerance) and against fastclip.reference's distributed references.
"""

from __future__ import annotations

import json
import os
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from utils import ABS_FLOOR, load_open_clip_loss

pytestmark = pytest.mark.distributed

D = 7  # odd feature dim
TOL64 = 1e-9  # float64: only summation order differs
CLIP_COMBOS = [(ll, gg) for ll in (False, True) for gg in (False, True)]
SIGLIP_IMPLS = ("bidir", "shift", "reduce", "gather")


# ----------------------------------------------------------------------------------------------------
# helpers run inside the spawned ranks


def _local_inputs(rank, world, n, dtype, seed, device="cpu"):
    """This rank's slice of a global batch (same global data whatever the world size)."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(world * n, D, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(world * n, D, generator=g, dtype=torch.float64), dim=-1)
    sl = slice(rank * n, (rank + 1) * n)
    x = x[sl].to(device, dtype).clone().requires_grad_()
    y = y[sl].to(device, dtype).clone().requires_grad_()
    s = torch.tensor(7.5, dtype=dtype, device=device, requires_grad=True)
    b = torch.tensor(-3.0, dtype=dtype, device=device, requires_grad=True)
    return x, y, s, b


def _run(loss_fn, x, y, s, b, weight):
    """Loss and grads of (x, y, s, b) for ``(weight * loss).backward()``; b may be unused."""
    x, y, s, b = (t.detach().clone().requires_grad_() for t in (x, y, s, b))
    loss = loss_fn(x, y, s, b)
    (loss * weight).backward()
    zero = torch.zeros_like(b)
    return [
        loss.detach().double(),
        x.grad.double(),
        y.grad.double(),
        s.grad.double(),
        (b.grad if b.grad is not None else zero).double(),
    ]


def _compare(name, got, want, tol, failures, counter):
    labels = ("loss", "d_image", "d_text", "d_scale", "d_bias")
    for label, a, w in zip(labels, got, want):
        counter[0] += 1
        err = float((a - w).abs().max())
        scale = max(1.0, float(w.abs().max()))
        if not err <= tol * scale:  # also catches NaN
            failures.append(
                f"{name}: {label} max|diff| {err:.3e} > {tol * scale:.1e} (want {w.flatten()[:3].tolist()})"
            )


def _clip_cases(rank, world, oc, failures, counter, group=None):
    from fastclip import ClipLoss
    from fastclip.reference import clip_loss_distributed_reference

    for n, chunk, use_bias in ((1, None, False), (5, 2, True)):
        x, y, s, b = _local_inputs(rank, world, n, torch.float64, seed=n)
        for weight in (1.0, 1.0 + rank):  # per-rank incoming gradients differ in the second pass
            for ll, gg in CLIP_COMBOS:
                ref = _run(
                    lambda *a, ub=use_bias, ll=ll, gg=gg: clip_loss_distributed_reference(
                        a[0], a[1], a[2], a[3] if ub else None, local_loss=ll, gather_with_grad=gg, group=group
                    ),
                    x, y, s, b, weight,
                )  # fmt: skip
                if group is None:
                    oc_loss = oc.ClipLoss(local_loss=ll, gather_with_grad=gg, rank=rank, world_size=world)
                    want = _run(
                        lambda *a, m=oc_loss, ub=use_bias: m(a[0], a[1], a[2], a[3] if ub else None),
                        x,
                        y,
                        s,
                        b,
                        weight,
                    )
                    _compare(
                        f"reference vs open_clip W={world} n={n} ll={ll} gg={gg} w={weight}",
                        ref,
                        want,
                        TOL64,
                        failures,
                        counter,
                    )
                else:
                    want = ref
                for dist_impl in ("gather", "ring"):
                    kw = dict(
                        local_loss=ll,
                        gather_with_grad=gg,
                        dist_impl=dist_impl,
                        chunk_size=chunk,
                        impl="torch",
                    )
                    if group is None:
                        mod = ClipLoss(rank=rank, world_size=world, **kw)
                    else:
                        mod = ClipLoss(group=group, **kw)
                    got = _run(
                        lambda *a, m=mod, ub=use_bias: m(a[0], a[1], a[2], a[3] if ub else None),
                        x,
                        y,
                        s,
                        b,
                        weight,
                    )
                    tag = f"ClipLoss {dist_impl} W={world} n={n} chunk={chunk} ll={ll} gg={gg} w={weight} group={group is not None}"
                    _compare(tag, got, want, TOL64, failures, counter)


def _siglip_cases(rank, world, oc, failures, counter, group=None):
    from fastclip import SigLipLoss
    from fastclip.reference import siglip_loss_distributed_reference

    for n, chunk in ((1, None), (5, 2)):
        x, y, s, b = _local_inputs(rank, world, n, torch.float64, seed=10 + n)
        for weight in (1.0, 1.0 + rank):
            ref = _run(lambda *a: siglip_loss_distributed_reference(*a, group=group), x, y, s, b, weight)
            for dist_impl in SIGLIP_IMPLS:
                if group is None:
                    oc_loss = oc.SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)
                    want = _run(lambda *a, m=oc_loss: m(*a), x, y, s, b, weight)
                    _compare(
                        f"siglip reference vs open_clip {dist_impl} W={world} n={n}",
                        ref,
                        want,
                        TOL64,
                        failures,
                        counter,
                    )
                else:
                    want = ref
                kw = dict(dist_impl=dist_impl, chunk_size=chunk, impl="torch")
                mod = (
                    SigLipLoss(rank=rank, world_size=world, **kw)
                    if group is None
                    else SigLipLoss(group=group, **kw)
                )
                got = _run(lambda *a, m=mod: m(*a), x, y, s, b, weight)
                tag = f"SigLipLoss {dist_impl} W={world} n={n} chunk={chunk} w={weight} group={group is not None}"
                _compare(tag, got, want, TOL64, failures, counter)


def _float32_cases(
    rank,
    world,
    oc,
    failures,
    counter,
    impl="torch",
    combos=((True, True), (False, False)),
    dtype=torch.float32,
    device="cpu",
):
    """float32: every strategy within 2x open_clip's own float32 error (against float64) + a floor.

    With ``impl="triton"`` the block primitives are the real Triton kernels, run by the interpreter
    on CPU (TRITON_INTERPRET=1 is inherited from conftest): the code path CUDA ranks take."""
    from fastclip import ClipLoss, SigLipLoss

    n = 6
    x, y, s, b = _local_inputs(rank, world, n, dtype, seed=3, device=device)
    x64, y64, s64, b64 = (t.detach().double() for t in (x, y, s, b))
    floor = ABS_FLOOR[dtype]

    def check(tag, labels, got, truth, theirs):
        for label, gv, tv, ov in zip(labels, got, truth, theirs):
            counter[0] += 1
            err, ref_err = float((gv - tv).abs().max()), float((ov - tv).abs().max())
            if not err <= 2 * ref_err + floor * max(1.0, float(tv.abs().max())):
                failures.append(f"{dtype} {impl} {tag} {label}: {err:.2e} vs open_clip's {ref_err:.2e}")

    for ll, gg in combos:
        oc_loss = oc.ClipLoss(local_loss=ll, gather_with_grad=gg, rank=rank, world_size=world)
        truth = _run(oc_loss, x64, y64, s64, b64, 1.0)
        theirs = _run(oc_loss, x, y, s, b, 1.0)
        for dist_impl in ("gather", "ring"):
            mod = ClipLoss(
                local_loss=ll,
                gather_with_grad=gg,
                rank=rank,
                world_size=world,
                dist_impl=dist_impl,
                impl=impl,
            )
            got = _run(lambda *a, m=mod: m(a[0], a[1], a[2]), x, y, s, b, 1.0)
            check(f"ClipLoss {dist_impl} ll={ll} gg={gg}", ("loss", "dx", "dy", "ds"), got, truth, theirs)
    truth = _run(oc.SigLipLoss(rank=rank, world_size=world), x64, y64, s64, b64, 1.0)
    theirs = _run(oc.SigLipLoss(rank=rank, world_size=world), x, y, s, b, 1.0)
    for dist_impl in SIGLIP_IMPLS:
        got = _run(SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl, impl=impl), x, y, s, b, 1.0)
        check(f"SigLipLoss {dist_impl}", ("loss", "dx", "dy", "ds", "db"), got, truth, theirs)


def _error_cases(rank, world, failures, counter):
    """Unequal batches raise on every rank (no hang); inconsistent rank/world_size raise; NaN -> NaN."""
    from fastclip import ClipLoss, DistillClipLoss, SigLipLoss

    def expect(name, exc, fn, match):
        counter[0] += 1
        try:
            fn()
        except exc as e:
            if match not in str(e):
                failures.append(f"{name}: message {str(e)!r} lacks {match!r}")
            return
        except Exception as e:  # noqa: BLE001
            failures.append(f"{name}: expected {exc.__name__}, got {type(e).__name__}: {e}")
            return
        failures.append(f"{name}: expected {exc.__name__}, nothing raised")

    n = 3 if rank == 0 else 2
    x, y, s, b = _local_inputs(rank, world, 3, torch.float64, seed=5)
    x, y = x[:n], y[:n]
    for dist_impl in ("gather", "ring"):
        mod = ClipLoss(rank=rank, world_size=world, dist_impl=dist_impl)
        expect(
            f"ClipLoss {dist_impl} unequal batches",
            ValueError,
            lambda m=mod: m(x, y, s),
            "image_features: local batch (rows): [3, 2",
        )
    for dist_impl in SIGLIP_IMPLS:
        mod = SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)
        expect(
            f"SigLipLoss {dist_impl} unequal batches",
            ValueError,
            lambda m=mod: m(x, y, s, b),
            "image_features: local batch (rows): [3, 2",
        )
    # Every rank claims the wrong rank: each raises before any collective.
    bad = ClipLoss(rank=(rank + 1) % world, world_size=world)
    expect("wrong rank", ValueError, lambda: bad(x, y, s), "rank/world_size")
    bad = SigLipLoss(rank=rank, world_size=world + 1)
    expect("wrong world_size", ValueError, lambda: bad(x, y, s, b), "rank/world_size")
    expect(
        "group with inconsistent world_size",
        ValueError,
        lambda: ClipLoss(group=dist.group.WORLD, rank=rank, world_size=world + 1),
        "rank/world_size",
    )
    # The functional forms check their input too (every rank raises before any collective) ...
    from fastclip.distributed import clip_loss_distributed, siglip_loss_distributed

    x, y, s, b = _local_inputs(rank, world, 3, torch.float64, seed=7)
    expect(
        "functional impl=reference",
        ValueError,
        lambda: clip_loss_distributed(x, y, s, impl="reference"),
        "impl",
    )
    expect(
        "functional dist_impl",
        ValueError,
        lambda: siglip_loss_distributed(x, y, s, b, dist_impl="ring"),
        "dist_impl",
    )
    # open_clip computes SigLIP without a bias when logit_bias is None: so does every dist_impl.
    for dist_impl in SIGLIP_IMPLS:
        counter[0] += 1
        got = siglip_loss_distributed(x, y, s, None, dist_impl=dist_impl)
        want = SigLipLoss(rank=rank, world_size=world, impl="reference")(x, y, s, None)
        if not torch.allclose(got, want, rtol=1e-10, atol=1e-12):
            failures.append(f"siglip no bias {dist_impl}: {float(got)} != reference {float(want)}")
    # Features of another dtype on one rank: a ValueError on every rank, not an abort inside gloo.
    mixed = x.float() if rank == world - 1 else x
    expect(
        "dtype differs across ranks",
        ValueError,
        lambda: ClipLoss(rank=rank, world_size=world)(mixed, mixed, s),
        "image_features: dtype: [torch.float64",
    )
    # One rank's own checks refuse its arguments (text features of another width there): it raises
    # its error, every other rank a ValueError naming it -- at once, not a hang in the next collective.
    y_bad = y[:, :-1] if rank == world - 1 else y
    for name, make in (
        ("ClipLoss", lambda: ClipLoss(rank=rank, world_size=world, dist_impl="ring")),
        ("SigLipLoss", lambda: SigLipLoss(rank=rank, world_size=world)),
        ("DistillClipLoss", lambda: DistillClipLoss(rank=rank, world_size=world)),
    ):
        mod = make()
        args = (x, y_bad, s, x, y, s) if name == "DistillClipLoss" else (x, y_bad, s)
        if rank == world - 1:
            expect(f"{name}: this rank refuses", ValueError, lambda m=mod, a=args: m(*a), "text_features")
        else:
            expect(
                f"{name}: another rank refuses", ValueError, lambda m=mod, a=args: m(*a),
                f"group rank(s) [{world - 1}] refused their arguments",
            )  # fmt: skip
    expect(
        "functional bad flag", TypeError, lambda: clip_loss_distributed(x, y, s, local_loss=1), "local_loss"
    )
    expect("functional scale", ValueError, lambda: clip_loss_distributed(x, y, torch.ones(2)), "logit_scale")
    # ... and give the modules' numbers.
    for dist_impl in ("gather", "ring"):
        counter[0] += 1
        kw = dict(local_loss=True, gather_with_grad=True, dist_impl=dist_impl)
        got = clip_loss_distributed(x, y, s, **kw)
        want = ClipLoss(rank=rank, world_size=world, **kw)(x, y, s)
        if not torch.equal(got, want):
            failures.append(f"clip_loss_distributed {dist_impl}: {float(got)} != module {float(want)}")
    for dist_impl in SIGLIP_IMPLS:
        counter[0] += 1
        got = siglip_loss_distributed(x, y, s, b, dist_impl=dist_impl)
        want = SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)(x, y, s, b)
        if not torch.equal(got, want):
            failures.append(f"siglip_loss_distributed {dist_impl}: {float(got)} != module {float(want)}")
    # NaN in one rank's features: every rank whose loss sees them returns NaN, never a finite number.
    x, y, s, b = _local_inputs(rank, world, 2, torch.float64, seed=6)
    if rank == world - 1:
        y = y.detach().clone()
        y[1, 0] = float("nan")
    for dist_impl in ("gather", "ring"):
        counter[0] += 1
        loss = ClipLoss(rank=rank, world_size=world, dist_impl=dist_impl)(x, y, s)
        if not torch.isnan(loss):
            failures.append(
                f"ClipLoss {dist_impl}: NaN text features on rank {world - 1} gave {float(loss)} on rank {rank}"
            )
    for dist_impl in SIGLIP_IMPLS:
        counter[0] += 1
        loss = SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)(x, y, s, b)
        if not torch.isnan(loss):
            failures.append(f"SigLipLoss {dist_impl}: NaN text features gave {float(loss)} on rank {rank}")


def _comm_counts(rank, world, out):
    """Bytes sent/received per rank for one forward+backward of each strategy (float32, n=8, D=16)."""
    from fastclip import ClipLoss, SigLipLoss
    from fastclip.distributed import comm_stats

    n, d = 8, 16
    g = torch.Generator().manual_seed(rank)
    x = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
    rows = {}
    for ll, gg in CLIP_COMBOS:
        for dist_impl in ("gather", "ring"):
            mod = ClipLoss(
                local_loss=ll, gather_with_grad=gg, rank=rank, world_size=world, dist_impl=dist_impl
            )
            with comm_stats() as st:
                mod(x, y, s).backward()
            rows[f"clip/{dist_impl}/local_loss={ll}/gather_with_grad={gg}"] = [st.sent, st.received]
    for dist_impl in SIGLIP_IMPLS:
        mod = SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)
        with comm_stats() as st:
            mod(x, y, s, b).backward()
        rows[f"siglip/{dist_impl}"] = [st.sent, st.received]
    out["comm"] = {"n": n, "d": d, "rows": rows}


def _peak_bytes(fn):
    """Peak of live CPU memory during ``fn()``: every allocation and free the profiler records
    (docs/design.md, "Platform facts"), replayed in time order, including frees that happen between ops."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.typed[1].alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


def _memory(rank, world, out):
    """Per-rank peak memory of one forward+backward at fixed n, per strategy and for open_clip."""
    from fastclip import ClipLoss, SigLipLoss

    n, d = 128, 64
    oc = load_open_clip_loss()
    g = torch.Generator().manual_seed(rank)
    x = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
    losses = {
        "clip/open_clip": oc.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world),
        "clip/gather": ClipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world, dist_impl="gather"
        ),
        "clip/ring": ClipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world, dist_impl="ring"
        ),
        "siglip/open_clip": oc.SigLipLoss(rank=rank, world_size=world, dist_impl="bidir"),
        "siglip/gather": SigLipLoss(rank=rank, world_size=world, dist_impl="gather"),
        "siglip/bidir": SigLipLoss(rank=rank, world_size=world, dist_impl="bidir"),
        "siglip/shift": SigLipLoss(rank=rank, world_size=world, dist_impl="shift"),
    }
    peaks = {}
    for name, mod in losses.items():
        args = (x, y, s, b) if name.startswith("siglip") else (x, y, s)
        mod(*args).backward()  # warm-up (lazy initialization outside the measurement)
        peaks[name] = _peak_bytes(lambda mod=mod, args=args: mod(*args).backward())
    out["memory"] = {"n": n, "d": d, "peaks": peaks}


def _group_cases(rank, world, failures, counter):
    """Two disjoint groups of a 4-rank world: the losses use the group, not WORLD."""
    from fastclip import ClipLoss

    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mine = groups[rank % 2]
    counter[0] += 1
    try:
        ClipLoss(group=groups[(rank + 1) % 2])  # a group this rank is not in
        failures.append(f"rank {rank}: a group without this process was accepted")
    except ValueError as e:
        if "contains this process" not in str(e):
            failures.append(f"rank {rank}: unexpected message for a foreign group: {e}")
    _clip_cases(dist.get_rank(mine), dist.get_world_size(mine), None, failures, counter, group=mine)
    _siglip_cases(dist.get_rank(mine), dist.get_world_size(mine), None, failures, counter, group=mine)


def _worker(rank, world, tmpdir, tasks):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # open_clip's deprecated torch names
    result = {"failures": {}, "checks": {}}
    backend = "nccl" if "nccl" in tasks else "gloo"
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world
        )
        oc = load_open_clip_loss()
        for task in tasks:
            failures, counter = result["failures"].setdefault(task, []), [0]
            if task == "parity":
                _clip_cases(rank, world, oc, failures, counter)
                _siglip_cases(rank, world, oc, failures, counter)
                _float32_cases(rank, world, oc, failures, counter)
            elif task == "nccl":
                # CUDA tensors over NCCL: the chunked torch blocks and the Triton kernels ("auto").
                for impl in ("torch", "auto"):
                    for dtype in (torch.float32, torch.bfloat16):
                        _float32_cases(
                            rank,
                            world,
                            oc,
                            failures,
                            counter,
                            impl=impl,
                            combos=CLIP_COMBOS,
                            dtype=dtype,
                            device="cuda",
                        )
            elif task == "bf16":
                _float32_cases(rank, world, oc, failures, counter, dtype=torch.bfloat16)
            elif task == "triton":
                _float32_cases(rank, world, oc, failures, counter, impl="triton", combos=CLIP_COMBOS)
            elif task == "errors":
                _error_cases(rank, world, failures, counter)
            elif task == "group":
                _group_cases(rank, world, failures, counter)
            elif task == "comm":
                _comm_counts(rank, world, result)
            elif task == "memory":
                _memory(rank, world, result)
            elif task == "train":
                _train(rank, world, result)
            result["checks"][task] = counter[0]
        dist.barrier()
    except Exception:  # noqa: BLE001
        result["failures"].setdefault("crash", []).append(f"rank {rank} crashed:\n{traceback.format_exc()}")
    with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def _train(rank, world, out):
    """Tiny two-tower model trained data-parallel with fastclip and with the reference loss."""
    from fastclip import ClipLoss, SigLipLoss

    configs = {
        "clip_ring_local": lambda: ClipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world, dist_impl="ring"
        ),
        "clip_gather_global": lambda: ClipLoss(rank=rank, world_size=world, dist_impl="gather"),
        "siglip_bidir": lambda: SigLipLoss(rank=rank, world_size=world),
    }
    refs = {
        "clip_ring_local": lambda: ClipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world, impl="reference"
        ),
        "clip_gather_global": lambda: ClipLoss(rank=rank, world_size=world, impl="reference"),
        "siglip_bidir": lambda: SigLipLoss(rank=rank, world_size=world, impl="reference"),
    }
    traj = {}
    for name in configs:
        runs = []
        for make in (configs[name], refs[name]):
            torch.manual_seed(0)  # same initial parameters on every rank and for both losses
            img = torch.nn.Sequential(
                torch.nn.Linear(10, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6)
            ).double()
            txt = torch.nn.Sequential(
                torch.nn.Linear(9, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6)
            ).double()
            log_s = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
            bias = torch.nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))
            params = [*img.parameters(), *txt.parameters(), log_s, bias]
            opt = torch.optim.SGD(params, lr=0.5)
            loss_fn = make()
            g = torch.Generator().manual_seed(100 + rank)
            losses = []
            for _ in range(6):
                a = torch.randn(4, 10, generator=g, dtype=torch.float64)
                t = torch.randn(4, 9, generator=g, dtype=torch.float64)
                xf, yf = F.normalize(img(a), dim=-1), F.normalize(txt(t), dim=-1)
                args = (xf, yf, log_s.exp()) + ((bias,) if name.startswith("siglip") else ())
                loss = loss_fn(*args)
                opt.zero_grad()
                loss.backward()
                for p in params:  # data-parallel: average gradients over ranks
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
                opt.step()
                losses.append(float(loss.detach()))
            runs.append((losses, torch.cat([p.detach().flatten() for p in params]).tolist()))
        traj[name] = runs
    out["train"] = traj


# ----------------------------------------------------------------------------------------------------
# the tests (parent process)


def _spawn(world, tasks, tmp_path):
    tmpdir = str(tmp_path)
    mp.start_processes(_worker, args=(world, tmpdir, tasks), nprocs=world, join=True, start_method="spawn")
    results = []
    for r in range(world):
        with open(os.path.join(tmpdir, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


def _assert_clean(results, task, min_checks):
    failures = [f for r in results for key in (task, "crash") for f in r["failures"].get(key, [])]
    assert not failures, f"{len(failures)} failures, first ones:\n" + "\n".join(failures[:15])
    for r, res in enumerate(results):
        got = res["checks"].get(task, 0)
        assert got >= min_checks, f"rank {r} ran only {got} checks of {task!r} (expected >= {min_checks})"


TASKS = {
    2: ("parity", "bf16", "triton", "errors", "comm", "memory", "train"),
    3: ("parity", "errors", "comm", "memory"),
    4: ("parity", "errors", "group", "comm", "memory"),
}
_CACHE: dict = {}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """One spawned world per world size, run once for the module (start-up costs seconds)."""

    def get(world):
        if world not in _CACHE:
            _CACHE[world] = _spawn(world, TASKS[world], tmp_path_factory.mktemp(f"world{world}"))
        return _CACHE[world]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_parity_with_open_clip_and_reference(world, worlds):
    """Every ClipLoss flag combination x strategy and every SigLipLoss dist_impl, n=1 and n=5 with
    chunk_size=2, incoming gradients 1 and rank+1, float64 and float32: loss and all four gradients
    on every rank equal open_clip's loss.py in the same world and fastclip.reference's."""
    _assert_clean(worlds(world), "parity", min_checks=430)


@pytest.mark.slow
def test_bfloat16_features(worlds):
    """W=2, bfloat16 features (P2P and collectives in bf16, fp32 accumulators): within 2x open_clip's
    own bfloat16 error against float64, for both strategies and every SigLIP dist_impl."""
    _assert_clean(worlds(2), "bf16", min_checks=36)


@pytest.mark.slow
@pytest.mark.interpreter
def test_triton_block_kernels_under_every_strategy(worlds):
    """W=2, float32, impl="triton" (the Triton kernels through the interpreter): all four ClipLoss
    flag combinations x both strategies and all SigLipLoss dist_impls, within open_clip's budget."""
    _assert_clean(worlds(2), "triton", min_checks=52)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_bad_input_raises_on_every_rank(world, worlds):
    """Unequal local batches: ValueError on every rank for every strategy (the test would hang or
    crash otherwise); rank/world_size inconsistent with the process group: ValueError; NaN features
    on one rank: NaN loss on every rank that sees them."""
    _assert_clean(worlds(world), "errors", min_checks=30)


@pytest.mark.slow
def test_process_groups(worlds):
    """A 4-rank world split into groups {0, 2} and {1, 3}: each loss uses its group (rank and world
    size from the group) and equals the reference computed over the same group."""
    _assert_clean(worlds(4), "group", min_checks=240)


def expected_bytes(key: str, world: int, n: int, d: int, e: int = 4, a: int = 4) -> int:
    """Bytes one rank sends (= receives) in a forward+backward, by formula. ``e``: feature element
    size, ``a``: accumulator (fp32) size. Collectives counted as the ring algorithm moves them."""
    w1 = world - 1

    def all_reduce(nbytes):
        return 2 * w1 * nbytes // world

    check = w1 * 128  # the call's agreement (fastclip.distributed.world): all-gather of 16 int64
    kind, *rest = key.split("/")
    if kind == "siglip":
        # gather/reduce: all-gather y, reduce-scatter dY; shift/bidir: y travels W-1 hops forward and
        # backward, the fp32 gradient accumulator W-1 hops in backward.
        extra = w1 * n * d * a if rest[0] in ("gather", "reduce") else w1 * n * d * (e + a)
        return check + w1 * n * d * e + extra
    strategy, ll, gg = rest[0], rest[1].endswith("True"), rest[2].endswith("True")
    total = check
    if strategy == "gather" and ll:
        total += w1 * n * 2 * d * e  # all-gather [x | y]
        if gg:
            total += w1 * n * 2 * d * a  # reduce-scatter [dX | dY]
    elif strategy == "gather":
        total += w1 * n * d * (e + a)  # all-gather y, reduce-scatter dY
        total += 2 * all_reduce(world * n * a)  # column log-sum-exp: a max and a sum of N floats
    else:
        total += w1 * (n * d * e + n * a)  # forward: y chunks, text log-sum-exp accumulators
        total += w1 * (n * d * e + (n + 1) * a)  # backward: y chunks + (lse, g) of their owner
        total += w1 * (n * d + (1 if ll else 0)) * a  # backward: dY (+ d scale) accumulators
    if not ll:
        total += all_reduce(a) + all_reduce(2 * a)  # global loss value; (d scale, g) in backward
    return total


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_bytes_per_rank_match_the_formula(world, worlds):
    results = worlds(world)
    _assert_clean(results, "comm", min_checks=0)
    for r, res in enumerate(results):
        comm = res["comm"]
        for key, (sent, received) in comm["rows"].items():
            want = expected_bytes(key, world, comm["n"], comm["d"])
            assert sum(sent.values()) == want, f"rank {r} {key}: sent {sent} != formula {want}"
            assert sum(received.values()) == want, f"rank {r} {key}: received {received} != formula {want}"


@pytest.mark.slow
def test_ring_peak_memory_does_not_grow_with_world_size(worlds):
    """Fixed n=128, D=64 per rank, per-rank peak of one forward+backward (profiler allocations).

    The ring strategies allocate their buffers once (two payload and two accumulator buffers per
    stream): "ring" and "shift" (one stream) are flat once the pipeline is full (W >= 3), "bidir"
    adds exactly one more stream's buffers. "gather" and open_clip grow with N, which shows that the
    instrument sees growth."""
    peaks = {}
    for w in (2, 3, 4):
        _assert_clean(worlds(w), "memory", min_checks=0)
        per_rank = [res["memory"]["peaks"] for res in worlds(w)]
        peaks[w] = {k: max(p[k] for p in per_rank) for k in per_rank[0]}
    n, d = worlds(4)[0]["memory"]["n"], worlds(4)[0]["memory"]["d"]
    buf = n * d * 4  # one fp32 (n, D) buffer
    for name in ("clip/ring", "siglip/shift"):
        assert peaks[2][name] <= peaks[3][name], (
            f"{name}: {peaks[2][name]} B at W=2 > {peaks[3][name]} B at W=3"
        )
        assert peaks[4][name] <= 1.02 * peaks[3][name], (
            f"{name}: {peaks[3][name]} B at W=3 -> {peaks[4][name]} B at W=4"
        )
    for w in (2, 3, 4):
        assert peaks[w]["siglip/bidir"] <= peaks[w]["siglip/shift"] + 4 * buf + 1024, (w, peaks[w])
    for name in ("clip/gather", "clip/open_clip", "siglip/gather", "siglip/open_clip"):
        assert peaks[4][name] >= 1.4 * peaks[2][name], f"{name}: no growth with W: {peaks}"
    assert peaks[4]["clip/ring"] < peaks[4]["clip/open_clip"] / 2
    assert peaks[4]["siglip/shift"] < peaks[4]["siglip/open_clip"] / 1.5


@pytest.mark.slow
def test_two_process_training_matches_reference(worlds):
    """Tiny MLP towers trained data-parallel for 6 SGD steps: fastclip's loss and the materialized
    reference give the same losses and parameter trajectory on both ranks."""
    results = worlds(2)
    _assert_clean(results, "train", min_checks=0)
    for r, res in enumerate(results):
        for name, ((losses, params), (ref_losses, ref_params)) in res["train"].items():
            assert losses[0] != losses[-1], f"{name}: the loss did not move"
            diff = max(abs(p - q) for p, q in zip(params, ref_params))
            assert diff < 1e-9, f"rank {r} {name}: parameters differ from the reference by {diff:.2e}"
            ldiff = max(abs(p - q) for p, q in zip(losses, ref_losses))
            assert ldiff < 1e-9, f"rank {r} {name}: losses differ by {ldiff:.2e}: {losses} vs {ref_losses}"
    # Data parallel: both ranks end with the same parameters.
    for name in results[0]["train"]:
        a, b = results[0]["train"][name][0][1], results[1]["train"][name][0][1]
        assert max(abs(p - q) for p, q in zip(a, b)) < 1e-12, f"{name}: ranks diverged"


def test_argument_checks_without_a_process_group():
    from fastclip import ClipLoss, SigLipLoss

    with pytest.raises(TypeError, match="check_batch_sizes"):
        ClipLoss(check_batch_sizes=1)
    with pytest.raises(TypeError, match="check_batch_sizes"):
        SigLipLoss(check_batch_sizes="yes")
    with pytest.raises(ValueError, match="dist_impl"):
        ClipLoss(dist_impl="bidir")
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ClipLoss(rank=1, world_size=2)(x, x, torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="init_process_group"):
        SigLipLoss(rank=0, world_size=2)(x, x, torch.tensor(1.0), torch.tensor(0.0))


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (one NCCL rank per GPU)")
def test_nccl_two_gpus(tmp_path):
    """W=2 on NCCL with CUDA tensors: every ClipLoss flag combination x strategy and every SigLipLoss
    dist_impl, float32 and bfloat16, chunked torch blocks and Triton kernels, within open_clip's own
    error budget against float64 (open_clip running in the same NCCL world)."""
    results = _spawn(2, ("nccl",), tmp_path)
    _assert_clean(results, "nccl", min_checks=4 * 52)
