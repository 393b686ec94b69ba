"""Compile the kernels exactly as the launchers launch them, for sm_90 and sm_80, without a GPU.

Run as a script (``python tests/_aot_build.py [--quick]``) with ``TRITON_INTERPRET=0``; prints one
``RESULT {json}`` line. tests/test_kernels_aot.py runs it in a subprocess and checks the numbers.

How: a stand-in Triton driver reports a CUDA target (sm_90 or sm_80) instead of the missing GPU, and
each kernel's ``run`` is wrapped to compile only (``warmup=True``). The launchers are then called
with CPU tensors of the shapes a training step uses, so Triton specializes every argument as it does
for a real call (16-byte aligned pointers, sizes and strides divisible by 16, the unit stride a
constant) and the compiled variant is the one a GPU would run. The cubin is read with the
``cuobjdump`` shipped in the triton wheel: register count, stack frame and the number of spill
stores (``STL``) and loads (``LDL``) in the SASS.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from fastclip.kernels import clip, common, config, siglip
from triton.backends.compiler import GPUTarget

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
ARCHS = {90: "hopper", 80: "ampere"}


class TargetOnlyDriver:
    """Just enough of a Triton driver for ``JITFunction.run(..., warmup=True)``: a device id, a
    stream and the compile target."""

    def __init__(self, cap: int):
        self.cap = cap

    def is_active(self):
        return True

    def get_current_device(self):
        return self.cap  # one kernel cache per target

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.cap, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def sass_counts(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run(
            [CUOBJDUMP, "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(path)
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    return {
        "regs": int(usage.get("REG", -1)),
        "stack_bytes": int(usage.get("STACK", -1)),
        "local_bytes": int(usage.get("LOCAL", -1)),
        "spill_stores": len(re.findall(r"\bSTL(\.\w+)*\b", sass)),
        "spill_loads": len(re.findall(r"\bLDL(\.\w+)*\b", sass)),
        "sass_lines": sass.count("\n"),
    }


def describe(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    md = kernel.metadata
    info = {
        "shared": md.shared,
        "num_warps": md.num_warps,
        "num_stages": md.num_stages,
        "wgmma": "wgmma" in ptx,
        "mma": "mma.sync" in ptx,
        "cp_async": "cp.async" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
    }
    info.update(sass_counts(kernel.asm["cubin"]))
    return info


PRECISIONS = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "fp32": (torch.float32, False)}
PRECISIONS["fp32-tf32"] = (torch.float32, True)
# Feature dims of the towers in this field; every D bucket of config.TUNED up to 1152 is covered.
DIMS = (256, 512, 768, 1024, 1152)


def cfg_name(cfg) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"


def launch_all(n: int, dim: int, dtype, kernels) -> None:
    """One call of each launcher as a training step makes it (CLIP: diagonal positives; SigLIP: with
    and without gradients)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g).to(dtype)
    y = torch.randn(n, dim, generator=g).to(dtype)
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    lse = (torch.zeros(n), torch.zeros(n))
    if "lse" in kernels:
        clip.clip_lse(x, y, s)
    if "grad" in kernels:
        clip.clip_grad(x, y, s, *lse, 0.5, 0.5, 0, 1.0)
    if "siglip" in kernels:
        siglip.siglip_block(x, y, s, b, 0, True)
        siglip.siglip_block(x, y, s, b, 0, False)


def compile_only(kernels: dict) -> list:
    """Make each named kernel's ``run`` compile without launching, and the launchers take their GPU
    code paths; returns the list that collects ``(name, compiled kernel)`` of every launch."""
    compiled: list = []
    for name, kern in kernels.items():
        orig = kern.run

        def run(*args, grid, warmup, _orig=orig, _name=name, **kwargs):
            k = _orig(*args, grid=grid, warmup=True, **kwargs)
            compiled.append((_name, k))
            return k

        kern.run = run
    config.interpreting = lambda: False
    config.num_sms = lambda device: 132
    return compiled


def main(argv: list[str]) -> None:
    """``--cap 90,80``, ``--prec bf16,...``, ``--kernels lse,grad,siglip`` narrow the build."""
    only = lambda flag: argv[argv.index(flag) + 1].split(",") if flag in argv else None  # noqa: E731
    archs = {cap: a for cap, a in ARCHS.items() if only("--cap") is None or str(cap) in only("--cap")}
    precs = {k: v for k, v in PRECISIONS.items() if only("--prec") is None or k in only("--prec")}
    kernels = only("--kernels") or ["lse", "grad", "siglip"]
    compiled = compile_only(
        {
            "lse": clip._clip_lse_kernel,
            "grad": clip._clip_grad_kernel,
            "siglip": siglip._siglip_tile_kernel,
            "round": common._round_tf32_kernel,  # fp32 operands under TF32 (kernels/common.py)
        }
    )
    # The launchers run on CPU tensors here: skip their device check, take the GPU code paths.
    clip.check_block = siglip.check_block = lambda *a, **k: None
    cuda = torch.device("cuda")
    out: dict = {}
    for cap, arch in archs.items():
        triton.runtime.driver.set_active(TargetOnlyDriver(cap))
        config.arch = lambda device, _arch=arch: _arch
        for prec, (dtype, tf32) in precs.items():
            common.gemm.tf32_enabled = lambda _tf32=tf32: _tf32
            done = set()
            shapes = [(256, d, True) for d in DIMS]
            if cap == 90 and prec == "bf16":
                shapes.append((257, 200, False))  # sizes and strides not divisible by 16
            for n, dim, aligned in shapes:
                cfgs = {k: config.tile_config(k, cuda, dtype, dim) for k in ("lse", "tile", "siglip")}
                if (tuple(cfgs.values()), aligned) in done:
                    continue  # same configurations, same specialization: the same binaries
                done.add((tuple(cfgs.values()), aligned))
                launch_all(n, dim, dtype, kernels)
                for kname, k in compiled:
                    if kname == "round":  # one elementwise kernel, whatever the shapes
                        meta = {"kernel": "round", "arch": arch, "prec": prec, "aligned": aligned}
                        out.setdefault(
                            f"round-{arch}-{prec}", {**describe(k), **meta, "config": None, "dims": []}
                        )
                        continue
                    cfg = cfgs[{"lse": "lse", "grad": "tile", "siglip": "siglip"}[kname]]
                    variant = kname
                    if kname == "siglip" and not k.src.constants[(k.src.fn.arg_names.index("NEED_GRAD"),)]:
                        variant = "siglip-loss"
                    key = f"{variant}-{arch}-{prec}-{cfg_name(cfg)}" + ("" if aligned else "-unaligned")
                    meta = {"kernel": variant, "arch": arch, "prec": prec, "aligned": aligned}
                    entry = out.setdefault(key, {**describe(k), **meta, "config": cfg.__dict__, "dims": []})
                    entry["dims"].append(dim)
                compiled.clear()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
