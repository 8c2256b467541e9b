"""Compile the Triton kernels for GPU architectures without a GPU; fail on spills or shared memory.

    python benchmarks/compile_check.py                      # sm_80, sm_86, sm_89, sm_90 (CI)
    python benchmarks/compile_check.py --arch 89 --dtype bf16

Triton lowers to a cubin on any machine (its wheel ships ptxas and cuobjdump), so this catches
what the CPU interpreter cannot: compile errors (e.g. non-constexpr globals), register spills
(STACK > 0 in ``cuobjdump --dump-resource-usage``) and shared memory beyond the architecture's
per-block limit (``spl_kernels.heuristics.SHARED_MEMORY_LIMIT``), for every variant of
``_softmax_rows_kernel`` the library launches, with the launch shape ``spl_kernels/heuristics.py``
picks for a GPU. Exits 1 if any kernel fails. It uses Triton's internal compile API
(``ASTSource``, ``GPUTarget``; checked with triton 3.9), so a Triton upgrade may need this file
touched; the kernels themselves do not depend on it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import spl_kernels.fused_logprobs as fl  # noqa: E402
from spl_kernels.heuristics import SHARED_MEMORY_LIMIT, RowsConfig  # noqa: E402

DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# (STATS, DELTA, SCALED) as the library launches them: forward statistics (no-grad pass, kept
# logits, recompute), frozen-weight forward (statistics, then unscaled delta), backward delta.
VARIANTS = {"stats": (True, False, False), "stats+delta": (True, True, False), "delta*g": (False, True, True)}


def gpu_rows_config(dtype: str) -> RowsConfig:
    # rows_config for a CUDA device without needing one (its GPU branch depends only on itemsize).
    return RowsConfig(rows=1, block=8192 // ITEMSIZE[dtype], num_warps=8)


def compile_kernel(fn, dtype: str, consts: dict, cfg: RowsConfig, arch: int) -> dict:
    """Compile ``fn`` for sm_``arch``; return registers, stack bytes and shared bytes."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = {"z_ptr": f"*{dtype}", "y_ptr": "*i64"}.get(name, "*fp32")
        else:
            sig[name] = "i32"
    index = {name: i for i, name in enumerate(fn.arg_names)}
    # What the launcher's specialization tells the compiler for torch's aligned allocations and a
    # vocabulary that is a multiple of 16 (32000, 32768, 128256, 256000): vectorized loads.
    attrs = {(index[name],): [["tt.divisibility", 16]] for name in fn.arg_names if sig[name] != "constexpr"}
    src = ASTSource(fn=fn, signature=sig, constexprs={(index[k],): v for k, v in consts.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": cfg.num_warps})
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True)
    usage = [line.strip() for line in out.stdout.splitlines() if "REG:" in line]
    fields = dict(kv.split(":") for kv in usage[0].split() if ":" in kv) if usage else {}
    return {"reg": int(fields.get("REG", -1)), "stack": int(fields.get("STACK", -1)),
            "shared": kernel.metadata.shared}


def check(arch: int, dtypes: list[str]) -> bool:
    limit = SHARED_MEMORY_LIMIT[arch]
    ok = True
    for dtype in dtypes:
        cfg = gpu_rows_config(dtype)
        for variant, (stats, delta, scaled) in VARIANTS.items():
            consts = {"ROWS": cfg.rows, "BLOCK": cfg.block, "STATS": stats, "DELTA": delta,
                      "SCALED": scaled, "BF16": dtype == "bf16"}
            u = compile_kernel(fl._softmax_rows_kernel, DTYPES[dtype], consts, cfg, arch)
            failed = u["stack"] != 0 or u["shared"] > limit or u["reg"] < 0
            ok &= not failed
            print(f"sm_{arch} {dtype:4} softmax_rows {variant:11} {cfg}: REG {u['reg']:>3}  "
                  f"STACK {u['stack']:>4}  shared {u['shared']:>6} / {limit}  "
                  f"{'FAILED' if failed else 'ok'}", flush=True)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 86, 89, 90],
                        choices=sorted(SHARED_MEMORY_LIMIT),
                        help="compute capabilities x 10 (80 = A100, 86 = RTX 30xx, 89 = L40S, 90 = H100)")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = parser.parse_args()
    ok = all([check(arch, args.dtype) for arch in args.arch])  # a list: every arch reports
    if not ok:
        sys.exit("compile_check: a kernel spills registers or exceeds its architecture's shared memory")


if __name__ == "__main__":
    main()
