"""Ahead-of-time compilation of the Triton kernels for Hopper (sm_90) and Ampere (sm_80), without a GPU.

The interpreter runs the kernels as Python and cannot see what only the compiler checks (types of
``tl.dot`` operands, constexpr branches, shared memory of the pipelined loops, register spills).
``triton.compile`` with an explicit ``GPUTarget`` builds PTX and cubin with the ``ptxas`` shipped in the
triton wheel, no driver needed. It runs in a subprocess because conftest.py turned the interpreter on
for this process (the kernels here are interpreted functions, not compilable ones).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastclip.kernels import clip, config, siglip

    def build(fn, types, consts, cap, cfg):
        sig = {name: ("constexpr" if name in consts else types.get(name, "i32")) for name in fn.arg_names}
        constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        k = triton.compile(
            ASTSource(fn, sig, constexprs=constexprs),
            target=GPUTarget("cuda", cap, 32),
            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        )
        ptx = k.asm["ptx"]
        return {"shared": k.metadata.shared, "wgmma": "wgmma" in ptx, "spills": ".local" in ptx}

    out = {}
    for cap, arch in ((90, "hopper"), (80, "ampere")):
        for dt in ("bf16", "fp32"):
            tile = config._CONFIGS[arch]["tile"]
            bk = 32 if dt == "fp32" else tile.block_k
            meta = dict(BM=tile.block_m, BN=tile.block_n, BK=bk, UPCAST=False, IEEE=False)
            p = "*" + dt
            f32 = "*fp32"
            out[f"lse-{arch}-{dt}"] = build(
                clip._clip_lse_kernel,
                {"x_ptr": p, "y_ptr": p, "scale_ptr": f32, "row_part_ptr": f32, "col_part_ptr": f32},
                meta, cap, tile,
            )
            out[f"grad-{arch}-{dt}"] = build(
                clip._clip_grad_kernel,
                {"x_ptr": p, "y_ptr": p, "scale_ptr": f32, "lse_row_ptr": f32, "lse_col_ptr": f32, "g_ptr": p,
                 "ds_part_ptr": f32, "coef_row": "fp32", "coef_col": "fp32", "pos_coef": "fp32",
                 "g_mul": "fp32", "offset": "i64"},
                dict(meta, HAS_ROW=True, HAS_COL=True, HAS_POS=True), cap, tile,
            )
            out[f"siglip-{arch}-{dt}"] = build(
                siglip._siglip_tile_kernel,
                {"x_ptr": p, "y_ptr": p, "scale_ptr": f32, "bias_ptr": f32, "g_ptr": p, "part_ptr": f32,
                 "offset": "i64"},
                dict(meta, HAS_BIAS=True, HAS_POS=True, NEED_GRAD=True), cap, tile,
            )
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_kernels_compile_for_hopper_and_ampere(tmp_path):
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton wheel ships no ptxas")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_CACHE_DIR": str(tmp_path),
        "TRITON_DEFAULT_FP_FUSION": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    assert len(result) == 12
    for name, info in result.items():
        assert info["shared"] <= 227 * 1024 if "hopper" in name else info["shared"] <= 163 * 1024, (
            name,
            info,
        )
        assert not info["spills"], f"{name}: register spills to local memory"
        if "hopper" in name:
            assert info["wgmma"], f"{name}: no wgmma (Hopper tensor-core MMA) in the PTX"
