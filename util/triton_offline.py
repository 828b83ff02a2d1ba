"""Triton kernels compiled for Hopper (sm_90a) without a GPU: their PTX, what Triton's bundled ptxas reports of
them (registers a thread, spills) and the machine instructions of their main loop. For kernels that name their
arguments as models/networks/ot/fused.py's do (tests/models/networks/test_ot_fused.py).

Integer arguments that launches at N = M = 6890 get as multiples of 16 in padded rows (strides, widths) are declared
so, and so are the pointers, as Triton specialises them at a launch. Needs triton without its interpreter
(TRITON_INTERPRET unset), which compiles nothing.
"""
from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from pathlib import Path

FLOAT_ARGUMENTS = {"similarity_step", "inverse_epsilon", "log_num_identity", "log_division_eps", "levels",
                   "log2_scale", "log2_bias", "log2_kappa"}
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


def _bundled_tool(*names: str) -> Path:
    """The first of `names` among the CUDA tools Triton bundles (its newest ptxas reads the PTX versions it writes)."""
    import triton

    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return next(path for path in (folder / name for name in names) if path.exists())


def _assemble(ptx: str, scratch: str, *flags: str) -> tuple[Path, str]:
    """`ptx` assembled for sm_90a by Triton's bundled ptxas into a cubin in the folder `scratch`: its path and
    ptxas's report."""
    source = Path(scratch) / "kernel.ptx"
    source.write_text(ptx)
    cubin = source.with_suffix(".cubin")
    report = subprocess.run([str(_bundled_tool("ptxas-blackwell", "ptxas")), *flags, "-arch=sm_90a", str(source),
                             "-o", str(cubin)], capture_output=True, text=True, check=True).stderr
    return cubin, report


def ptxas_usage(ptx: str) -> dict[str, int]:
    """Registers a thread and bytes of spill stores that Triton's bundled ptxas reports for `ptx` on sm_90a."""
    with tempfile.TemporaryDirectory() as scratch:
        _, report = _assemble(ptx, scratch, "-v")
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spill_store_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1))}


def _machine_code(ptx: str) -> str:
    """`ptx` assembled for sm_90a and disassembled (Triton's bundled ptxas and nvdisasm)."""
    with tempfile.TemporaryDirectory() as scratch:
        cubin, _ = _assemble(ptx, scratch)
        return subprocess.run([str(_bundled_tool("nvdisasm")), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout


def _instructions(listing: str) -> list[tuple[str, str]]:
    """(opcode without modifiers, operands) of each instruction of a listing, with (label, "") where a label
    stands."""
    lines = []
    for line in listing.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        instruction = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", line)
        if label:
            lines.append((label.group(1), ""))
        elif instruction:
            lines.append((instruction.group(1).split(".")[0], instruction.group(2)))
    return lines


def opcodes(ptx: str) -> collections.Counter:
    """The opcodes (MUFU, FFMA, FRND, F2I, ..., without modifiers) of `ptx`'s whole sm_90a machine code. MUFU
    (exp2, log, reciprocal), FRND (floor, ceil) and F2I and I2F (conversions) run on one unit at an eighth of the FMA
    pipes' rate."""
    return collections.Counter(opcode for opcode, _ in _instructions(_machine_code(ptx)) if not opcode.startswith("."))


def loop_opcodes(ptx: str) -> collections.Counter:
    """`opcodes` of the largest loop in `ptx`'s machine code, from a backward branch's target to the branch, both
    branches of any `if` inside it counted: what a row pass issues a row."""
    opcodes_so_far, labels, loop = [], {}, []
    for opcode, operands in _instructions(_machine_code(ptx)):
        if opcode.startswith("."):
            labels[opcode] = len(opcodes_so_far)
            continue
        opcodes_so_far.append(opcode)
        target = re.search(r"(\.L_x_\d+)", operands) if opcode == "BRA" else None
        if target and target.group(1) in labels and len(opcodes_so_far) - labels[target.group(1)] > len(loop):
            loop = opcodes_so_far[labels[target.group(1)]:]
    return collections.Counter(loop)
