"""Run by test_memory.py in a fresh process: extra peak RSS (bytes) of one forward+backward.

Usage: python _hwm_probe.py {clip,siglip,mnrl} IMPL B D (mnrl: info_nce_loss with one hard negative per row). Needs MALLOC_MMAP_THRESHOLD_ set so that freed
large buffers leave the RSS (docs/design.md, "Platform facts").
"""

import sys

import torch
import torch.nn.functional as F

from fastclip import clip_loss, info_nce_loss, siglip_loss

torch.set_num_threads(1)


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024


NEG = {}


def mnrl(x, y, s, bias, impl, **kw):
    return info_nce_loss(x, y, [NEG[x.shape[0]]], scale=s, impl=impl, **kw)


fn = {"clip": clip_loss, "siglip": siglip_loss, "mnrl": mnrl}[sys.argv[1]]
impl = sys.argv[2]
b = int(sys.argv[3])
d = int(sys.argv[4])
x = F.normalize(torch.randn(b, d), dim=-1).requires_grad_()
y = F.normalize(torch.randn(b, d), dim=-1).requires_grad_()
neg = F.normalize(torch.randn(b, d), dim=-1).requires_grad_()
NEG.update({b: neg, 8: neg[:8]})
s = torch.tensor(10.0, requires_grad=True)
bias = torch.tensor(-5.0, requires_grad=True)
fn(x[:8], y[:8], s, bias, impl=impl).backward()  # warm-up: lazy init outside the measurement
x.grad = y.grad = s.grad = bias.grad = None
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
fn(x, y, s, bias, impl=impl, **({"chunk_size": 128} if impl == "torch" else {})).backward()
print(status("VmHWM") - base)
