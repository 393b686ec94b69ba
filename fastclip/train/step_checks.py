"""Finiteness checks of the training steps without a host synchronisation per step.

A diverged model (a NaN/Inf logit scale, bias or features) or a non-finite loss must stop the run with
the step where it first happened. Reading a device tensor on the host (``bool(t)``, ``t.item()``,
``float(t)``) waits for the GPU to finish everything queued before it, so checking each step that way
stalls the pipeline once or more per step. Here every check only *records*, with device tensor ops:
the record is a (3,) float64 tensor ``[step, what, value]`` that holds the first failure (``step`` 0:
none yet; ``what`` indexes :data:`NAMES`; ``value`` is the first non-finite element) and later
failures leave it unchanged. :meth:`StepChecks.read` reads it on the host together with the values a
metrics row needs: one synchronisation per log interval.

    checks = StepChecks(device)
    loss = checks.guard(loss_fn, step)(**model_outputs)   # notes the inputs, then computes the loss
    checks.note_loss(step, loss)
    (loss_value,), failure = checks.read(loss)            # the one host read; failure: a Failure or None
    if failure is not None:
        raise FloatingPointError(failure.message())

The record keeps its priority order within a step: the loss's inputs in :data:`NAMES` order (the
first non-finite tensor, and in it the first non-finite element in row-major order), then the loss.
"""

from __future__ import annotations

import dataclasses

import torch

# The loss's inputs the guard checks, in the order a failure is named; "loss" is the step's loss.
NAMES = ("logit_scale", "logit_bias", "image_features", "text_features", "negative_features", "loss")
_LOSS = NAMES.index("loss")


@dataclasses.dataclass(frozen=True)
class Failure:
    """The first non-finite value of a run: at ``step``, in ``name`` (one of :data:`NAMES`)."""

    step: int
    name: str
    value: float

    def order(self) -> tuple[int, int]:
        """Which of two failures came first: the earlier step; at one step, the loss's inputs (in
        :data:`NAMES` order) before the loss."""
        return self.step, NAMES.index(self.name)

    def message(self) -> str:
        if self.name == "loss":
            return f"step {self.step}: the loss is {self.value}; stopping (lower optim.lr?)"
        return f"step {self.step}: the model diverged ({self.name} holds {self.value}); stopping (lower optim.lr?)"


class StepChecks:
    """The first non-finite loss input or loss of a run, recorded on ``device`` (default: the device of
    the first tensor noted) without reading anything on the host until :meth:`read`."""

    def __init__(self, device: torch.device | str | None = None):
        self._record = None if device is None else _empty_record(torch.device(device))

    # ---- recording (device ops only) -----------------------------------------------------------
    def guard(self, loss, step: int, ids=None) -> DivergenceGuard:
        """``loss`` preceded by :meth:`note_inputs` for ``step`` (``ids``: passed to the loss when given)."""
        return DivergenceGuard(self, loss, step, ids)

    def note_inputs(self, step: int, **tensors) -> None:
        """Record the first non-finite value among ``tensors`` (keyword names from :data:`NAMES`, None
        for an absent one) as a failure at ``step``, unless an earlier failure is recorded."""
        unknown = set(tensors) - set(NAMES[:_LOSS])
        if unknown:
            raise ValueError(f"note_inputs: expected names among {NAMES[:_LOSS]}, got {sorted(unknown)}")
        present = [t for t in tensors.values() if t is not None]
        if not present:
            return
        record = self._record_on(present[0].device)
        # (5,) float64, one slot per name in NAMES order: its first non-finite element, or a finite value
        slots = torch.cat([
            _first_non_finite(tensors[name], record.device) if tensors.get(name) is not None
            else torch.zeros(1, dtype=torch.float64, device=record.device)
            for name in NAMES[:_LOSS]
        ])  # fmt: skip
        bad = ~torch.isfinite(slots)
        what = bad.view(torch.uint8).argmax(dim=0, keepdim=True)  # the first bad slot (argmax: first maximum)
        self._note(step, bad.any(), what.to(torch.float64), slots.gather(0, what))

    def note_loss(self, step: int, loss: torch.Tensor) -> None:
        """Record a non-finite ``loss`` (a scalar tensor) as a failure at ``step``, unless an earlier
        failure is recorded."""
        record = self._record_on(loss.device)
        value = loss.detach().reshape(1).to(record.device, torch.float64)
        what = torch.full((1,), float(_LOSS), dtype=torch.float64, device=record.device)
        self._note(step, ~torch.isfinite(value[0]), what, value)

    def _note(self, step: int, bad: torch.Tensor, what: torch.Tensor, value: torch.Tensor) -> None:
        record = self._record
        entry = torch.cat(
            [torch.full((1,), float(step), dtype=torch.float64, device=record.device), what, value]
        )
        first = bad & (record[0] == 0)  # a failure already recorded is the one reported
        self._record = torch.where(first, entry, record)

    def _record_on(self, device: torch.device) -> torch.Tensor:
        if self._record is None:
            self._record = _empty_record(device)
        return self._record

    # ---- the host read -------------------------------------------------------------------------
    def read(self, *values) -> tuple[list[float], Failure | None]:
        """``values`` (scalar tensors or numbers) as floats, and the recorded :class:`Failure` or None,
        in one host synchronisation (one device-to-host copy of everything)."""
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        device = self._record.device if self._record is not None else (tensors[0].device if tensors else None)
        if device is None:
            return [float(v) for v in values], None
        parts = [t.detach().reshape(-1)[:1].to(device, torch.float64) for t in tensors]
        if self._record is not None:
            parts.append(self._record)
        host = torch.cat(parts).tolist()  # the synchronisation
        got = iter(host[: len(tensors)])
        out = [next(got) if isinstance(v, torch.Tensor) else float(v) for v in values]
        if self._record is None or host[len(tensors)] == 0:
            return out, None
        step, what, value = host[len(tensors) :]
        return out, Failure(int(step), NAMES[int(what)], value)

    def check(self) -> None:
        """Raise :class:`FloatingPointError` with the recorded failure's message (a host read)."""
        _, failure = self.read()
        if failure is not None:
            raise FloatingPointError(failure.message())


class DivergenceGuard:
    """The loss, its inputs' finiteness noted first (:meth:`StepChecks.note_inputs`): a diverged model
    (NaN/Inf logit scale, bias or features) stops the run naming the step and the tensor, not as a
    loss error later. The loss is still computed (a NaN one, from non-finite inputs)."""

    def __init__(self, checks: StepChecks, loss, step: int, ids=None):
        self.checks, self.loss, self.step, self.ids = checks, loss, step, ids  # ids: the (per-rank) batch's

    def __call__(self, image_features, text_features, logit_scale, logit_bias=None, negative_features=None):
        self.checks.note_inputs(
            self.step, logit_scale=logit_scale, logit_bias=logit_bias, image_features=image_features,
            text_features=text_features, negative_features=negative_features,
        )  # fmt: skip
        extra = {} if logit_bias is None else {"logit_bias": logit_bias}
        if negative_features is not None:
            extra["negative_features"] = negative_features
        if self.ids is not None:
            extra["ids"] = self.ids
        return self.loss(image_features, text_features, logit_scale, **extra)


def _empty_record(device: torch.device) -> torch.Tensor:
    return torch.zeros(3, dtype=torch.float64, device=device)


def _first_non_finite(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(1,) float64 on ``device``: the first non-finite element of ``t`` in row-major order, or some
    finite element of ``t`` when there is none (0.0 for an empty tensor). No host read."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(1, dtype=torch.float64, device=device)
    if flat.numel() > 1:
        # argmin of the finite mask: its first False (argmin returns the first minimum), else index 0
        first = torch.isfinite(flat).view(torch.uint8).argmin(dim=0, keepdim=True)
        flat = flat.gather(0, first)
    return flat.to(device, torch.float64)


def check_batch_on_host(model, images: torch.Tensor, texts: torch.Tensor) -> bool:
    """Check a batch's values on the host, before it goes to the device: finite pixels and (for a
    fastclip text tower) token ids inside its vocabulary, the checks the towers would otherwise make on
    the device at every forward, each a wait for the GPU. Returns whether the values were checked here
    (host tensors); the step then runs inside ``values_checked_on_host`` (``fastclip/models``) and the
    towers skip those two reads. Tensors already on the device are left to the towers."""
    if images.device.type != "cpu" or texts.device.type != "cpu":
        return False
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise ValueError("images: expected finite pixel values, got NaN or Inf")
    text = getattr(model, "text", None)
    check_ids = getattr(text, "check_ids", None)
    if callable(check_ids) and texts.dim() >= 2:
        check_ids(texts.reshape(-1, texts.shape[-1]))
    return True
