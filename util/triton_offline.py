"""Triton kernels compiled for Hopper (sm_90a) without a GPU: their PTX, and what Triton's bundled ptxas reports of
them (registers a thread, spills). For kernels that name their arguments as models/networks/ot/fused.py's do
(tests/models/networks/test_ot_fused.py).

Integer arguments that launches at N = M = 6890 get as multiples of 16 in padded rows (strides, widths) are declared
so, and so are the pointers, as Triton specialises them at a launch. Needs triton without its interpreter
(TRITON_INTERPRET unset), which compiles nothing.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

FLOAT_ARGUMENTS = {"similarity_step", "inverse_epsilon", "log_num_identity", "log_division_eps", "levels",
                   "log2_scale", "log2_bias"}
MULTIPLES_OF_16 = {"readable_pose", "padded_pose", "fixed_row_stride", "batch_stride", "row_stride",
                   "fixed_batch_stride", "column_factor_stride", "depth", "left_batch_stride", "right_batch_stride"}
# Pointers other than C (`similarity_ptr`, whose type is given) that are not float32.
POINTER_TYPES = {"fixed_point_ptr": "*i16", "gradient_ptr": "*fp16", "left_ptr": "*fp16", "right_ptr": "*fp16"}


def hopper_ptx(kernel, similarity_type: str, constexprs: dict[str, int], num_warps: int) -> str:
    """The PTX of `kernel` (a triton.jit function) for sm_90a, with C's pointer of `similarity_type` ("*fp32",
    "*i16"), the compile-time constants (its upper-case arguments) and num_warps."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not hasattr(kernel, "cache_key"):  # an InterpretedFunction
        raise RuntimeError("compiling Triton kernels for a GPU needs triton without TRITON_INTERPRET=1")
    signature = {}
    for name in kernel.arg_names:
        if name.endswith("_ptr"):
            signature[name] = similarity_type if name == "similarity_ptr" else POINTER_TYPES.get(name, "*fp32")
        else:
            signature[name] = "constexpr" if name.isupper() else "fp32" if name in FLOAT_ARGUMENTS else "i32"
    attrs = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(kernel.arg_names)
             if name.endswith("_ptr") or name in MULTIPLES_OF_16}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    return compiled.asm["ptx"]


def ptxas_usage(ptx: str) -> dict[str, int]:
    """Registers a thread and bytes of spill stores that Triton's bundled ptxas reports for `ptx` on sm_90a."""
    import triton

    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next(path for path in (folder / "ptxas-blackwell", folder / "ptxas") if path.exists())
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "kernel.ptx"
        source.write_text(ptx)
        report = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", str(source), "-o", str(source.with_suffix(".o"))],
                                capture_output=True, text=True, check=True).stderr
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spill_store_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1))}
