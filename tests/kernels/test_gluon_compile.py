"""The Gluon kernels compile for Hopper (sm_90a) on a machine without a GPU.

Gluon kernels do not run under the interpreter, so the CPU tests of their launchers only cover the Triton fallback.
Compiling them here, to a cubin, checks what a GPU machine would hit first: the Gluon API of the installed Triton
(its names move between releases), shared memory within Hopper's 227 KB a block, and ptxas finding registers for
every region (it refuses a warp-specialized region short of them). Their results are checked on GPUs
(`tests/kernels/test_gpu_kernels.py`, `tests/kernels/test_gpu_attention.py`).

The compiles run in a child process: this test session runs Triton's interpreter (`TRITON_INTERPRET=1`, see
tests/conftest.py), which replaces the library functions a compiled kernel calls.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOPPER_SMEM = 232448  # bytes of shared memory a block may use on H100/H200
GEMM_ALIGNED = ("a_scale_ptr", "b_scale_ptr", "c_ptr", "counts_ptr", "N", "K", "rows", "stride_cm", "stride_ask")
MLA_ALIGNED = ("q_latent_ptr", "q_rope_ptr", "kv_ptr", "page_table_ptr", "seq_lens_ptr", "out_ptr", "lse_ptr",
               "stride_qb", "stride_qh", "stride_rb", "stride_rh", "stride_kv", "stride_pt", "stride_ob", "stride_oh",
               "split_len")


def compile_for_hopper(fn, types: dict[str, str], constexprs: dict[str, object], aligned: tuple[str, ...]):
    """`fn` compiled for sm_90a: every other argument an i32, `aligned` ones divisible by 16 (as the launchers'
    pointers and strides are)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {name: "i32" for name in fn.arg_names}
    sig.update(types)
    sig.update({name: "constexpr" for name in constexprs})
    index = {name: (fn.arg_names.index(name),) for name in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={index[k]: v for k, v in constexprs.items()},
                         attrs={index[n]: [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": constexprs["num_warps"]})


def _fp8_descriptors(block_m: int, block_n: int) -> dict[str, str]:
    from triton.experimental.gluon import language as gl

    a = repr(gl.NVMMASharedLayout.get_default_for([block_m, 128], gl.float8e4nv))
    b = repr(gl.NVMMASharedLayout.get_default_for([block_n, 128], gl.float8e4nv))
    return {"a_desc": f"tensordesc<fp8e4nv[{block_m}, 128],{a}>", "b_desc": f"tensordesc<fp8e4nv[{block_n}, 128],{b}>",
            "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32", "c_ptr": "*bf16", "counts_ptr": "*i32"}


def _gemm():
    from kernels.gluon_gemm import UNROLL
    from kernels.triton.gemm_gluon import fp8_grouped_gemm_kernel

    return compile_for_hopper(fp8_grouped_gemm_kernel, _fp8_descriptors(128, 128),
                              dict(BLOCK_E=16, GROUP_M=4, STAGES=4, UNROLL=UNROLL, num_warps=8), GEMM_ALIGNED)


def _gemm_ws(stages: int, pieces: int = 1, block_e: int = 16):
    from kernels.gluon_gemm import UNROLL, WS_CONSUMER_REGS
    from kernels.triton.gemm_gluon_ws import fp8_grouped_gemm_ws_kernel

    return compile_for_hopper(fp8_grouped_gemm_ws_kernel, _fp8_descriptors(64, 128),
                              dict(BLOCK_E=block_e, GROUP_M=8, STAGES=stages, UNROLL=UNROLL, NB=pieces,
                                   CONSUMER_REGS=WS_CONSUMER_REGS, num_warps=4), GEMM_ALIGNED)


def _mla(final: bool):
    from kernels.mla_triton import GLUON_OUTPUT_REGS
    from kernels.triton.mla_decode_gluon import mla_decode_gluon_kernel

    types = {"q_latent_ptr": "*bf16", "q_rope_ptr": "*bf16", "kv_ptr": "*bf16", "page_table_ptr": "*i64",
             "seq_lens_ptr": "*i64", "out_ptr": "*bf16" if final else "*fp32", "lse_ptr": "*fp32",
             "scale_log2": "fp32"}
    return compile_for_hopper(mla_decode_gluon_kernel, types,
                              dict(RANK=512, ROPE_DIM=64, PAGE_SIZE=1, FINAL=final, STAGES=2,
                                   OUTPUT_REGS=GLUON_OUTPUT_REGS, num_warps=4), MLA_ALIGNED)


# name: (build, warp-specialized); each at a configuration the launchers use.
BUILDS = {
    "gemm 128x128 s4": (_gemm, False),
    "gemm ws s4": (lambda: _gemm_ws(4), True),
    "gemm ws s5": (lambda: _gemm_ws(5), True),
    "gemm ws 128x256 s4": (lambda: _gemm_ws(4, pieces=2, block_e=64), True),
    "mla one split": (lambda: _mla(True), True),
    "mla splits": (lambda: _mla(False), True),
}


def spills_among_products(cubin: bytes) -> int:
    """Local-memory loads and stores (spills) inside the runs of tensor-core products of a cubin's SASS: a run ends
    where more than 200 instructions pass without a product. Spills there cost a round trip to L1 every K step."""
    import tempfile

    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    lines = sass.splitlines()
    products = [i for i, line in enumerate(lines) if "GMMA." in line]
    runs, start = [], products[0] if products else None
    for prev, cur in zip(products, products[1:] + [None]):
        if cur is None or cur - prev > 200:
            runs.append((start, prev))
            start = cur
    return sum(1 for a, b in runs for line in lines[a:b] if "STL" in line or "LDL" in line)


def compile_all() -> dict[str, dict]:
    """Every build's shared memory and whether it reached a cubin, or the error that stopped it."""
    out = {}
    for name, (build, _) in BUILDS.items():
        try:
            k = build()
            out[name] = {"shared": k.metadata.shared, "cubin": len(k.asm["cubin"]),
                         "setmaxnreg": "setmaxnreg" in k.asm["ptx"],
                         "loop_spills": spills_among_products(k.asm["cubin"])}
        except Exception as exc:  # noqa: BLE001 - reported to the test, which names the kernel
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[-3000:]}"}
    return out


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    pytest.importorskip("triton.experimental.gluon")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(BUILDS))
def test_gluon_kernel_compiles_for_hopper(compiled, name):
    result = compiled[name]
    assert "error" not in result, result.get("error")
    assert result["cubin"] > 0 and 0 < result["shared"] <= HOPPER_SMEM, result
    assert result["loop_spills"] == 0, f"{name}: ptxas spilled registers between tensor-core products: {result}"
    if BUILDS[name][1]:  # the partitions trade registers (setmaxnreg): the light ones give to the consumers
        assert result["setmaxnreg"], result


if __name__ == "__main__":
    print(json.dumps(compile_all()))
