"""Ahead-of-time compilation of the Triton kernels for Hopper (sm_90) and Ampere (sm_80), without a GPU.

The interpreter runs the kernels as Python and cannot see what only the compiler decides (shared
memory of the pipelined loops, register allocation, spills). ``tests/_aot_build.py`` compiles the
variants a real call gets: it calls the launchers with a stand-in driver that reports the GPU target,
so Triton specializes the arguments as on a GPU (aligned pointers, sizes divisible by 16, unit
stride constant), and reads the cubin with the ``cuobjdump`` of the triton wheel. It runs in a
subprocess because conftest.py turned the interpreter on for this process.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_LIMIT = {"hopper": 227 * 1024, "ampere": 163 * 1024}
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp32-tf32": 4}


# (script, arguments): "--variants" builds the tuning variants of config.AUTOTUNE_CANDIDATES.
SCRIPTS = ("_aot_build.py", "_aot_build_family.py", "_aot_build_distill.py", "_aot_build.py --variants")
_STARTED: dict = {}  # script -> (Popen, stdout file, stderr file)


def _build(script, tmp_path_factory):
    """The result of one build script. The first call starts all of them at once (each compiles on one
    core, ptxas included; run one after another they took ~290 s of the suite on 2 cores)."""
    triton = pytest.importorskip("triton")
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(tools, t)) for t in ("ptxas", "cuobjdump")):
        pytest.skip("this triton wheel ships no ptxas/cuobjdump")
    if not _STARTED:
        for name in SCRIPTS:
            tmp = tmp_path_factory.mktemp("aot_" + name.replace(".py", "").strip("_").replace(" --", "_"))
            env = {
                **os.environ,
                "TRITON_INTERPRET": "0",
                "TRITON_CACHE_DIR": str(tmp / "triton_cache"),
                "TRITON_DEFAULT_FP_FUSION": "1",
            }
            out, err = open(tmp / "stdout", "w+"), open(tmp / "stderr", "w+")
            proc = subprocess.Popen(
                [sys.executable, os.path.join(HERE, name.split()[0]), *name.split()[1:]],
                env=env, stdout=out, stderr=err, text=True,
            )  # fmt: skip
            _STARTED[name] = (proc, out, err)
    proc, out, err = _STARTED[script]
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
    assert proc.returncode == 0, stderr[-4000:]
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    return _build("_aot_build.py", tmp_path_factory)


def _parts(info):
    return info["kernel"], info["arch"], info["prec"], info["aligned"]


@pytest.mark.slow
def test_every_shipped_configuration_compiles(aot):
    from fastclip.kernels import config

    kernels = {info["kernel"] for info in aot.values()}
    assert kernels == {"lse", "grad", "siglip", "siglip-loss", "round"}
    for arch in ("hopper", "ampere"):
        for prec in ELEMENT_BYTES:
            found = {i["kernel"] for i in aot.values() if i["arch"] == arch and i["prec"] == prec}
            # TF32 rounds the fp32 operands first (kernels/common.py): only that precision has "round".
            want = kernels if prec == "fp32-tf32" else kernels - {"round"}
            assert found == want, (arch, prec, found)
    tiles = {key: info for key, info in aot.items() if info["kernel"] != "round"}
    # Every configuration a launcher would pick at D <= 1152 was built (dims are recorded per binary).
    for key, info in tiles.items():
        kernel, arch, prec, aligned = _parts(info)
        if aligned:
            assert set(info["dims"]) <= {256, 512, 768, 1024, 1152}, key
    for key, info in tiles.items():  # the binaries were built with the configurations of the tables
        table = {"lse": "lse", "grad": "tile", "siglip": "siglip", "siglip-loss": "siglip"}[info["kernel"]]
        assert info["config"] == config._CONFIGS[info["arch"]][table].__dict__ or info["prec"].startswith(
            "fp32"
        ), key


@pytest.mark.slow
def test_shared_memory_stages_and_instructions(aot):
    """Real-call specialization gives the pipelined K loop: cp.async, at least num_stages - 1 buffers
    of the (BM + BN) x BK operand tiles in shared memory, the configured stages and warps; tensor-core
    instructions for 16-bit inputs (wgmma on sm_90, mma on sm_80)."""
    for key, info in aot.items():
        kernel, arch, prec, aligned = _parts(info)
        if kernel == "round":
            continue  # elementwise, no shared memory (test_tf32_rounding_kernel_compiles_lean)
        cfg = info["config"]
        assert info["shared"] <= SHARED_LIMIT[arch], (key, info["shared"])
        assert info["num_stages"] == cfg["num_stages"] and info["num_warps"] == cfg["num_warps"], key
        if not aligned:
            continue
        stage = (cfg["block_m"] + cfg["block_n"]) * cfg["block_k"] * ELEMENT_BYTES[prec]
        assert info["shared"] >= (cfg["num_stages"] - 1) * stage, (key, info["shared"], stage)
        assert info["cp_async"], f"{key}: no cp.async (the K loop is not pipelined)"
        if prec != "fp32":
            assert info["wgmma" if arch == "hopper" else "mma"], f"{key}: no tensor-core MMA"


@pytest.mark.slow
def test_no_register_spills_for_16_bit_inputs(aot):
    """Spills counted in the SASS of the cubin (STL/LDL) and the stack frame from cuobjdump -res-usage:
    none for bf16/fp16 at the shapes a training step uses (D a multiple of 16)."""
    checked = 0
    for key, info in aot.items():
        kernel, arch, prec, aligned = _parts(info)
        if aligned and prec in ("bf16", "fp16"):
            checked += 1
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (key, info)
            assert info["stack_bytes"] == 0 and info["local_bytes"] == 0, (key, info)
    assert checked == 16


@pytest.mark.slow
def test_tf32_rounding_kernel_compiles_lean(aot):
    """The TF32 rounding of fp32 operands (one elementwise pass before the tile kernels) compiles for
    both targets without spills; the tile kernels it feeds are the unchanged TF32 ones (tensor-core
    MMA on .tf32 operands, no conversion of their own)."""
    rounds = {k: i for k, i in aot.items() if i["kernel"] == "round"}
    assert {i["arch"] for i in rounds.values()} == {"hopper", "ampere"}
    for key, info in rounds.items():
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (key, info)
        assert info["stack_bytes"] == 0 and info["local_bytes"] == 0 and info["regs"] <= 64, (key, info)
        assert not (info["wgmma"] or info["mma"]), key
    for key, info in aot.items():
        if info["prec"] == "fp32-tf32" and info["kernel"] != "round" and info["aligned"]:
            assert info["wgmma" if info["arch"] == "hopper" else "mma"], key


@pytest.mark.slow
def test_distillation_kernels_compile_without_spills(tmp_path_factory):
    """The distillation kernels (two fp32 logit tiles per program, 64-row tiles) at D = 768, bf16 and
    fp16, on both targets: pipelined (3 stages, cp.async), tensor-core instructions, no spills."""
    built = _build("_aot_build_distill.py", tmp_path_factory)
    assert len(built) == 8  # 2 kernels x 2 targets x 2 precisions
    for key, info in built.items():
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (key, info)
        assert info["stack_bytes"] == 0 and info["local_bytes"] == 0, (key, info)
        assert info["num_stages"] == 3 and info["cp_async"], (key, info)
        assert info["wgmma"] if info["arch"] == "hopper" else info["mma"], (key, info)
        assert 0 < info["shared"] <= SHARED_LIMIT[info["arch"]], (key, info)


@pytest.mark.slow
def test_family_kernels_compile_pipelined_on_tensor_cores(tmp_path_factory):
    """The contrastive family's fused kernels (kernels/family_tiles.py: forward, gradient tile, GIST's
    thresholds) for the variants real calls get (hard negatives with every direction and the shifts;
    ids as positives with smoothing and a bank; GIST's guide), bf16 and fp32 on TF32 on sm_90, bf16 on
    sm_80: the similarity tiles on the tensor cores (wgmma / mma), the K loop pipelined (3 stages,
    cp.async), within shared memory, and no register spills in any of them (with triton 3.6 too, the GPU
    image's). Until 2026-12-05 the forward spilled 6-8 stores on sm_90 (16 under triton 3.6): the
    own-column test was a 64-bit (BM, BN) comparison; it is 32-bit on a column vector now."""
    built = _build("_aot_build_family.py", tmp_path_factory)
    kinds = {(i["kernel"], i["variant"], i["arch"], i["prec"]) for i in built.values()}
    # 3 variants x (forward, gradient) + GIST's thresholds, for 3 (arch, precision) builds
    assert len(kinds) == 7 * 3, sorted(kinds)
    for key, info in built.items():
        assert info["stack_bytes"] <= 64 and info["shared"] <= SHARED_LIMIT[info["arch"]], (key, info)
        assert info["num_stages"] == 3 and info["cp_async"], (key, info)
        assert info["spill_stores"] == 0, (key, info)
        if info["kernel"] != "family-thr" or info["prec"] == "fp32-tf32":  # bf16 runs: fp32 guides on FMA
            assert info["wgmma"] if info["arch"] == "hopper" else info["mma"], (key, info)


@pytest.mark.slow
def test_tuning_variants_compile_without_spills(tmp_path_factory):
    """The code paths of the tuning candidates (config.TileConfig's options: base-2 epilogue, shared
    exponential, flattened loop, TMA descriptors, register cap, a 128 x 64 gradient tile) for sm_90 at
    D = 768, bf16: no spills, within shared memory, wgmma; TMA where asked (cp.async.bulk.tensor), and
    the register caps and smaller tiles reach two programs per SM (docs/kernels.md, "Hopper analysis")."""
    from fastclip.kernels import config

    built = _build("_aot_build.py --variants", tmp_path_factory)
    want = {k.replace("grad", "tile") for k in ("lse", "grad", "siglip")}
    assert {
        i["kernel"].replace("grad", "tile").replace("siglip-loss", "siglip") for i in built.values()
    } == want
    assert len(built) == 12, sorted(built)
    for key, info in built.items():
        cfg = config.TileConfig(**info["config"])
        assert cfg in config.AUTOTUNE_CANDIDATES[{"grad": "tile"}.get(info["kernel"], info["kernel"][:6])], (
            key
        )
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0 and info["stack_bytes"] == 0, (
            key,
            info,
        )
        assert 0 < info["shared"] <= SHARED_LIMIT["hopper"] and info["wgmma"], (key, info)
        assert info["tma"] == cfg.tma, key
        assert info["num_warps"] == cfg.num_warps and info["num_stages"] == cfg.num_stages, key
        if cfg.maxnreg:
            assert info["regs"] <= cfg.maxnreg and info["programs_per_sm"] >= 2, (key, info["regs"])
        # the per-tile SASS walk found the K loop (wgmma) on every path it counted
        assert info["tile_counts"]["HGMMA"][0] >= 1 and info["tile_instr"][0] <= info["tile_instr"][1], key
    # the base-2 epilogue: one MUFU.EX2 per exponential, far fewer instructions than the shipped tile
    lse = {k: v for k, v in built.items() if v["kernel"] == "lse"}
    shared = next(v for k, v in lse.items() if k.endswith("+exp2-shared"))
    assert shared["tile_counts"]["MUFU"][0] < shared["tile_counts"]["MUFU"][1]  # one path, two paths
    assert built["grad-128x64x64w8s3+exp2+tma"]["programs_per_sm"] >= 2


# Variants checked under the interpreter: (name, fields); "exp2-shared" and "flatten" are lse-only
# options, the gradient kernels get "exp2" instead.
INTERPRETED_VARIANTS = {
    "exp2": {"epilogue": "exp2"},
    "exp2-shared": {"epilogue": "exp2-shared"},
    "flatten": {"flatten": True},
    "tma": {"tma": True},
    "exp2+tma+group4+cap": {"epilogue": "exp2", "tma": True, "group_m": 4, "maxnreg": 128},
}


@pytest.mark.interpreter
@pytest.mark.parametrize("variant", sorted(INTERPRETED_VARIANTS))
def test_tuning_variants_match_float64_under_the_interpreter(variant, monkeypatch):
    """Every option a tuned table may select gives the shipped kernels' results within the float64
    budgets of tests/test_kernels.py: full and partial tiles, positives at offsets of both signs, bf16
    (TMA for D a multiple of 8, pointers otherwise) and fp32, SigLIP with and without gradients and
    bias, and s = 100 (the shared exponential's fallback to two exponentials)."""
    import dataclasses

    import test_kernels as tk
    import torch
    from fastclip.kernels import config

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels through the interpreter")
    real = config.tile_config
    fields = INTERPRETED_VARIANTS[variant]

    def tile_config(kernel, *args, **kwargs):
        f = dict(fields)
        if kernel != "lse":
            f.pop("flatten", None)
            f["epilogue"] = {"exp2-shared": "exp2"}.get(f.get("epilogue"), f.get("epilogue", "exp"))
        return dataclasses.replace(real(kernel, *args, **kwargs), **f)

    monkeypatch.setattr(config, "tile_config", tile_config)
    for case in [(128, 128, 48, 0), (70, 130, 40, 5), (130, 70, 33, -3)]:
        for dtype in (torch.bfloat16, torch.float32):
            tk._check_clip_block(*case, dtype)
            tk._check_siglip_block(*case, dtype)
            tk._check_siglip_block(*case, dtype, need_grad=False, bias=None)
    tk._check_clip_block(128, 128, 48, 0, torch.bfloat16, scale=100.0)
    tk.test_large_scale_low_cosines_do_not_underflow()
