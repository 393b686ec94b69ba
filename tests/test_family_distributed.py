"""The contrastive family on 2 and 3 gloo processes: each rank's loss and gradients equal the float64
reference's for that rank's rows against the whole batch's columns (sentence-transformers'
gather_across_devices semantics: the gathered columns' gradients flow back to their owners), and the
mean of the ranks' losses is the single-process loss of the concatenated batch.

One spawned world per world size runs every case; ranks write failures to a JSON file.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

ALL_DIRS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
CASES = [
    ("plain", dict(), 0, False),
    ("hard negatives, all directions", dict(directions=ALL_DIRS, hardness="in_batch_negatives", hardness_strength=2.0), 2, False),
    ("per_direction", dict(directions=("query_to_doc", "doc_to_query"), partition="per_direction", hardness="hard_negatives", hardness_strength=1.0), 1, False),
    ("ids positive + smoothing + bank", dict(directions=ALL_DIRS, duplicates="positive", label_smoothing=0.1, ids=True), 1, True),
    ("ids ignore, dot", dict(similarity="dot", ids=True, hardness="all_negatives", hardness_strength=1.0), 2, False),
]  # fmt: skip


def _global(world, n, d, k, seed):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(world * n, d, generator=g, dtype=torch.float64) for _ in range(k + 2)]
    ids = torch.randint(0, 3, (world * n,), generator=g)
    neg_ids = torch.randint(0, 3, (world * n, k), generator=g) if k else None
    bank = torch.randn(4, d, generator=g, dtype=torch.float64)
    return ts, ids, neg_ids, bank


def _reference_all_ranks(ts, ids, neg_ids, bank, kw, world, n, scale):
    """sum_r loss_r from the reference, and its gradients: rank r's features get d(sum_r loss_r)."""
    from fastclip.reference_family import info_nce_reference

    leaves = [t.clone().requires_grad_() for t in ts]
    losses = []
    for r in range(world):
        sl = slice(r * n, (r + 1) * n)
        q, p, *negs = leaves
        extra = {}
        if kw.get("ids"):
            extra = dict(
                query_ids=ids[sl], negative_ids=None if neg_ids is None else neg_ids[sl],
                all_query_ids=ids, all_negative_ids=None if neg_ids is None else neg_ids.unbind(1),
            )  # fmt: skip
        opts = {k: v for k, v in kw.items() if k != "ids"}
        losses.append(
            info_nce_reference(
                q[sl],
                p[sl],
                [t[sl] for t in negs],
                scale=scale,
                all_queries=q,
                all_positives=p,
                all_negatives=negs,
                offset=r * n,
                bank=bank,
                **opts,
                **extra,
            )  # fmt: skip
        )
    total = sum(losses)
    grads = torch.autograd.grad(total, leaves)
    return [float(x.detach()) for x in losses], grads


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    failures, checked = [], 0
    try:
        from fastclip.comm import comm_stats
        from fastclip.distributed import gist_loss_distributed, info_nce_loss_distributed
        from fastclip.reference_family import gist_reference

        n, d = 5, 6
        for c_i, (name, kw, k, use_bank) in enumerate(CASES):
            ts, ids, neg_ids, bank = _global(world, n, d, k, seed=10 + c_i)
            bank = bank if use_bank else None
            want_losses, want_grads = _reference_all_ranks(ts, ids, neg_ids, bank, kw, world, n, 6.0)
            sl = slice(rank * n, (rank + 1) * n)
            runs = [
                ("gather", torch.float64, 1e-9),
                ("gather", torch.float32, 2e-5),
                ("ring", torch.float64, 1e-9),
            ]
            for dist_impl, dtype, tol in runs:
                local = [t[sl].to(dtype).clone().requires_grad_() for t in ts]
                opts = {key: v for key, v in kw.items() if key != "ids"}
                if kw.get("ids"):
                    opts.update(query_ids=ids[sl], negative_ids=None if neg_ids is None else neg_ids[sl])
                q, p, *negs = local
                with comm_stats() as moved:
                    loss = info_nce_loss_distributed(
                        q, p, negs or None, scale=6.0, bank=None if bank is None else bank.to(dtype),
                        impl="torch", chunk_size=2, dist_impl=dist_impl, **opts,
                    )  # fmt: skip
                # the ring never all-gathers features: only P2P messages move
                kinds = set(moved.sent) - {"check_batch_sizes"}
                if dist_impl == "ring" and kinds != {"p2p"} or dist_impl == "gather" and "p2p" in kinds:
                    failures.append(f"{name} {dist_impl}: collectives {moved.sent}")
                loss.backward()
                checked += 1
                errs = [abs(float(loss) - want_losses[rank])]
                errs += [float((t.grad.double() - w[sl]).abs().max()) for t, w in zip(local, want_grads)]
                if not max(errs) <= tol * 10:
                    failures.append(
                        f"{name} {dist_impl} {dtype}: max err {max(errs):.3e} (loss, grads: {errs})"
                    )
        # GIST: positives/negatives gathered, anchors local
        g = torch.Generator().manual_seed(99)
        xs = [torch.randn(world * n, d, generator=g, dtype=torch.float64) for _ in range(3)]
        gs = [torch.randn(world * n, 4, generator=g, dtype=torch.float64) for _ in range(3)]
        leaves = [t.clone().requires_grad_() for t in xs]
        total = 0
        for r in range(world):
            s = slice(r * n, (r + 1) * n)
            total = total + gist_reference(
                leaves[0][s], leaves[1][s], leaves[2][s], guide_query=gs[0][s], guide_positive=gs[1][s],
                guide_negative=gs[2][s], temperature=0.05, margin=0.1, all_positives=leaves[1],
                all_negatives=leaves[2], all_guide_positives=gs[1], all_guide_negatives=gs[2], offset=r * n,
            )  # fmt: skip
        want = torch.autograd.grad(total, leaves)
        sl = slice(rank * n, (rank + 1) * n)
        local = [t[sl].clone().requires_grad_() for t in xs]
        loss = gist_loss_distributed(
            local[0], local[1], local[2], guide_query=gs[0][sl], guide_positive=gs[1][sl],
            guide_negative=gs[2][sl], temperature=0.05, margin=0.1, impl="torch", chunk_size=3,
        )  # fmt: skip
        loss.backward()
        checked += 1
        err = max(float((t.grad - w[sl]).abs().max()) for t, w in zip(local, want))
        if not err <= 1e-8:
            failures.append(f"gist: max grad err {err:.3e}")
        # The module (distributed=True) calls the same entry: the same loss and gradients, bitwise.
        from fastclip import GistLoss

        again = [t[sl].clone().requires_grad_() for t in xs]
        mod = GistLoss(temperature=0.05, margin=0.1, impl="torch", chunk_size=3, distributed=True)
        mloss = mod(again[0], again[1], again[2], guide_query=gs[0][sl], guide_positive=gs[1][sl],
                    guide_negative=gs[2][sl])  # fmt: skip
        mloss.backward()
        checked += 1
        if not torch.equal(mloss, loss) or not all(torch.equal(a.grad, b.grad) for a, b in zip(again, local)):
            failures.append(
                f"GistLoss(distributed=True): {float(mloss)} vs gist_loss_distributed {float(loss)}"
            )
        # unequal local batches: a ValueError on every rank, not a hang
        try:
            info_nce_loss_distributed(torch.randn(3 + rank, 4), torch.randn(3 + rank, 4))
            failures.append("unequal batches: no error")
        except ValueError:
            pass
    except Exception:
        failures.append(traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"failures": failures, "checked": checked}, f)
    _teardown()


def _teardown():
    """After the results are written: every rank's traffic done, the group torn down, and the process
    left with ``os._exit(0)``. Without that, about one run in ten aborted in interpreter shutdown after
    every rank had destroyed its group ("terminate called without an active exception"; one in 30 with
    the barrier alone), which mp.spawn reports as a failed test although the results were complete
    (docs/design.md, "Platform facts")."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("world", [2, 3])
def test_family_distributed_matches_reference(world, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    for r in range(world):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert not res["failures"], f"rank {r}: " + "\n".join(res["failures"])
        assert res["checked"] == 3 * len(CASES) + 2  # + GIST, + the GIST module


def test_distributed_without_process_group_is_a_value_error():
    from fastclip.distributed import info_nce_loss_distributed

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        info_nce_loss_distributed(torch.randn(3, 4), torch.randn(3, 4))


# ----------------------------------------------------------------------------------------------------
# ranks that disagree on the call's shape: the same ValueError on every rank within seconds, not a
# hang until the process group's timeout (nor a finite loss from mismatched collectives, nor SIGABRT)

PG_TIMEOUT_S = 20  # a call that hangs fails at the process group's timeout: well past the 8 s allowed


def _disagreement_cases():
    """(name, words the message must contain, call(rank) -> loss). Rank 0 and rank 1 differ."""
    from fastclip.distributed import gist_loss_distributed, info_nce_loss_distributed

    def t(rows=4, d=6, dtype=torch.float32, seed=0):
        return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)

    ids = torch.tensor([0, 1, 2, 3])
    cases = []
    for di in ("gather", "ring"):

        def nce(rank, di=di, **kw):
            return info_nce_loss_distributed(kw.pop("q", t()), kw.pop("p", t(seed=1)), dist_impl=di, **kw)

        cases += [
            (
                f"{di}: negatives on rank 0 only",
                ["negatives", "[1, 0]"],
                lambda r, f=nce: f(r, negatives=[t(seed=2)] if r == 0 else None),
            ),
            (
                f"{di}: 2 vs 1 negatives",
                ["negatives", "[2, 1]"],
                lambda r, f=nce: f(r, negatives=[t(seed=2), t(seed=3)][: 2 - r]),
            ),
            (
                f"{di}: query_ids on rank 1 only",
                ["query_ids"],
                lambda r, f=nce: f(r, query_ids=ids if r == 1 else None),
            ),
            (
                f"{di}: negative_ids on rank 0 only",
                ["negative_ids"],
                lambda r, f=nce: f(
                    r, negatives=[t(seed=2)], query_ids=ids, negative_ids=ids[:, None] if r == 0 else None
                ),
            ),
            (
                f"{di}: directions",
                ["directions", "query_to_query"],
                lambda r, f=nce: f(r, directions=("query_to_doc", "query_to_query")[: 1 + r]),
            ),
            (
                f"{di}: dtype",
                ["dtype", "float64"],
                lambda r, f=nce: f(
                    r,
                    q=t(dtype=torch.float64 if r else torch.float32),
                    p=t(seed=1, dtype=torch.float64 if r else torch.float32),
                ),
            ),
            (
                f"{di}: feature dim",
                ["dim", "[6, 8]"],
                lambda r, f=nce: f(r, q=t(d=6 + 2 * r), p=t(seed=1, d=6 + 2 * r)),
            ),
            (
                f"{di}: batch",
                ["batch", "[4, 5]"],
                lambda r, f=nce: f(r, q=t(rows=4 + r), p=t(rows=4 + r, seed=1)),
            ),
        ]
    cases.append(
        (
            "dist_impl",
            ["dist_impl", "gather", "ring"],
            lambda r: info_nce_loss_distributed(t(), t(seed=1), dist_impl=("gather", "ring")[r]),
        )
    )

    def gist(rank, neg, gd=6, gdn=None):
        g = dict(guide_query=t(d=gd, seed=5), guide_positive=t(d=gd, seed=6))
        if neg:
            g["guide_negative"] = t(d=gd if gdn is None else gdn, seed=7)
        return gist_loss_distributed(t(), t(seed=1), t(seed=2) if neg else None, **g)

    cases += [
        ("gist: negative on rank 0 only", ["negative", "[given, None]"], lambda r: gist(r, r == 0)),
        ("gist: guide dim", ["guide", "[6, 5]"], lambda r: gist(r, True, gd=6 - r)),
        # guide dim != D and a negative on one rank: aborted the process (SIGABRT) inside gloo
        ("gist: negative on rank 1 only, guide dim 3", ["negative", "[None, given]"], lambda r: gist(r, r == 1, gd=3)),
    ]  # fmt: skip
    # one rank's own checks refuse its arguments: it raises its error, the other names it (no hang)
    nan = t()
    nan[1, 2] = float("nan")
    cases += [
        ("refused: query_ids of 3 rows on rank 1", {0: ["refused", "[1]"], 1: ["query_ids", "(4,)"]},
         lambda r: info_nce_loss_distributed(t(), t(seed=1), query_ids=ids[: 4 - r], dist_impl="ring")),
        ("refused: dist_impl on rank 0", {0: ["dist_impl", "'sideways'"], 1: ["refused", "[0]"]},
         lambda r: info_nce_loss_distributed(t(), t(seed=1), dist_impl=("sideways", "gather")[r])),
        ("refused: GIST with dist_impl ring (no ring form: was silently gather)",
         {0: ["dist_impl", "'ring'", "GIST"], 1: ["dist_impl", "'ring'", "GIST"]},
         lambda r: gist_loss_distributed(t(), t(seed=1), guide_query=t(seed=5), guide_positive=t(seed=6),
                                         dist_impl="ring")),
        ("refused: check_finite, NaN on rank 1", {0: ["refused", "[1]"], 1: ["query", "finite"]},
         lambda r: gist_loss_distributed(nan if r else t(), t(seed=1), guide_query=t(seed=5),
                                         guide_positive=t(seed=6), check_finite=True)),
    ]  # fmt: skip
    return cases


def _disagree_worker(rank, world, port, out_dir):
    import datetime
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S)
    )
    results = {}
    try:
        for name, words, call in _disagreement_cases():
            start = time.monotonic()
            try:
                loss = call(rank)
                outcome = f"no error (loss {float(loss):.4g})"
            except ValueError as e:
                outcome = "ValueError: " + str(e)
            except Exception as e:  # a hang ends here, at the process group's timeout
                outcome = f"{type(e).__name__}: {e}"
            results[name] = (outcome, words, time.monotonic() - start)
            _dump(results, out_dir, rank)  # kept if a later case kills the process
        # the group is still in step: an agreeing call works
        from fastclip.distributed import info_nce_loss_distributed

        loss = info_nce_loss_distributed(torch.ones(3, 4) + rank, torch.ones(3, 4), dist_impl="ring")
        results["after"] = (f"loss {float(loss):.6f}", [], 0.0)
    except Exception:
        results["crash"] = (traceback.format_exc(), [], 0.0)
    _dump(results, out_dir, rank)
    _teardown()


def _dump(results, out_dir, rank):
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(path + ".tmp", path)


def test_ranks_that_disagree_raise_the_same_value_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    failures = []
    try:
        mp.spawn(_disagree_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    except Exception as e:  # a rank died (gloo's abort on mismatched collectives)
        failures.append(f"spawn: {type(e).__name__}: {str(e)[-300:]}")
    res = []
    for r in range(2):
        path = tmp_path / f"rank{r}.json"
        res.append(json.loads(path.read_text()) if path.exists() else {})
    for name, _, _ in _disagreement_cases():
        got = [rr.get(name) for rr in res]
        if any(g is None for g in got):
            failures.append(f"{name}: no result on rank {[g is None for g in got].index(True)}")
            continue
        (m0, words, t0), (m1, _, t1) = got
        if isinstance(words, dict):  # a refusal: each rank its own message
            for r, m in enumerate((m0, m1)):
                if not m.startswith("ValueError") or [w for w in words[str(r)] if w not in m]:
                    failures.append(
                        f"{name}: rank {r} {m[:300]!r}, expected a ValueError with {words[str(r)]}"
                    )
        elif not m0.startswith("ValueError") or m0 != m1:
            failures.append(f"{name}: rank 0 {m0[:300]!r} | rank 1 {m1[:300]!r}")
        elif missing := [w for w in words if w not in m0]:
            failures.append(f"{name}: the message lacks {missing}: {m0!r}")
        if max(t0, t1) > 8.0:
            failures.append(f"{name}: took {max(t0, t1):.1f} s")
    after = [rr.get("after", ("missing",))[0] for rr in res]
    if not all(a.startswith("loss") for a in after):
        failures.append(f"agreeing call after the errors: {after}")
    assert not failures, "\n".join(failures)
