"""Test harness for benchmarks/open_clip_train_check.py: what open_clip_train needs to be *measured* on CPU.

Loaded only by the check's runs (this directory on PYTHONPATH and FASTCLIP_OCT_RECORD set); never
part of fastclip. Applied lazily, when ``open_clip_train.main`` is first imported (before its
``from open_clip import create_loss`` line runs), identically for the open_clip and the fastclip run:

- ``SyntheticDataset.__getitem__``: open_clip's synthetic data is one black image and one caption
  (every row identical: the loss stays at ln(batch), gradients are rounding noise). Here each index
  gives its own seeded image (a coloured square in a quadrant over faint noise) and caption.
- DDP on CPU: open_clip_train passes ``device_ids=[cpu]``, which torch refuses; dropped for CPU.
- The tiny model ``fastclip-check-tiny`` (this directory's JSON) is registered with open_clip.
- A recorder: the loss built by ``create_loss`` gets a forward hook writing every call's loss
  values and logit scale at full precision (open_clip's log prints 5 digits) and the loss class
  to ``$FASTCLIP_OCT_RECORD.rank<r>.jsonl``. The hook reads; it changes nothing.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (150, 50, 200),
    "white": (240, 240, 240),
}
_PLACES = ("top left", "top right", "bottom left", "bottom right")


def _varied_getitem(self, idx):
    import numpy as np
    from PIL import Image

    seed = int(os.environ.get("FASTCLIP_OCT_SEED", "0"))
    rng = np.random.default_rng([seed, int(idx)])
    size = self.image_size
    w, h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    pixels = rng.integers(0, 48, size=(h, w, 3), dtype=np.uint8)
    colour = list(_COLOURS)[int(rng.integers(len(_COLOURS)))]
    place = int(rng.integers(len(_PLACES)))
    y0, x0 = (place // 2) * (h // 2), (place % 2) * (w // 2)
    pixels[y0 : y0 + h // 2, x0 : x0 + w // 2] = _COLOURS[colour]
    caption = f"a {colour} square in the {_PLACES[place]}"
    return self.transform(Image.fromarray(pixels)), self.preprocess_txt(caption)


def _apply():
    import json

    import open_clip
    import open_clip_train.data
    import torch

    open_clip_train.data.SyntheticDataset.__getitem__ = _varied_getitem

    ddp = torch.nn.parallel.DistributedDataParallel

    class CpuDDP(ddp):
        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None  # torch: device_ids only for single-device GPU modules
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP

    open_clip.add_model_config(os.path.join(_HERE, "fastclip-check-tiny.json"))

    record = os.environ["FASTCLIP_OCT_RECORD"] + f".rank{os.environ.get('RANK', '0')}.jsonl"
    create_loss = open_clip.create_loss

    def recording_create_loss(args):
        loss = create_loss(args)
        cls = type(loss)
        with open(record, "a") as f:
            f.write(json.dumps({"loss_class": f"{cls.__module__}.{cls.__qualname__}"}) + "\n")

        def hook(module, args, kwargs, output):
            values = output if isinstance(output, dict) else dict(enumerate(output))
            row = {
                "losses": {str(k): float(v.detach().float()) for k, v in values.items()},
                "logit_scale": float(kwargs["logit_scale"].detach().float()),
            }
            with open(record, "a") as f:
                f.write(json.dumps(row) + "\n")

        loss.register_forward_hook(hook, with_kwargs=True)
        return loss

    open_clip.create_loss = recording_create_loss


class _OnMainImport:
    def find_spec(self, name, path=None, target=None):
        if name == "open_clip_train.main":
            sys.meta_path.remove(self)
            _apply()
        return None


if os.environ.get("FASTCLIP_OCT_RECORD"):
    sys.meta_path.insert(0, _OnMainImport())
