"""argen's CPU kernels (`cpu_kernels.c`), compiled for this machine's CPU on first use.

The C source is built with the system C compiler into `<cache dir>/kernels/<key>/`, where the key
hashes the source, the compiler and the flags, so a later start only loads it (a build takes
4-6 s of CPU on the 2-core machines here). The instruction set is chosen at run time from the CPU's
features (AVX-512, else AVX2, else portable C), since the machines argen runs on differ. Without a C compiler, `library()`
returns None and the runtime keeps the weights in fp32 (`quant="none"`), saying why.
`compile_kernels(isa)` builds any ISA's kernels without loading them: the tests build every ISA the
compiler targets, also those this CPU cannot run (`missing_features` says what it lacks).

Why C through ctypes rather than a torch C++ extension: the torch headers take a minute to compile
against, and these kernels need nothing from torch but pointers to its tensors' memory.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from argen.models.sources import cache_dir

log = logging.getLogger("argen.kernels")
HERE = Path(__file__).parent
SOURCES = [HERE / "cpu_kernels.c", HERE / "cpu_forward.c"]
HEADERS = [HERE / "cpu_kernels.h", HERE / "cpu_simd.h"]
# The kernels are written once against cpu_simd.h's vector layer; each build supplies it at a width.
ISA_FLAGS = {
    # AVX-512 with VNNI: the a8 path's dot products in one instruction (the fp32 kernels are the same).
    "avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "scalar": [],  # portable C (GCC vectors) at AVX2's width: the fallback on other CPUs
    # Portable C at AVX-512's width: the AVX-512 kernels' arithmetic, bit for bit, on any CPU (tests).
    "scalar16": ["-DARGEN_PORTABLE", "-DARGEN_PORTABLE_WIDTH=16"],
}
# -ffp-contract=off: the kernels spell out every fused multiply-add; the compiler must not add its own.
# -Wl,--no-undefined: a missing symbol fails the build, not the first load.
BASE_FLAGS = [
    "-O3",
    "-std=gnu11",
    "-shared",
    "-fPIC",
    "-fopenmp",
    "-ffp-contract=off",
    "-Wno-psabi",
    "-Wl,--no-undefined",
]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (/proc/cpuinfo), empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name with its family and model numbers (see `cpu_name_in`)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return cpu_name_in(text, platform.processor() or platform.machine())


def cpu_name_in(cpuinfo: str, fallback: str) -> str:
    """The first processor's model name in /proc/cpuinfo text, with its family and model numbers: a
    VM may show only "AMD EPYC", and the numbers still tell the generation (family 25 is Zen 3/4)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block ends at its first empty line
            continue
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fallback
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


# The CPU features (as /proc/cpuinfo names them) each instruction set's kernels need, best first
# (scalar16, AVX-512's arithmetic in portable C, runs anywhere but is never picked: it is for tests).
_AVX512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "f16c", "fma"})
ISA_NEEDS = {
    "avx512vnni": _AVX512 | {"avx512_vnni"},
    "avx512": _AVX512,
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "scalar": frozenset(),
    "scalar16": frozenset(),
}
# What each build's argen_isa() calls itself (the portable builds share one name).
ISA_NAMES = {
    "avx512vnni": "avx512vnni",
    "avx512": "avx512",
    "avx2": "avx2",
    "scalar": "portable",
    "scalar16": "portable",
}


def missing_features(isa: str, flags: frozenset[str] | None = None) -> list[str]:
    """What this CPU lacks to run `isa`'s kernels (empty: it can run them). Compiling them needs
    only the compiler (see `compile_kernels`)."""
    flags = cpu_flags() if flags is None else flags
    if ISA_NEEDS[isa] and platform.machine() not in ("x86_64", "AMD64"):
        return [f"x86-64 (this CPU is {platform.machine()})"]
    return sorted(ISA_NEEDS[isa] - flags)


def pick_isa(flags: frozenset[str] | None = None) -> str:
    return next(isa for isa in ISA_NEEDS if isa != "scalar16" and not missing_features(isa, flags))


def describe_cpu() -> str:
    """One line for reports: the CPU, the features that matter here, and the kernels' instruction set."""
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"]
    have = [f for f in wanted if f in cpu_flags()]
    return f"{cpu_name()} ({os.cpu_count()} CPUs; {' '.join(have) or 'no AVX2'}); argen kernels: {chosen_isa()}"


@dataclass
class KernelLibrary:
    lib: ctypes.CDLL
    isa: str
    path: Path
    width: int = 0  # floats per vector: weights are packed in groups of this many rows
    chunk: int = 0  # groups per chunk of the packed layout

    def __post_init__(self) -> None:
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.lib.argen_qmatmul.argtypes = [p, i32, p, i64, i64, p, i64]
        self.lib.argen_qmatmul.restype = None
        self.lib.argen_dequantize.argtypes = [p, i32, p]
        self.lib.argen_dequantize.restype = None
        self.lib.argen_dequantize_rows.argtypes = [p, p, i64, p]
        self.lib.argen_dequantize_rows.restype = None
        self.lib.argen_fma_peak.argtypes = [i32, i64, p]
        self.lib.argen_fma_peak.restype = ctypes.c_double
        self.lib.argen_forward.argtypes = [p, i32, i64, p, p, p, p, p, p, p, i64, p, p, p, p, p, p, p]
        self.lib.argen_forward.restype = ctypes.c_int
        self.lib.argen_width.restype = self.lib.argen_chunk.restype = ctypes.c_int
        self.width, self.chunk = self.lib.argen_width(), self.lib.argen_chunk()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(isa: str, cc: str, out_dir: Path, sources: list[Path] | None = None, flags: tuple[str, ...] = ()) -> Path:
    """Compile the kernels for `isa` into `out_dir` (atomically: a crash leaves no half-written .so):
    these SOURCES, or `sources` (another commit's, as benchmarks/kernel_ab compares), with extra `flags`."""
    out = out_dir / "libargen_cpu.so"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        partial = Path(tmp) / out.name
        cmd = [cc, *BASE_FLAGS, *ISA_FLAGS[isa], *flags, *map(str, sources or SOURCES), "-o", str(partial), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling argen's CPU kernels failed ({' '.join(cmd)}):\n{result.stderr[-2000:]}")
        partial.replace(out)
    return out


def compiler_targets(isa: str) -> bool:
    """Whether the C compiler accepts `isa`'s flags (it compiles an empty unit with them); on x86-64,
    gcc and clang target every ISA here whatever the CPU they run on."""
    cc = _compiler()
    if cc is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        unit = Path(tmp) / "empty.c"
        unit.write_text("int argen_empty;\n")
        cmd = [cc, *ISA_FLAGS[isa], "-c", str(unit), "-o", str(Path(tmp) / "empty.o")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def compile_kernels(isa: str, cc: str | None = None) -> Path:
    """The kernels compiled for `isa` (built on first use into the cache directory, keyed by the
    source, the compiler and the flags); not loaded, so any ISA the compiler targets can be built on
    any machine. Raises RuntimeError when there is no compiler or the build fails."""
    cc = cc or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc, clang or $CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    code = [f.read_bytes() for f in SOURCES + HEADERS]
    key = hashlib.sha1(repr((code, version, BASE_FLAGS, ISA_FLAGS[isa])).encode()).hexdigest()[:12]
    return build(isa, cc, cache_dir() / "kernels" / f"{isa}-{key}")


def chosen_isa() -> str:
    """The build `library()` loads: $ARGEN_KERNELS if set, else this CPU's best."""
    return os.environ.get("ARGEN_KERNELS") or pick_isa()


def library(isa: str | None = None) -> KernelLibrary | None:
    """The compiled kernels for this CPU (or for `isa`, else $ARGEN_KERNELS: avx512vnni, avx512, avx2,
    scalar or scalar16, to compare builds), built on first use; None without a compiler."""
    isa = isa or chosen_isa()
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown kernel build {isa!r} (ARGEN_KERNELS?); use one of {', '.join(ISA_FLAGS)}")
    return _library(isa)


@functools.cache
def _library(isa: str) -> KernelLibrary | None:
    cc = _compiler()
    if cc is None:
        log.warning(
            "no C compiler found (cc, gcc, clang or $CC): argen's quantized CPU kernels are off, "
            "weights stay in fp32; install gcc to enable them"
        )
        return None
    try:
        path = compile_kernels(isa, cc)
    except (RuntimeError, OSError) as exc:
        log.warning("argen's CPU kernels are off, weights stay in fp32: %s", exc)
        return None
    import torch  # noqa: F401  (torch's OpenMP runtime first, so the kernels share its threads)

    return KernelLibrary(ctypes.CDLL(str(path)), isa, path)


class QWeightStruct(ctypes.Structure):
    """cpu_kernels.h's argen_qweight."""

    _fields_ = [
        ("fmt", ctypes.c_int32),
        ("width", ctypes.c_int32),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("data", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("act8", ctypes.c_int32),
        ("pad", ctypes.c_int32),
    ]


class LayerStruct(ctypes.Structure):
    """cpu_forward.c's argen_layer."""

    _fields_ = [
        ("attn_norm", ctypes.c_void_p),
        ("ffn_norm", ctypes.c_void_p),
        ("qkv", QWeightStruct),
        ("o", QWeightStruct),
        ("gate_up", QWeightStruct),
        ("down", QWeightStruct),
    ]


class ModelStruct(ctypes.Structure):
    """cpu_forward.c's argen_model."""

    _fields_ = [
        ("n_layers", ctypes.c_int32),
        ("n_heads", ctypes.c_int32),
        ("n_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("hidden", ctypes.c_int32),
        ("inter", ctypes.c_int32),
        ("eps", ctypes.c_float),
        ("pad", ctypes.c_int32),
        ("rope_cos", ctypes.c_void_p),
        ("rope_sin", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("layers", ctypes.POINTER(LayerStruct)),
    ]
