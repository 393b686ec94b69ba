"""fastclip.integrations.transformers against the installed transformers: tiny random models, offline.

Each covered model (CLIP, ChineseCLIP, AltCLIP, VisionTextDualEncoder, SigLIP, SigLIP2) is built from
a tiny config (hidden 16, one layer, 16x16 images, 64-token vocabulary); the patched forward must
give transformers' loss and every parameter's gradient (logit_scale and logit_bias included) to
float32 rounding, dropout on (same seed, same masks), in fp32 and under bf16 autocast; no op may
produce a B x B tensor in a training step; the logits appear when asked for. Then Trainer on a tiny
VisionTextDualEncoder (CLIP vision tower + BERT, as the contrastive-image-text example builds it):
per-step losses with and without the patch, and on 2 gloo processes with the global loss against
one process on the concatenated batch.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:  # the patch refuses 4.x's forwards (other arguments)
    pytest.skip("fastclip.integrations.transformers is written for transformers 5.x", allow_module_level=True)

import fastclip.integrations.transformers as fct  # noqa: E402

FAMILIES = ("clip", "chinese_clip", "altclip", "dual_encoder", "siglip", "siglip2")
VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=16,
    patch_size=8,
)
TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=24, bos_token_id=0, eos_token_id=2, pad_token_id=1)  # fmt: skip
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build(family: str, *, dropout: bool = True, seed: int = 0):
    """A tiny random model of ``family`` (transformers' default dropouts unless ``dropout=False``)."""
    T = transformers
    text = TEXT if dropout else dict(TEXT, **NO_DROPOUT)
    torch.manual_seed(seed)
    if family == "clip":
        model = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=8))
    elif family == "chinese_clip":
        model = T.ChineseCLIPModel(
            T.ChineseCLIPConfig(text_config=text, vision_config=VISION, projection_dim=8)
        )
    elif family == "altclip":
        config = T.AltCLIPConfig(
            text_config=dict(text, project_dim=8), vision_config=VISION, projection_dim=8
        )
        model = T.AltCLIPModel(config)
    elif family == "dual_encoder":  # as examples/pytorch/contrastive-image-text builds it, from configs
        config = T.VisionTextDualEncoderConfig.from_vision_text_configs(
            T.CLIPVisionConfig(**VISION), T.BertConfig(**text), projection_dim=8
        )
        model = T.VisionTextDualEncoderModel(config=config)
    elif family == "siglip":
        model = T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=VISION))
    elif family == "siglip2":
        model = T.Siglip2Model(
            T.Siglip2Config(text_config=text, vision_config=dict(VISION, num_patches=16, patch_size=4))
        )
    else:
        raise ValueError(family)
    with torch.no_grad():  # away from the init values, so that a wrong exp/clamp would show
        model.logit_scale.fill_(math.log(7.0))
        if hasattr(model, "logit_bias"):
            model.logit_bias.fill_(-3.0)
    return model.train()


def batch(family: str, n: int = 6, length: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (n, length), generator=g)
    ids[:, -1] = 2  # eos: CLIP's text tower pools there
    out = dict(input_ids=ids, attention_mask=torch.ones(n, length, dtype=torch.long))
    if family == "siglip2":  # NaFlex: flattened 4x4 patches, 4x4 grid
        out["pixel_values"] = torch.randn(n, 16, 48, generator=g)
        out["pixel_attention_mask"] = torch.ones(n, 16, dtype=torch.long)
        out["spatial_shapes"] = torch.tensor([[4, 4]] * n)
    else:
        out["pixel_values"] = torch.randn(n, 3, 16, 16, generator=g)
    return out


def loss_and_grads(model, inputs, seed=5, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both runs
    out = model(**inputs, return_loss=True, **kw)
    out.loss.backward()
    return out, {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, rel: float, what: str):
    assert got.keys() == want.keys(), f"{what}: gradients of {sorted(set(got) ^ set(want))} on one side only"
    scale = max(float(g.abs().max()) for g in want.values())
    worst = max(want, key=lambda k: float((got[k] - want[k]).abs().max()))
    err = float((got[worst] - want[worst]).abs().max())
    assert err <= rel * scale, f"{what}: grad of {worst} off by {err:.3e} (largest gradient {scale:.3e})"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


# ----------------------------------------------------------------------------------------------------
# Loss, gradients, outputs


def test_same_loss_and_gradients_fp32(family):
    model, inputs = build(family), batch(family)
    want, want_g = loss_and_grads(model, inputs)
    with fct.patch(model) as handle:
        assert handle.targets == (f"<instance of {type(model).__name__}>",)
        got, got_g = loss_and_grads(model, inputs)
    assert got.loss.dim() == 0 and got.loss.dtype == torch.float32
    assert abs(float(got.loss) - float(want.loss)) <= 2e-6 * max(1.0, abs(float(want.loss))), (
        got.loss,
        want.loss,
    )
    assert "logit_scale" in got_g and (family not in ("siglip", "siglip2") or "logit_bias" in got_g)
    assert_grads_close(got_g, want_g, 2e-6, family)
    for name in ("logit_scale", "logit_bias"):
        if name in want_g:
            assert torch.allclose(got_g[name], want_g[name], rtol=1e-5, atol=1e-7), (
                name,
                got_g[name],
                want_g[name],
            )
    # same output class and embeddings; logits not computed in a training step (logits="eval")
    assert type(got) is type(want)
    assert torch.allclose(got.text_embeds, want.text_embeds, atol=1e-6)
    assert torch.allclose(got.image_embeds, want.image_embeds, atol=1e-6)
    assert got.logits_per_image is None and got.logits_per_text is None
    assert got.text_model_output is not None and got.vision_model_output is not None


def test_eval_mode_and_tuple_outputs(family):
    model, inputs = build(family), batch(family)
    model.eval()
    with torch.no_grad():
        want = model(**inputs, return_loss=True)
        want_tuple = model(**inputs, return_loss=True, return_dict=False)
        with fct.patch(model):
            got = model(**inputs, return_loss=True)  # eval mode: logits for the caller (evaluation)
            got_tuple = model(**inputs, return_loss=True, return_dict=False)
            plain = model(**inputs)  # no return_loss: transformers' own forward
            hidden = model(**inputs, return_loss=True, output_hidden_states=True)  # flags reach the towers
    assert torch.allclose(got.loss, want.loss, atol=2e-6)
    assert torch.allclose(got.logits_per_image, want.logits_per_image, atol=1e-5)
    assert torch.allclose(got.logits_per_text, want.logits_per_text, atol=1e-5)
    assert plain.loss is None and plain.logits_per_image is not None
    assert (
        hidden.vision_model_output.hidden_states is not None
        and hidden.text_model_output.hidden_states is not None
    )
    assert len(got_tuple) == len(want_tuple)  # positional layout kept, logits included
    for a, b in zip(got_tuple[:5], want_tuple[:5]):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("mode", ["always", "never", "eval"])
def test_logits_option(mode):
    model, inputs = build("siglip"), batch("siglip")
    with fct.patch(model, logits=mode):
        train_out = model(**inputs, return_loss=True)
        model.eval()
        eval_out = model(**inputs, return_loss=True)
    assert (train_out.logits_per_image is not None) == (mode == "always")
    assert (eval_out.logits_per_image is not None) == (mode != "never")
    if mode == "always":
        ref = model(**inputs, return_loss=True)  # eval mode, unpatched
        assert torch.allclose(train_out.logits_per_text, ref.logits_per_text, atol=1e-5)
        assert train_out.logits_per_text.requires_grad


def test_bf16_autocast(family):
    """Under bf16 autocast: within bf16 rounding of transformers (which computes the logits in bf16);
    the loss stage itself within float32 rounding of a float64 loss of the same embeddings."""
    model, inputs = build(family), batch(family)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_g = loss_and_grads(model, inputs)
        with fct.patch(model):
            got, got_g = loss_and_grads(model, inputs)
    assert abs(float(got.loss) - float(want.loss)) <= 1e-2 * max(1.0, abs(float(want.loss))), (
        got.loss,
        want.loss,
    )
    assert_grads_close(got_g, want_g, 3e-2, f"{family} bf16")  # measured: <= 1.0e-2
    # the fused loss of the embeddings the model produced, against float64
    img, txt = got.image_embeds.detach().double(), got.text_embeds.detach().double()
    logits = txt @ img.T * model.logit_scale.detach().double().exp()
    if family in ("siglip", "siglip2"):
        logits = logits + model.logit_bias.detach().double()
        labels = 2 * torch.eye(len(logits), dtype=torch.float64) - 1
        truth = -torch.nn.functional.logsigmoid(labels * logits).sum(-1).mean()
    else:
        target = torch.arange(len(logits))
        truth = (
            torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target)
        ) / 2
    assert got.loss.dtype == torch.float32
    assert abs(float(got.loss) - float(truth)) <= 1e-5 * max(1.0, float(truth)), (
        float(got.loss),
        float(truth),
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fam", ["clip", "siglip"])
def test_bf16_autocast_on_cuda(fam):
    """What users run: the patched model on CUDA under bf16 autocast (the embeddings reach the loss in
    fp32 there: CUDA autocast normalizes in fp32; the fused loss computes them in bf16, as the model's
    own matmul does), loss and gradients within bf16 rounding of transformers' own forward."""
    model = build(fam).cuda()
    inputs = {k: v.cuda() for k, v in batch(fam).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, want_g = loss_and_grads(model, inputs)
        with fct.patch(model):
            got, got_g = loss_and_grads(model, inputs)
    assert got.loss.dtype == torch.float32 and got.loss.is_cuda
    assert abs(float(got.loss) - float(want.loss)) <= 1e-2 * max(1.0, abs(float(want.loss))), (
        got.loss,
        want.loss,
    )
    assert_grads_close(got_g, want_g, 3e-2, f"{fam} cuda bf16")


class _Shapes(TorchDispatchMode):
    """Records every op output's shape."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("fam", ["clip", "siglip"])
def test_training_step_builds_no_batch_by_batch_tensor(fam):
    n = 13  # no other dimension of the tiny models is 13
    model, inputs = build(fam), batch(fam, n=n)

    def square_tensors(**kw):
        with _Shapes() as rec:
            out = model(**inputs, return_loss=True)
            out.loss.backward()
        return [s for s in rec.shapes if len(s) >= 2 and s[-2:] == (n, n)]

    assert square_tensors(), "the control (transformers' forward) should build the n x n logits"
    with fct.patch(model, impl="torch", chunk_size=4):  # 4 rows per block: a (4, 13) workspace
        assert square_tensors() == []


# ----------------------------------------------------------------------------------------------------
# Patching, undoing, errors


def test_patch_by_class_and_undo():
    T = transformers
    original = T.CLIPModel.__dict__["forward"]
    model, inputs = build("clip"), batch("clip")
    sig = inspect.signature(model.forward)
    with fct.patch(T.CLIPModel) as handle:
        assert handle.targets == ("CLIPModel",) and fct.is_patched(model) and fct.is_patched(T.CLIPModel)
        assert T.CLIPModel.__dict__["forward"] is not original
        assert inspect.signature(model.forward) == sig  # Trainer reads the forward's parameters
        assert build("clip")(**inputs, return_loss=True).logits_per_image is None  # new instances too
        with pytest.raises(RuntimeError, match="already patched through CLIPModel"):
            fct.patch(model)
        captured = model.forward
    assert T.CLIPModel.__dict__["forward"] is original and not fct.is_patched(T.CLIPModel)
    assert captured(**inputs, return_loss=True).logits_per_image is not None  # undone: transformers' own


def test_patch_instance_only_and_errors():
    T = transformers
    model, other, inputs = build("clip"), build("clip"), batch("clip")
    handle = fct.patch(model)
    assert fct.is_patched(model) and not fct.is_patched(other) and not fct.is_patched(T.CLIPModel)
    assert other(**inputs, return_loss=True).logits_per_image is not None
    with pytest.raises(RuntimeError, match="already patched") as e:
        fct.patch(model)
    assert "\n" not in str(e.value)
    handle.undo()
    assert "forward" not in model.__dict__ and not fct.is_patched(model)
    with pytest.raises(RuntimeError, match="already undone") as e:
        handle.undo()
    assert "\n" not in str(e.value)
    with fct.patch(model) as h2:
        h2.undo()  # the with block does not undo a second time
    with pytest.raises(TypeError, match="expected one of CLIPModel") as e:
        fct.patch(T.BertModel)
    assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="got an instance of Linear"):
        fct.patch(torch.nn.Linear(2, 2))

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(TypeError, match=r"patch that \(.module\)"):
        fct.patch(Wrapper(model))

    class MyCLIP(T.CLIPModel):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    with pytest.raises(TypeError, match="MyCLIP overrides CLIPModel.forward"):
        fct.patch(MyCLIP)

    class PlainSub(T.CLIPModel):
        pass

    with fct.patch(PlainSub):  # a subclass that keeps transformers' forward: patched, then restored
        assert "forward" in PlainSub.__dict__ and not fct.is_patched(T.CLIPModel)
    assert "forward" not in PlainSub.__dict__
    for bad, match in [(dict(logits="lazy"), "logits"), (dict(dist_impl="bidir"), "dist_impl"),
                       (dict(impl="reference"), "impl"), (dict(global_loss=1), "global_loss")]:  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=match):
            fct.patch(model, **bad)
    assert not fct.is_patched(model)


def test_undo_under_a_wrapper_that_captured_the_forward():
    """accelerate's mixed precision stores ``model.forward`` inside an autocast wrapper (an instance
    attribute); after undo that wrapper stays and must run transformers' own forward."""
    import types

    model, inputs = build("clip"), batch("clip")
    handle = fct.patch(model)
    model.forward = types.MethodType(
        torch.autocast("cpu", dtype=torch.bfloat16)(model.forward.__func__), model
    )
    assert model(**inputs, return_loss=True).logits_per_image is None  # patched, through the wrapper
    handle.undo()
    assert not fct.is_patched(model)
    assert model(**inputs, return_loss=True).logits_per_image is not None  # transformers' own


def test_patch_all_classes():
    with fct.patch() as handle:
        assert set(handle.targets) == set(fct.SUPPORTED)
        with pytest.raises(RuntimeError, match="already patched"):
            fct.patch(transformers.SiglipModel)
        model, inputs = build("siglip2"), batch("siglip2")
        assert model(**inputs, return_loss=True).logits_per_image is None
    assert not any(fct.is_patched(getattr(transformers, name)) for name in fct.SUPPORTED)
    assert "undone" in repr(handle)


# ----------------------------------------------------------------------------------------------------
# Trainer, end to end


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 3):
        self.b = batch("dual_encoder", n=n, length=7, seed=seed)

    def __len__(self):
        return len(self.b["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.b.items()}


def _collate(examples):  # the contrastive-image-text example's collate_fn
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "attention_mask": torch.stack([e["attention_mask"] for e in examples]),
        "return_loss": True,
    }


def assert_same_parameters(a, b, atol):
    """Parameters equal after training, but for the attention key biases: their gradient is zero
    up to rounding (softmax ignores a shift), which Adam scales up to lr-sized steps."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if name.endswith(("k_proj.bias", "key.bias")):
            continue
        err = float((p - q).abs().max())
        assert err <= atol, f"{name}: parameters differ by {err:.3e} after training"


def run_trainer(model, out_dir, *, batch_size, steps=3, sampling="random", n_samples=None):
    """Trainer for ``steps`` steps; returns each step's loss, as the model returned it."""
    losses = []
    hook = model.register_forward_hook(lambda m, i, out: losses.append(float(out["loss"])))
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=5e-3,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy=sampling,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Pairs(n_samples or batch_size * steps), data_collator=_collate
    )
    trainer.train()
    hook.remove()
    return losses


WORLD, LOCAL_N, STEPS = 2, 4, 3


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """transformers' own loss, one process, batch WORLD * LOCAL_N: (per-step losses, trained model)."""
    model = build("dual_encoder", dropout=False)
    out = tmp_path_factory.mktemp("plain")
    losses = run_trainer(model, out, batch_size=WORLD * LOCAL_N, steps=STEPS, sampling="sequential")
    return losses, model


@pytest.mark.slow
def test_trainer_same_losses_with_and_without_patch(tmp_path, single_process_run):
    want, plain = single_process_run
    fused = build("dual_encoder", dropout=False)
    with fct.patch(fused):
        got = run_trainer(fused, tmp_path, batch_size=WORLD * LOCAL_N, steps=STEPS, sampling="sequential")
    assert len(got) == len(want) == STEPS
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(got, want)), (got, want)
    assert len(set(round(x, 4) for x in want)) > 1, f"the loss should move: {want}"
    assert_same_parameters(fused, plain, 1e-5)


# ----------------------------------------------------------------------------------------------------
# Two gloo processes, global loss


def _dist_checks(rank, world, result):
    """Model level: each rank's half with global_loss; DDP's average of the gradients against one
    process on the whole batch, transformers' own forward."""
    for fam in ("clip", "siglip"):
        for dist_impl in ("gather", "ring"):
            model = build(fam, dropout=False)
            full = batch(fam, n=LOCAL_N * world, seed=7)
            want, want_g = loss_and_grads(model, full)
            local = {k: v[rank * LOCAL_N : (rank + 1) * LOCAL_N] for k, v in full.items()}
            with fct.patch(model, global_loss=True, dist_impl=dist_impl):
                got, got_g = loss_and_grads(model, local)
            for g in got_g.values():  # what DDP does
                dist.all_reduce(g)
                g /= world
            what = f"rank {rank} {fam} {dist_impl}"
            if abs(float(got.loss) - float(want.loss)) > 2e-6 * max(1.0, float(want.loss)):
                result["failures"].append(f"{what}: loss {float(got.loss)} != {float(want.loss)}")
            try:
                assert_grads_close(got_g, want_g, 5e-6, what)
            except AssertionError as exc:
                result["failures"].append(str(exc))
            result["checks"] += 1
        # default (local) loss: each rank transformers' loss of its own half
        model = build(fam, dropout=False)
        local = batch(fam, n=LOCAL_N, seed=11 + rank)
        want = model(**local, return_loss=True).loss
        with fct.patch(model):
            got = model(**local, return_loss=True).loss
        if abs(float(got) - float(want)) > 2e-6 * max(1.0, float(want)):
            result["failures"].append(f"rank {rank} {fam} local: {float(got)} != {float(want)}")
        result["checks"] += 1


def _worker(rank, world, tmpdir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    result = {"failures": [], "checks": 0, "losses": None}
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world
        )
        _dist_checks(rank, world, result)
        # accelerate (inside Trainer) finds the process group and these variables: a 2-process CPU run.
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
        )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        model = build("dual_encoder", dropout=False)
        with fct.patch(model, global_loss=True):
            result["losses"] = run_trainer(model, f"{tmpdir}/trainer{rank}", batch_size=LOCAL_N, steps=STEPS,
                                           sampling="sequential", n_samples=LOCAL_N * world * STEPS)  # fmt: skip
        if rank == 0:
            torch.save({k: v.detach() for k, v in model.state_dict().items()}, f"{tmpdir}/final.pt")
    except Exception:
        import traceback

        result["failures"].append(f"rank {rank} crashed:\n{traceback.format_exc()}")
    finally:
        with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        if dist.is_initialized():
            # both ranks reach the teardown together: a rank destroying its gloo group while the other
            # still talks to it aborted the process once ("terminate called without an active exception")
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_global_loss(tmp_path, single_process_run):
    mp.start_processes(_worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    results = []
    for r in range(WORLD):
        with open(tmp_path / f"rank{r}.json") as f:
            results.append(json.load(f))
    failures = [line for res in results for line in res["failures"]]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:12])
    assert all(res["checks"] == 6 for res in results), [res["checks"] for res in results]
    # One process, transformers' own loss, on the concatenated batch (same data order, same steps).
    want, model = single_process_run
    for res in results:  # every rank reports the global loss
        got = res["losses"]
        assert len(got) == STEPS and all(abs(a - b) <= 1e-5 * max(1.0, b) for a, b in zip(got, want)), (
            got,
            want,
        )
    final = torch.load(tmp_path / "final.pt")
    trained = build("dual_encoder", dropout=False)
    trained.load_state_dict(final)
    assert_same_parameters(trained, model, 2e-5)
