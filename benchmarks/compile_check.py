"""Ahead-of-time compile every Triton kernel of ``kernels/`` for an H100 (sm_90), without a GPU.

    python benchmarks/compile_check.py [--record | --out DIR] [--target cuda:90:32]
                                       [--batch 256] [--dtypes float16,bfloat16,float32]
                                       [--only attention_pool] [--no-json]

Catches compile errors (front end, TTGIR passes, LLVM, ptxas) on a machine with no GPU: each
kernel goes through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``,
which needs only the ptxas bundled in the triton wheel, not a CUDA driver.

Arguments are the launchers' own: every launcher (``infonce_forward``/``infonce_backward``,
``attention_pool_forward``/``_backward``, ``local_contrastive_forward``/``_backward``) runs on
CPU tensors of the MELP shapes with its ``kernel[grid](...)`` calls recorded instead of
launched, and with the CUDA branch of its ``_launch_config`` (block sizes, num_warps), so the
compiled variants are exactly those a GPU run would build. Each recorded argument is
specialised as ``triton.runtime.jit`` does (``native_specialize_impl``: pointer dtype and
16-byte alignment, int divisibility by 16, ints equal to 1 and None as constants).

Cases (each in fp16, bf16 and fp32, the dtypes the launchers take):
    infonce          D = 256, N = 1024: every config of the CUDA autotune space of the forward
                     (column statistics and second-pass variant) and the fused backward
    attention_pool   shared queries over N = 312 keys, 8 heads: (Q = 10, D = 256) and
                     (Q = 128, D = 768), without and with a key padding mask; fwd and bwd
    local_loss       Qb = 10 beats, S = 18 sentences, D = 256: Gram, forward, both backwards

Per kernel: compiled or the error, registers and spills (from ptxas -v: triton's own ptxas
invocation, captured; the same numbers a GPU run exposes as ``CompiledKernel.n_regs`` /
``n_spills``, which need a driver to load), shared memory (triton's allocation,
``metadata.shared``), and whether an H100 can launch it (≤ 227 KiB shared memory, registers ×
threads ≤ 64 Ki). Results: a table on stdout, a summary of register spills per dtype (the
fp16/bf16 variants, the training dtypes, must have none), and a JSON file
``compile_check-triton<version>-<date>.json`` in the system temp dir, or benchmarks/results/
with ``--record`` (or ``--out DIR``).
Exit status: 0 when every kernel compiled, fits an H100 and no fp16/bf16 variant spills (or
the triton version lacks the AOT API: skipped with a message), 1 when any failed to compile,
2 when all compiled but some exceed an H100's shared memory or registers (they would raise
OutOfResources at launch), 3 when all are launchable but an fp16/bf16 variant spills.

Needs no GPU and no CUDA driver: the triton wheel's bundled ptxas is enough. To check another
triton version (the GPU image runs triton 3.6), run the script with that version's
interpreter, e.g. a throwaway venv:

    python -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0 --no-deps
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/t36/lib/python3.11/site-packages/torch.pth
    /tmp/t36/bin/python benchmarks/compile_check.py --record

(the .pth gives it this venv's torch; the venv's own triton 3.6 comes first on its path).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# A kernel defined under the interpreter is an InterpretedFunction, which cannot be compiled.
if os.environ.pop("TRITON_INTERPRET", None) not in (None, "0"):
    print("compile_check: ignoring TRITON_INTERPRET (kernels must be JIT functions to compile)")
# A fresh cache: every kernel really goes through ptxas, whose log gives registers and spills.
_CACHE_DIR = tempfile.TemporaryDirectory(prefix="compile_check_cache_")
os.environ["TRITON_CACHE_DIR"] = _CACHE_DIR.name
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

import torch

try:
    import triton
except ImportError as _exc:  # nothing to compile with
    print(f"compile_check: SKIPPED: triton is not importable ({_exc})")
    sys.exit(0)

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import environment

H100_MAX_SHARED = 227 * 1024  # bytes of shared memory one block may use (opt-in maximum)
H100_REGISTERS = 64 * 1024  # 32-bit registers per SM (and per block)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- API probing -------------------------------------------------------------------------------


def missing_api() -> str | None:
    """Why this triton cannot AOT-compile here, or None."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource
    except ImportError as exc:
        return f"triton {triton.__version__} has no triton.compiler.ASTSource / GPUTarget ({exc})"
    if not callable(getattr(triton, "compile", None)):
        return f"triton {triton.__version__} has no triton.compile"
    params = inspect.signature(ASTSource).parameters
    if not {"fn", "signature", "constexprs"} <= set(params):
        return f"triton {triton.__version__}: ASTSource takes {list(params)}, expected fn, signature, constexprs"
    try:
        from triton.backends import backends
    except ImportError as exc:
        return f"triton {triton.__version__}: no backends registry ({exc})"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no nvidia backend (found {list(backends)})"
    return None


def _specializer() -> Callable[[Any], tuple[str, Any]]:
    """arg -> (type, key) as the JIT runtime specialises it (key "D": divisible by 16)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        def native(arg: Any) -> tuple[str, Any]:
            return native_specialize_impl(BaseBackend, arg, False, True, True)

        native(1)
        return native
    except Exception:  # noqa: BLE001, S110 -- fall back to the documented rules
        pass

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
             torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "u1", torch.int8: "i8"}

    def manual(arg: Any) -> tuple[str, Any]:
        if arg is None:
            return "constexpr", None
        if isinstance(arg, torch.Tensor):
            return "*" + names[arg.dtype], "D" if arg.data_ptr() % 16 == 0 else ""
        if isinstance(arg, bool):
            return "u1", None
        if isinstance(arg, int):
            if arg == 1:
                return "constexpr", 1
            kind = "i32" if -2**31 <= arg < 2**31 else "i64"
            return kind, "D" if arg % 16 == 0 else ""
        if isinstance(arg, float):
            return "fp32", None
        raise TypeError(f"cannot specialise {type(arg).__name__}")

    return manual


def _parse_attr(key: Any) -> list:
    try:
        from triton.backends.compiler import BaseBackend

        return BaseBackend.parse_attr(key)
    except Exception:  # noqa: BLE001
        return [["tt.divisibility", 16]] if "D" in key else []


# --- recording the launchers' calls ------------------------------------------------------------


@dataclass
class Launch:
    """One ``kernel[grid](...)`` call, specialised: what triton.compile needs."""

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    attrs: dict[tuple[int, ...], list]
    options: dict[str, Any]
    grid: tuple | Callable  # a callable grid takes the launch's meta-parameters


class _Recorder:
    def __init__(self, kernel: Any, sink: list[Launch], specialize: Callable[[Any], tuple[str, Any]]):
        self.kernel, self.sink, self.specialize = kernel, sink, specialize

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            names = list(self.kernel.arg_names)
            bound = dict(zip(names, args))
            options = {}
            for key, value in kwargs.items():
                (bound if key in names else options)[key] = value
            missing = [n for n in names if n not in bound]
            if missing:
                raise TypeError(f"{self.kernel.__name__}: launcher passes no {missing}")
            params = {p.name: p for p in self.kernel.params}
            signature, constexprs, attrs = {}, {}, {}
            for index, name in enumerate(names):
                value = bound[name]
                if params[name].is_constexpr:
                    signature[name], constexprs[name] = "constexpr", value
                    continue
                kind, key = self.specialize(value)
                signature[name] = kind
                if kind == "constexpr":
                    constexprs[name] = value
                elif isinstance(key, str) and key:
                    attrs[(index,)] = _parse_attr(key)
            self.sink.append(Launch(self.kernel, signature, constexprs, attrs, options,
                                   grid if callable(grid) else tuple(grid)))

        return record


@contextlib.contextmanager
def recording(module: Any, kernel_names: list[str], sink: list[Launch], gpu_hooks: list[str]):
    """Record ``module``'s kernel launches; its ``gpu_hooks`` (functions taking a device last)
    see a CUDA device, and its ``_check_kernels`` is a no-op (the kernels are not interpreted)."""
    from kernels import _utils

    specialize = _specializer()
    saved = {}
    cuda = torch.device("cuda")

    def on_cuda(fn: Callable) -> Callable:
        return lambda *args: fn(*args[:-1], cuda)

    try:
        for name in kernel_names:
            saved[name] = getattr(module, name)
            setattr(module, name, _Recorder(saved[name], sink, specialize))
        for name in gpu_hooks:
            saved[name] = getattr(module, name)
            setattr(module, name, on_cuda(saved[name]))
        saved["_check_kernels"] = module._check_kernels
        module._check_kernels = lambda *args: None
        forced, _utils.FORCE_CUDA_LAUNCH_CONFIGS = _utils.FORCE_CUDA_LAUNCH_CONFIGS, True
        try:
            yield
        finally:
            _utils.FORCE_CUDA_LAUNCH_CONFIGS = forced
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


# --- the MELP cases ----------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    label: str
    dtype: str
    launches: list[Launch] = field(default_factory=list)
    error: str | None = None  # the launcher itself failed


def _record(case: Case, module: Any, kernels: list[str], hooks: list[str], run: Callable[[], None]) -> Case:
    try:
        with recording(module, kernels, case.launches, hooks):
            run()
    except Exception as exc:  # noqa: BLE001 -- reported as a row
        case.error = f"launcher: {type(exc).__name__}: {exc}"
    return case


def infonce_cases(dtype: torch.dtype, dtype_name: str, num: int = 1024, dim: int = 256) -> list[Case]:
    from kernels import infonce as mod

    kernels = ["_infonce_fwd_kernel", "_infonce_bwd_kernel"]
    x, t = torch.randn(num, dim, dtype=dtype), torch.randn(num, dim, dtype=dtype)
    scale = torch.tensor(2.659, dtype=dtype)  # the logit_scale parameter shares the features' dtype
    vec = torch.zeros(num, dtype=torch.float32)
    weight = torch.ones(1, dtype=torch.float32)
    cuda = torch.device("cuda")

    def run() -> None:  # every config of the CUDA autotune space, forced one at a time
        for config in mod._launch_configs("fwd", dim, dtype, cuda):
            with mod.forced_launch_config(fwd=config):
                mod._forward_pass(x, t, scale, 0, column_stats=True)
                mod._forward_pass(x, t, scale, 0, column_stats=False)  # N above the column-buffer limit
        for config in mod._launch_configs("bwd", dim, dtype, cuda):
            with mod.forced_launch_config(bwd=config):
                mod.infonce_backward(x, t, scale, (vec, vec, vec, vec), weight, vec + 1, diag_offset=0,
                                     grad_factor=1.0 / (2 * num))

    label = f"N={num} D={dim}"
    return [_record(Case("infonce", label, dtype_name), mod, kernels, ["_launch_configs"], run)]


def attention_pool_cases(dtype: torch.dtype, dtype_name: str, batch: int) -> list[Case]:
    import kernels.attention_pool

    mod = sys.modules["kernels.attention_pool"]
    kernels = ["_attention_pool_fwd_kernel", "_attention_pool_bwd_kernel"]
    cases = []
    for num_queries, dim, heads, num_keys in ((10, 256, 8, 312), (128, 768, 8, 312)):
        for masked in (False, True):
            queries = torch.randn(num_queries, dim, dtype=dtype)  # shared by the batch (the poolers)
            keys = torch.randn(batch, num_keys, dim, dtype=dtype)
            values = torch.randn(batch, num_keys, dim, dtype=dtype)
            mask = torch.zeros(batch, num_keys, dtype=torch.bool) if masked else None

            def run(queries=queries, keys=keys, values=values, heads=heads, mask=mask) -> None:
                out, lse = mod.attention_pool_forward(queries, keys, values, heads, mask)
                mod.attention_pool_backward(queries, keys, values, heads, mask, out, lse, torch.empty_like(out))

            label = f"Q={num_queries} D={dim} H={heads} N={num_keys} B={batch}" + (" mask" if masked else "")
            cases.append(_record(Case("attention_pool", label, dtype_name), mod, kernels, ["_launch_config"], run))
    return cases


def local_loss_cases(dtype: torch.dtype, dtype_name: str, batch: int,
                     beats: int = 10, sentences: int = 18, dim: int = 256) -> list[Case]:
    from kernels import local_contrastive as mod

    kernels = ["_local_gram_kernel", "_local_fwd_kernel", "_local_bwd_kernel"]
    b = torch.randn(batch, beats, dim, dtype=dtype)
    s = torch.randn(batch, sentences, dim, dtype=dtype)
    counts = torch.full((batch,), sentences, dtype=torch.int32)  # as LocalSimilarityFunction passes them

    def run() -> None:
        lse, gram = mod.local_contrastive_forward(b, s, counts, 4.0, 5.0)
        mod.local_contrastive_backward(b, s, counts, gram, lse, torch.zeros_like(lse), 4.0, 5.0)

    label = f"Qb={beats} S={sentences} D={dim} B={batch}"
    return [_record(Case("local_loss", label, dtype_name), mod, kernels, ["_launch_config", "_ecgs_per_program"],
                    run)]


# --- compiling ---------------------------------------------------------------------------------


@dataclass
class Result:
    op: str
    case: str
    dtype: str
    kernel: str
    constexprs: dict[str, Any]
    num_warps: int | None
    num_stages: int | None
    ok: bool
    error: str | None = None
    n_regs: int | None = None
    spill_stores: int | None = None  # bytes
    spill_loads: int | None = None
    stack_frame: int | None = None
    shared: int | None = None  # bytes, triton's allocation (metadata.shared)
    launchable: bool | None = None
    launch_notes: str | None = None
    compile_s: float | None = None
    ptxas: str | None = None  # the ptxas binary that ran
    signature: dict[str, str] = field(default_factory=dict)


class _PtxasLog:
    """Capture the stderr of triton's own ptxas call (it passes -v and deletes the log)."""

    def __init__(self) -> None:
        self.logs: list[tuple[str, str]] = []
        self.module = None
        try:
            from triton.backends.nvidia import compiler as nvidia_compiler

            self.module = nvidia_compiler
        except ImportError:
            pass

    @contextlib.contextmanager
    def capture(self):
        module = self.module
        if module is None or not hasattr(module, "subprocess"):
            yield
            return
        real = module.subprocess
        logs = self.logs

        class Shim:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            @staticmethod
            def run(cmd, *args, **kwargs):
                result = real.run(cmd, *args, **kwargs)
                stderr = kwargs.get("stderr")
                if isinstance(cmd, (list, tuple)) and "ptxas" in Path(str(cmd[0])).name and hasattr(stderr, "name"):
                    with contextlib.suppress(OSError):
                        logs.append((str(cmd[0]), Path(stderr.name).read_text()))
                return result

        module.subprocess = Shim()
        try:
            yield
        finally:
            module.subprocess = real


def _ptxas_stats(log: str) -> dict[str, int]:
    stats = {}
    patterns = {
        "n_regs": r"Used (\d+) registers",
        "stack_frame": r"(\d+) bytes stack frame",
        "spill_stores": r"(\d+) bytes spill stores",
        "spill_loads": r"(\d+) bytes spill loads",
    }
    for key, pattern in patterns.items():
        match = re.search(pattern, log)
        if match:
            stats[key] = int(match.group(1))
    return stats


def _ptxas_rerun(ptx: str, arch: int) -> tuple[str | None, str]:
    """ptxas -v on the kernel's PTX (when triton's own log was not captured)."""
    binary = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with contextlib.suppress(Exception):  # the ptxas triton itself picks for this arch
        from triton.backends.nvidia.compiler import get_ptxas

        binary = Path(get_ptxas(arch).path)
    if not binary.exists():
        return None, ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([str(binary), "-v", "-lineinfo", f"--gpu-name=sm_{arch}a", str(src),
                               "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True,
                              check=False)  # a ptxas error is reported through its log
    return str(binary), proc.stderr


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[:40])


def compile_launch(launch: Launch, target: Any, ptxas_log: _PtxasLog) -> Result:
    from triton.compiler import ASTSource

    kernel = launch.kernel
    options = dict(launch.options)
    constexprs = {k: v for k, v in launch.constexprs.items() if k in kernel.arg_names and
                  kernel.params[kernel.arg_names.index(k)].is_constexpr}
    result = Result(op="", case="", dtype="", kernel=kernel.__name__, constexprs=constexprs,
                    num_warps=options.get("num_warps"), num_stages=options.get("num_stages"), ok=False,
                    signature={k: v for k, v in launch.signature.items() if v != "constexpr"})
    ptxas_log.logs.clear()
    stdout = io.StringIO()  # triton prints a whole PTX listing when ptxas fails
    start = time.perf_counter()
    try:
        with ptxas_log.capture(), contextlib.redirect_stdout(stdout):
            src = ASTSource(fn=kernel, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
            compiled = triton.compile(src, target=target, options=options)
    except Exception as exc:  # noqa: BLE001 -- every failure is a row
        result.error = _short_error(exc)
        result.compile_s = round(time.perf_counter() - start, 2)
        if os.environ.get("COMPILE_CHECK_TRACEBACK"):
            traceback.print_exc()
        return result
    result.compile_s = round(time.perf_counter() - start, 2)
    result.ok = True
    metadata = compiled.metadata
    result.num_warps = getattr(metadata, "num_warps", result.num_warps)
    result.num_stages = getattr(metadata, "num_stages", result.num_stages)
    result.shared = getattr(metadata, "shared", None)
    if ptxas_log.logs:
        result.ptxas, log = ptxas_log.logs[-1]
    else:
        result.ptxas, log = _ptxas_rerun(compiled.asm["ptx"], target.arch) if "ptx" in compiled.asm else (None, "")
    for key, value in _ptxas_stats(log).items():
        setattr(result, key, value)
    notes = []
    if result.shared is not None and result.shared > H100_MAX_SHARED:
        notes.append(f"shared {result.shared} B > {H100_MAX_SHARED} B")
    if result.n_regs is not None and result.num_warps:
        registers = result.n_regs * 32 * result.num_warps
        if registers > H100_REGISTERS:
            notes.append(f"{result.n_regs} regs x {32 * result.num_warps} threads > {H100_REGISTERS}")
    result.launchable = not notes if result.shared is not None else None
    result.launch_notes = "; ".join(notes) or None
    return result


# --- main --------------------------------------------------------------------------------------


def _constexpr_text(constexprs: dict[str, Any]) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_D": "D", "BLOCK_Q": "Q", "BLOCK_S": "S",
             "BATCH_PER_PROGRAM": "BPP", "DOT_PRECISION": "prec", "COLUMN_STATS": "colstats", "HAS_MASK": "mask"}
    parts = []
    for key, value in constexprs.items():
        if key not in short:
            continue
        if isinstance(value, bool):
            value = int(value)
        parts.append(f"{short[key]}={value}")
    return " ".join(parts)


def format_table(results: list[Result]) -> str:
    head = (f"{'op':<15} {'dtype':<9} {'case':<32} {'kernel':<27} {'constexprs':<42} {'w':>2} {'st':>2} "
            f"{'status':<6} {'regs':>4} {'spill st/ld':>11} {'smem':>7} {'s':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        spill = f"{r.spill_stores}/{r.spill_loads}" if r.spill_stores is not None else "-"
        status = "OK" if r.ok else "FAIL"
        if r.ok and r.launchable is False:
            status = "NOLNCH"
        lines.append(
            f"{r.op:<15} {r.dtype:<9} {r.case:<32} {r.kernel:<27} {_constexpr_text(r.constexprs):<42} "
            f"{r.num_warps or '-':>2} {r.num_stages or '-':>2} {status:<6} {r.n_regs if r.n_regs is not None else '-':>4} "
            f"{spill:>11} {r.shared if r.shared is not None else '-':>7} {r.compile_s if r.compile_s is not None else '-':>5}"
        )
    errors = [f"{r.op} {r.dtype} {r.case} {r.kernel}:\n  {r.error}" for r in results if r.error]
    if errors:
        lines += ["", "Compile errors:", *errors]
    notes = [f"  {r.op} {r.dtype} {r.case} {r.kernel} ({_constexpr_text(r.constexprs)}): {r.launch_notes}"
             for r in results if r.launch_notes]
    if notes:
        lines += ["", "Compiled but not launchable on an H100 (the runtime raises OutOfResources):", *notes]
    return "\n".join(lines)


def _spills(result: Result) -> int:
    """Bytes of register spill stores + loads per thread (0 when ptxas reported none)."""
    return (result.spill_stores or 0) + (result.spill_loads or 0)


def spill_summary(results: list[Result]) -> str:
    """One line per dtype: how many compiled variants spill registers, and which."""
    lines = ["Register spills (ptxas, bytes stored/loaded per thread):"]
    for dtype in dict.fromkeys(r.dtype for r in results):
        rows = [r for r in results if r.dtype == dtype and r.ok]
        spilling = [r for r in rows if _spills(r)]
        unknown = [r for r in rows if r.spill_stores is None]
        text = f"  {dtype:<9} {len(spilling)}/{len(rows)} variants spill"
        if unknown:
            text += f" ({len(unknown)} without a ptxas report)"
        if spilling:
            text += ": " + ", ".join(f"{r.op}/{r.kernel} [{r.case}] {r.spill_stores}/{r.spill_loads}" for r in spilling)
        lines.append(text)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the JSON (default: the system temp dir; --record: benchmarks/results)")
    parser.add_argument("--record", action="store_true", help="write the JSON to benchmarks/results/ (tracked)")
    parser.add_argument("--target", default="cuda:90:32", help="backend:arch:warp_size (default cuda:90:32)")
    parser.add_argument("--batch", type=int, default=256, help="per-GPU batch B the launchers see (default 256)")
    parser.add_argument("--dtypes", default="float16,bfloat16,float32")
    parser.add_argument("--only", default="", help="comma-separated ops: infonce,attention_pool,local_loss")
    parser.add_argument("--no-json", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = (Path(__file__).resolve().parent / "results" if args.record
                    else Path(tempfile.gettempdir()) / "melp-scale-results")

    env = environment(torch.device("cpu"))
    reason = missing_api()
    if reason:
        print(f"compile_check: SKIPPED: {reason}")
        return 0
    from triton.backends.compiler import GPUTarget

    backend, arch, warp = args.target.split(":")
    target = GPUTarget(backend, int(arch), int(warp))
    env.update({"target": f"{backend}:{arch}:{warp}", "batch": args.batch, "triton_path": str(Path(triton.__file__).parent)})
    print(f"compile_check: triton {triton.__version__} ({env['triton_path']}), torch {torch.__version__}, "
          f"target {target}, git {env['git_revision']}{' (dirty)' if env['git_dirty'] else ''}")

    ops = {"infonce": lambda dt, name: infonce_cases(dt, name),
           "attention_pool": lambda dt, name: attention_pool_cases(dt, name, args.batch),
           "local_loss": lambda dt, name: local_loss_cases(dt, name, args.batch)}
    selected = [o for o in args.only.split(",") if o] or list(ops)
    unknown = set(selected) - set(ops)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {list(ops)}")

    ptxas_log = _PtxasLog()
    results: list[Result] = []
    for op in selected:
        for dtype_name in [d for d in args.dtypes.split(",") if d]:
            for case in ops[op](DTYPES[dtype_name], dtype_name):
                if case.error:
                    results.append(Result(op, case.label, dtype_name, "(launcher)", {}, None, None, False, case.error))
                seen = set()
                for launch in case.launches:
                    key = (launch.kernel.__name__, json.dumps(launch.signature, sort_keys=True),
                           json.dumps({k: str(v) for k, v in launch.constexprs.items()}, sort_keys=True),
                           json.dumps(sorted(map(str, launch.attrs.items()))), json.dumps(launch.options, sort_keys=True))
                    if key in seen:  # e.g. the backward's two passes share a kernel variant
                        continue
                    seen.add(key)
                    result = compile_launch(launch, target, ptxas_log)
                    result.op, result.case, result.dtype = op, case.label, dtype_name
                    results.append(result)
                    status = "ok" if result.ok else "FAILED"
                    print(f"  {op:<15} {dtype_name:<9} {case.label:<32} {result.kernel:<27} {status} "
                          f"({result.compile_s}s)", flush=True)

    print()
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    unlaunchable = [r for r in results if r.ok and r.launchable is False]
    print(f"\n{len(results) - len(failed)}/{len(results)} kernels compiled for {target} with triton "
          f"{triton.__version__}; {len(unlaunchable)} of them exceed an H100's resources")
    print(spill_summary(results))
    low_precision_spills = [r for r in results if r.ok and r.dtype in ("float16", "bfloat16") and _spills(r)]
    ptxas = next((r.ptxas for r in results if r.ptxas), None)
    env["ptxas"] = ptxas
    if ptxas:
        with contextlib.suppress(Exception):
            env["ptxas_version"] = subprocess.run([ptxas, "--version"], capture_output=True, text=True,
                                                  check=True).stdout.strip().splitlines()[-1]
    if not args.no_json:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = args.out / f"compile_check-triton{triton.__version__}-{stamp}.json"
        rows = []
        for r in results:
            row = asdict(r)
            row["constexprs"] = {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                                 for k, v in r.constexprs.items()}
            rows.append(row)
        path.write_text(json.dumps({"environment": env, "results": rows}, indent=1))
        print(f"wrote {path}")
    return 1 if failed else 2 if unlaunchable else 3 if low_precision_spills else 0


if __name__ == "__main__":
    sys.exit(main())
