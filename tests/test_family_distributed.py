"""The contrastive family on 2 and 3 gloo processes: each rank's loss and gradients equal the float64
reference's for that rank's rows against the whole batch's columns (sentence-transformers'
gather_across_devices semantics: the gathered columns' gradients flow back to their owners), and the
mean of the ranks' losses is the single-process loss of the concatenated batch.

One spawned world per world size runs every case; ranks write failures to a JSON file.
"""

from __future__ import annotations

import json
import os
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
    dist.destroy_process_group()


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
        assert res["checked"] == 3 * len(CASES) + 1


def test_distributed_without_process_group_is_a_value_error():
    from fastclip.distributed import info_nce_loss_distributed

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        info_nce_loss_distributed(torch.randn(3, 4), torch.randn(3, 4))
