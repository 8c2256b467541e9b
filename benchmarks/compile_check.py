"""Compile the fused log-prob kernels for a GPU architecture without a GPU; report register spills.

    python benchmarks/compile_check.py [--arch 90] [--dtype bf16 fp32]

Triton lowers to a cubin on any machine (its wheel ships ptxas), so this catches what the CPU
interpreter cannot: compile errors (e.g. non-constexpr globals) and register spills (STACK > 0
in ``cuobjdump --dump-resource-usage``), for the tiles ``kernels/heuristics.py`` picks. It uses
Triton's internal compile API (``ASTSource``, ``GPUTarget``; checked with triton 3.9), so a
Triton upgrade may need this file touched; the kernels themselves do not depend on it.
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

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels.fused_logprobs as fl  # noqa: E402
from kernels.heuristics import KernelConfig, Tiles, kernel_config  # noqa: E402

POINTERS = {"y_ptr": "*i64"}  # every other *_ptr is fp32 unless it holds inputs (h_ptr, w_ptr)


def compile_kernel(fn, dtype: str, consts: dict, tiles: Tiles, arch: int) -> str:
    """Compile ``fn`` with ``consts`` for sm_``arch``; return cuobjdump's resource line."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = POINTERS.get(name, f"*{dtype}" if name in ("h_ptr", "w_ptr") else "*fp32")
        else:
            sig[name] = "i32"
    index = {name: i for i, name in enumerate(fn.arg_names)}
    # What the launcher's specialization would tell the compiler at N = 1024, V = 32000, D = 4096
    # with torch's aligned allocations: every pointer and size is a multiple of 16. Without it the
    # loads cannot be vectorized, and Triton does not software-pipeline them.
    attrs = {(index[name],): [["tt.divisibility", 16]] for name in fn.arg_names if sig[name] != "constexpr"}
    src = ASTSource(fn=fn, signature=sig, constexprs={(index[k],): v for k, v in consts.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                             capture_output=True, text=True)
    usage = [line.strip() for line in out.stdout.splitlines() if "REG:" in line]
    fields = dict(kv.split(":") for kv in usage[0].split() if ":" in kv) if usage else {}
    pipelined = "async_copy" in kernel.asm["ttgir"] or "async_tma" in kernel.asm["ttgir"]
    return (f"REG {fields.get('REG', '?'):>3}  STACK {fields.get('STACK', '?'):>5}  "
            f"shared {kernel.metadata.shared:>6}  pipelined {pipelined}")


def check(cfg: KernelConfig, dtype: str, arch: int) -> None:
    common = {"UPCAST": False, "PRECISION": "ieee"}
    t = cfg.logits
    for store in (False, True):
        consts = {"BLOCK_N": t.m, "BLOCK_V": t.n, "BLOCK_D": t.k, "STORE_LOGITS": store, **common}
        usage = compile_kernel(fl._logits_kernel, dtype, consts, t, arch)
        print(f"{dtype} logits      store={store!s:5} {t}: {usage}")
    t = cfg.hidden_grad
    consts = {"BLOCK_N": t.m, "BLOCK_D": t.n, "BLOCK_V": t.k, **common}
    usage = compile_kernel(fl._hidden_grad_kernel, dtype, consts, t, arch)
    print(f"{dtype} hidden_grad            {t}: {usage}")
    t = cfg.weight_grad
    consts = {"BLOCK_V": t.m, "BLOCK_D": t.n, "BLOCK_N": t.k, **common}
    usage = compile_kernel(fl._weight_grad_kernel, dtype, consts, t, arch)
    print(f"{dtype} weight_grad            {t}: {usage}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 = A100, 90 = H100)")
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    args = parser.parse_args()
    for dtype in args.dtype:
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        check(kernel_config(torch.device("cuda"), torch_dtype, 32000, weight_trains=False), dtype, args.arch)


if __name__ == "__main__":
    main()
