"""The sentence-transformers drop-in on 2 gloo processes with ``gather_across_devices=True``.

Oracle: sentence-transformers' own classes in the same world (its all_gather_with_grad layout: each
rank's rows against every rank's columns, offset rank * n, gradients flowing back to each rank).
Each rank embeds its own slice of one global batch with the same tiny model; per rank, the loss and
every parameter's gradient must equal sentence-transformers'. One world runs every case (start-up
costs seconds); each rank writes its failures to a JSON file that the test reads back.
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

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2
N = 4  # rows per rank
RTOL, ATOL = 1e-4, 1e-6


def _cases(fc, st, model, guide):
    """(name, fastclip loss, sentence-transformers loss, columns)."""
    both = lambda name, cls, columns, *args, **kw: (  # noqa: E731
        name,
        getattr(fc, cls)(*args, gather_across_devices=True, **kw),
        getattr(st, cls)(*args, gather_across_devices=True, **kw),
        columns,
    )
    gte = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
    cases = [
        both("mnrl pairs", "MultipleNegativesRankingLoss", 2, model),
        both("mnrl triplets gte all_negatives", "MultipleNegativesRankingLoss", 3, model, directions=gte,
             hardness_mode="all_negatives", hardness_strength=2.0),
        both("mnrl 4-tuples symmetric dot", "MultipleNegativesRankingLoss", 4, model, scale=0.5,
             similarity_fct=fc._st_util.dot_score, directions=("query_to_doc", "doc_to_query"),
             partition_mode="per_direction", hardness_mode="hard_negatives", hardness_strength=2.0),
        both("cached mnrl triplets", "CachedMultipleNegativesRankingLoss", 3, model, mini_batch_size=3,
             directions=("query_to_doc", "doc_to_doc"), hardness_mode="in_batch_negatives", hardness_strength=2.0),
        both("gist pairs", "GISTEmbedLoss", 2, model, guide, temperature=0.05, margin=0.02),
        both("gist triplets relative", "GISTEmbedLoss", 3, model, guide, temperature=0.05,
             margin_strategy="relative", margin=0.05, contrast_anchors=False),
        both("cached gist triplets", "CachedGISTEmbedLoss", 3, model, guide, temperature=0.05, mini_batch_size=3,
             contrast_positives=False),
        # a negative margin: the guide removes no self column, so only the self-column rule does (at the
        # rank's offset in the gathered positives)
        both("gist triplets negative margin", "GISTEmbedLoss", 3, model, guide, temperature=0.05, margin=-0.5),
        both("cached gist pairs negative margin", "CachedGISTEmbedLoss", 2, model, guide, temperature=0.05,
             mini_batch_size=3, margin=-0.5),
    ]  # fmt: skip
    from fastclip.distributed.family import FAMILY_DIST_IMPLS

    if "ring" in FAMILY_DIST_IMPLS:  # the core's ring: never all ranks' embeddings at once
        ring = both("mnrl triplets ring", "MultipleNegativesRankingLoss", 3, model, directions=gte)
        ring[1].dist_impl = "ring"
        cases.append(ring)
    return cases


def _worker(rank, world, tmpdir, model_dir, guide_dir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    result = {"failures": [], "checks": 0}
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world
        )
        import _st_fixtures as F
        from sentence_transformers.sentence_transformer import losses as st

        from fastclip.integrations import sentence_transformers as fc

        model, guide = F.load_model(model_dir), F.load_model(guide_dir)
        full = F.batch(model, N * world, 4, seed=11)  # the global batch, every rank builds it alike
        texts_rows = slice(rank * N, (rank + 1) * N)
        local = [{k: (v[texts_rows] if torch.is_tensor(v) else v) for k, v in f.items()} for f in full]
        for name, ours, ref, columns in _cases(fc, st, model, guide):
            got = F.run_loss(ours, model, local[:columns])
            want = F.run_loss(ref, model, local[:columns])
            result["failures"] += [f"rank {rank}: {line}" for line in F.compare(name, got, want, RTOL, ATOL)]
            result["checks"] += 1
    except Exception:
        result["failures"].append(f"rank {rank} crashed:\n{traceback.format_exc()}")
    finally:
        with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def test_gather_across_devices_two_processes(tmp_path):
    import _st_fixtures as F

    model_dir = F.build_model_dir(str(tmp_path / "model"), seed=0)
    guide_dir = F.build_model_dir(str(tmp_path / "guide"), seed=1)
    mp.start_processes(
        _worker,
        args=(WORLD, str(tmp_path), model_dir, guide_dir),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    results = []
    for r in range(WORLD):
        with open(tmp_path / f"rank{r}.json") as f:
            results.append(json.load(f))
    failures = [line for res in results for line in res["failures"]]
    assert not failures, f"{len(failures)} failures, first ones:\n" + "\n".join(failures[:12])
    from fastclip.distributed.family import FAMILY_DIST_IMPLS

    expected = 9 + ("ring" in FAMILY_DIST_IMPLS)
    assert all(res["checks"] == expected for res in results), [res["checks"] for res in results]
