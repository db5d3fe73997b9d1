"""What the CPU can do for int8: the best MLAS int8 path, whether it saturates, and the core count.

The exporter asks `recommended_weight_bits` which weight range to train and quantize for a target CPU;
the runtime uses `physical_cores` for its default thread count and the ISA name to key its graph cache.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field

from edgelora.errors import EdgeloraError

# Best first: the first name whose flags a CPU has is its int8 path.
ISAS = ("amx", "avx512_vnni", "avx_vnni", "avx512", "avx2", "arm_i8mm", "arm_dotprod", "generic")

# MLAS's u8 x s8 kernel on these (VPMADDUBSW) sums pairs of products into 16 bits and saturates on
# full-range int8 weights; 7-bit weights ([-64, 63]) keep every pair sum in range. VNNI, AMX and ARM
# accumulate in 32 bits.
_SATURATING = frozenset({"avx2", "avx512"})

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
_ARM = ("aarch64", "arm64", "armv8l", "armv8b")


@dataclass(frozen=True)
class CpuInfo:
    """One CPU as the int8 kernels see it.

    Attributes:
        isa: best int8 path, one of `ISAS`.
        flags: every feature flag the kernel reported (x86 `flags`, ARM `Features`).
        physical_cores: cores, not hyper-threads: ORT's intra-op pool gains nothing from SMT siblings.
        model: the CPU's model name, or the machine name when the kernel does not report one.
        machine: `platform.machine()` or the override given to `detect_isa`.
    """

    isa: str
    flags: frozenset[str] = field(repr=False)
    physical_cores: int
    model: str
    machine: str

    def to_dict(self) -> dict:
        """JSON-serialisable form (flags sorted), for benchmark reports."""
        d = asdict(self)
        d["flags"] = sorted(self.flags)
        return d


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _isa_from_flags(flags: frozenset[str], machine: str) -> str:
    m = machine.lower()
    if m in _ARM or m.startswith("arm"):
        if "i8mm" in flags:
            return "arm_i8mm"
        if "asimddp" in flags:
            return "arm_dotprod"
        return "generic"
    if "amx_int8" in flags and "amx_tile" in flags:
        return "amx"
    has_avx512 = "avx512f" in flags and "avx512bw" in flags
    if has_avx512 and "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx_vnni" in flags and "avx2" in flags:
        return "avx_vnni"
    if has_avx512:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "generic"


def _physical_cores(blocks: list[dict[str, str]]) -> int:
    pairs = {(b.get("physical id", "0"), b["core id"]) for b in blocks if "core id" in b}
    if pairs:
        return len(pairs)
    processors = sum(1 for b in blocks if "processor" in b)
    return processors or (os.cpu_count() or 1)


def detect_isa(cpuinfo_text: str | None = None, machine: str | None = None) -> CpuInfo:
    """Parse /proc/cpuinfo (or the text given) into the CPU's best int8 path and core count.

    Args:
        cpuinfo_text: contents of /proc/cpuinfo; None reads this machine's (empty off Linux, giving
            "generic"). Tests pass fake text.
        machine: architecture name (`x86_64`, `aarch64`); None means `platform.machine()`.

    Example:
        >>> detect_isa("flags : avx avx2 fma\\n", machine="x86_64").isa
        'avx2'
    """
    live = cpuinfo_text is None
    text = _read_cpuinfo() if live else cpuinfo_text
    machine = machine or platform.machine() or "unknown"
    blocks: list[dict[str, str]] = [{}]
    for line in text.splitlines():
        if not line.strip():
            if blocks[-1]:
                blocks.append({})
            continue
        key, sep, value = line.partition(":")
        if sep:
            blocks[-1].setdefault(key.strip().lower(), value.strip())
    blocks = [b for b in blocks if b]
    flags: set[str] = set()
    model = ""
    for b in blocks:
        flags.update(b.get("flags", "").split())
        flags.update(b.get("features", "").split())
        model = model or b.get("model name", "") or b.get("hardware", "")
    cores = _physical_cores(blocks)
    if live and hasattr(os, "sched_getaffinity"):
        cores = max(1, min(cores, len(os.sched_getaffinity(0))))  # a container may allow fewer
    frozen = frozenset(flags)
    return CpuInfo(
        isa=_isa_from_flags(frozen, machine),
        flags=frozen,
        physical_cores=cores,
        model=model or platform.processor() or machine,
        machine=machine,
    )


def _check_isa(isa: str) -> None:
    if isa not in ISAS:
        raise EdgeloraError(f"unknown ISA {isa!r}; choose from {', '.join(ISAS)}")


def int8_saturates(isa: str) -> bool:
    """True where ORT's u8 x s8 int8 kernel can saturate 16-bit pair sums (AVX2, AVX-512 without VNNI)."""
    _check_isa(isa)
    return isa in _SATURATING


def recommended_weight_bits(isa: str) -> int:
    """7 on CPUs whose int8 kernel saturates (train and export 7-bit weights for them), else 8."""
    return 7 if int8_saturates(isa) else 8
