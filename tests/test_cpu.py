"""ISA detection from fake /proc/cpuinfo text, and the int8 saturation and weight-bits answers."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from edgelora.errors import EdgeloraError
from edgelora.runtime.cpu import detect_isa, int8_saturates, recommended_weight_bits

_BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx fma"


def _x86(flags: str, cores: int = 2, threads_per_core: int = 2, sockets: int = 1, model: str = "Fake CPU") -> str:
    """cpuinfo with `sockets * cores * threads_per_core` processors sharing `flags`."""
    blocks, n = [], 0
    for sock in range(sockets):
        for core in range(cores):
            for _ in range(threads_per_core):
                blocks.append(f"processor\t: {n}\nmodel name\t: {model}\nphysical id\t: {sock}\n"
                              f"core id\t\t: {core}\nflags\t\t: {_BASE} {flags}\n")
                n += 1
    return "\n".join(blocks)


AARCH64 = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU part\t: 0xd0c

processor\t: 1
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU part\t: 0xd0c
"""


@pytest.mark.parametrize(
    ("flags", "isa"),
    [
        ("avx2", "avx2"),
        ("avx2 avx512f avx512bw avx512cd avx512dq avx512vl", "avx512"),
        ("avx2 avx512f avx512bw avx512_vnni", "avx512_vnni"),
        ("avx2 avx_vnni", "avx_vnni"),
        ("avx2 avx512f avx512bw avx512_vnni avx_vnni amx_tile amx_int8 amx_bf16", "amx"),
        ("", "generic"),
    ],
)
def test_x86_isa_is_the_best_int8_path(flags: str, isa: str) -> None:
    info = detect_isa(_x86(flags), machine="x86_64")
    assert info.isa == isa
    assert info.model == "Fake CPU" and info.machine == "x86_64"


def test_physical_cores_count_core_ids_not_hyperthreads() -> None:
    assert detect_isa(_x86("avx2", cores=4, threads_per_core=2), machine="x86_64").physical_cores == 4
    assert detect_isa(_x86("avx2", cores=3, threads_per_core=1, sockets=2), machine="x86_64").physical_cores == 6


def test_aarch64_dotprod_and_i8mm() -> None:
    info = detect_isa(AARCH64, machine="aarch64")
    assert info.isa == "arm_dotprod" and "asimddp" in info.flags
    assert info.physical_cores == 2  # no core ids on ARM: one core per processor entry
    assert detect_isa(AARCH64.replace("asimddp", "asimddp i8mm"), machine="aarch64").isa == "arm_i8mm"
    assert detect_isa(AARCH64.replace(" asimddp", ""), machine="aarch64").isa == "generic"


# What each x86 int8 path needs, best first: an independent table to check this machine's answer against.
_X86_NEEDS = (("amx", {"amx_int8", "amx_tile"}), ("avx512_vnni", {"avx512f", "avx512bw", "avx512_vnni"}),
              ("avx_vnni", {"avx_vnni", "avx2"}), ("avx512", {"avx512f", "avx512bw"}), ("avx2", {"avx2"}))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").is_file(),
                    reason="reads this machine's /proc/cpuinfo as an x86 CPU")
def test_this_machine_is_detected() -> None:
    info = detect_isa()
    text = Path("/proc/cpuinfo").read_text()
    flag_lines = [line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")]
    flags = set().union(*flag_lines)
    assert info.flags == flags and info.to_dict()["flags"] == sorted(flags)
    assert info.isa == next((isa for isa, needs in _X86_NEEDS if needs <= flags), "generic")
    assert info.machine == platform.machine()
    assert 1 <= info.physical_cores <= len(os.sched_getaffinity(0)) <= (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("isa", "saturates", "bits"),
    [("avx2", True, 7), ("avx512", True, 7), ("avx512_vnni", False, 8), ("avx_vnni", False, 8),
     ("amx", False, 8), ("arm_dotprod", False, 8), ("arm_i8mm", False, 8), ("generic", False, 8)],
)
def test_saturation_and_weight_bits(isa: str, saturates: bool, bits: int) -> None:
    assert int8_saturates(isa) is saturates
    assert recommended_weight_bits(isa) == bits


def test_unknown_isa_is_refused() -> None:
    with pytest.raises(EdgeloraError, match=r"unknown ISA 'sse9'; choose from amx, "):
        int8_saturates("sse9")
