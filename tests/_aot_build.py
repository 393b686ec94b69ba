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

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from fastclip.kernels import clip, common, config, siglip
from fastclip.kernels.tune import TargetOnlyDriver, compile_only  # noqa: F401  (also used by the other builds)

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
ARCHS = {90: "hopper", 80: "ampere"}


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
        **tile_paths(sass),
    }


def _op(text: str) -> str:
    return re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0]


def _counts(text: str) -> collections.Counter:
    op = _op(text)
    c = collections.Counter(n=1)
    for kind in ("MUFU", "SHFL", "BAR", "HGMMA"):
        c[kind] += op.startswith(kind)
    c["FP32"] += op.split(".")[0] in ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP")
    return c


def tile_paths(sass: str) -> dict:
    """Instructions one thread issues per tile, from the SASS control flow: the shortest and longest
    path that runs the tensor-core K loop once (its back edge not followed), through the body of the
    loop over column tiles (the forward) or through the whole kernel (one tile per program); the
    K-loop body; MUFU/SHFL/BAR/HGMMA/FP32 counts on each path (docs/kernels.md, "Hopper analysis")."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    at = {a: i for i, (a, _) in enumerate(ins)}
    jumps = {}
    for i, (_, t) in enumerate(ins):
        m = re.search(r"\bBRA(?:\.\w+)*\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) in at:
            jumps[i] = (at[int(m.group(1), 16)], t.startswith("@"))
    has = lambda lo, hi, word: any(word in ins[j][1] for j in range(lo, hi + 1))  # noqa: E731
    # Loops: predicated backward branches (an unconditional one returns from an out-of-line wait).
    back = [(j, i) for i, (j, pred) in jumps.items() if pred and j <= i and has(j, i, "MMA")]
    outer = [(j, i) for j, i in back if has(j, i, "MUFU.EX2")]  # the epilogue is inside: a tile loop
    lo, hi = max(outer, key=lambda p: p[1] - p[0]) if outer else (0, len(ins) - 1)
    inner = [(j, i) for j, i in back if lo <= j and i <= hi and not has(j, i, "MUFU.EX2")]
    best: dict = {}  # (index, K loop seen) -> (shortest, longest) path counters ending there
    ends = []

    def push(key, mn, mx):
        a, b = best.get(key, (mn, mx))
        best[key] = (mn if mn["n"] <= a["n"] else a, mx if mx["n"] >= b["n"] else b)

    push((lo, "MMA" in ins[lo][1]), _counts(ins[lo][1]), _counts(ins[lo][1]))
    for i in range(lo, hi + 1):
        for seen in (False, True):
            if (i, seen) not in best:
                continue
            mn, mx = best[(i, seen)]
            nxt = []
            if i == hi or _op(ins[i][1]) == "EXIT" and not ins[i][1].startswith("@"):
                ends.append((seen, mn, mx))
            elif i in jumps:
                j, pred = jumps[i]
                nxt += [j] if i < j <= hi else []
                nxt += [i + 1] if pred and i < hi else []
            else:
                nxt.append(i + 1)
            for j in nxt:
                push((j, seen or "MMA" in ins[j][1]), mn + _counts(ins[j][1]), mx + _counts(ins[j][1]))
    ends = [e for e in ends if e[0]] or ends
    mn = min((e[1] for e in ends), key=lambda c: c["n"])
    mx = max((e[2] for e in ends), key=lambda c: c["n"])
    k = min(inner, key=lambda p: p[1] - p[0]) if inner else None
    return {
        "tile_instr": [mn["n"], mx["n"]],
        "tile_counts": {kind: [mn[kind], mx[kind]] for kind in ("MUFU", "SHFL", "BAR", "HGMMA", "FP32")},
        "k_loop_instr": k[1] - k[0] + 1 if k else 0,
        "tile_loop": bool(outer),
    }


def occupancy(regs: int, shared: int, warps: int) -> int:
    """Programs per SM on sm_90: 64 K registers (allocated per warp in units of 8 per thread), 228 KiB
    of shared memory (1 KiB reserved per program), 64 warps, 32 programs."""
    per_warp = -(-max(regs, 1) // 8) * 8 * 32
    return min(65536 // (per_warp * warps), 233472 // (shared + 1024), 64 // warps, 32)


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
    info["programs_per_sm"] = occupancy(info["regs"], md.shared, md.num_warps)
    return info


PRECISIONS = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "fp32": (torch.float32, False)}
PRECISIONS["fp32-tf32"] = (torch.float32, True)
# Feature dims of the towers in this field; every D bucket of config.TUNED up to 1152 is covered.
DIMS = (256, 512, 768, 1024, 1152)


def cfg_name(cfg) -> str:
    return cfg.name()


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


# The variants of the tuning candidates (config.AUTOTUNE_CANDIDATES) built by ``--variants``, sm_90,
# bf16, D = 768: every code path of config.TileConfig's options once (the full candidate table was
# built once for docs/kernels.md; building all 40 here would double the suite's AOT time).
VARIANTS = {
    "lse": ["+exp2", "+exp2-shared", "+exp2+flat", "+exp2-shared+tma", "+exp2-shared+tma+r128"],
    "tile": ["+exp2", "+exp2+tma", "128x64x64w8s3+exp2+tma"],
    "siglip": ["+exp2+tma", "+exp2+tma+r128"],
}


def build_variants() -> dict:
    """Compile the candidates named in VARIANTS for sm_90 at D = 768, bf16 (both SigLIP modes)."""
    compiled = compile_only({"lse": clip._clip_lse_kernel, "grad": clip._clip_grad_kernel,
                             "siglip": siglip._siglip_tile_kernel})  # fmt: skip
    triton.runtime.driver.set_active(TargetOnlyDriver(90))
    config.arch = lambda device: "hopper"
    common.gemm.tf32_enabled = lambda: False
    out: dict = {}
    for table, names in VARIANTS.items():
        for name in names:
            cfg = next(c for c in config.AUTOTUNE_CANDIDATES[table] if c.name().endswith(name))
            config.TUNED[("hopper", table, "bfloat16", 768)] = cfg
            launch_all(256, 768, torch.bfloat16, [{"tile": "grad"}.get(table, table)])
            for kname, k in compiled:
                if kname == "siglip" and not k.src.constants[(k.src.fn.arg_names.index("NEED_GRAD"),)]:
                    kname = "siglip-loss"
                meta = {"kernel": kname, "arch": "hopper", "prec": "bf16", "aligned": True, "dims": [768]}
                out[f"{kname}-{cfg.name()}"] = {**describe(k), **meta, "config": cfg.__dict__}
            compiled.clear()
            config.TUNED.clear()
    return out


def main(argv: list[str]) -> None:
    """``--cap 90,80``, ``--prec bf16,...``, ``--kernels lse,grad,siglip`` narrow the build."""
    if "--variants" in argv:
        print("RESULT " + json.dumps(build_variants()))
        return
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
