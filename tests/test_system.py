"""joules.system: the CPU's ISA flags and the machine record every results JSON carries."""

from __future__ import annotations

import json
import subprocess
import sys

from joules.system import ISA_FLAGS, backfill_machine, cpu_flags, machine_info

X86 = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse sse2 avx f16c fma avx2 avx512f avx512bw avx512_bf16 amx_tile_not_a_flag
processor\t: 1
flags\t\t: fpu
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes asimddp sve sve2 bf16 i8mm
"""
AVX2_ONLY = "flags\t\t: fpu sse sse2 avx fma f16c avx2 sha_ni\n"


def test_x86_flags_are_matched_whole_not_by_substring():
    assert cpu_flags(X86) == ["avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16"]


def test_avx2_only_cpu_has_no_bf16_flag():
    flags = cpu_flags(AVX2_ONLY)
    assert flags == ["avx", "avx2", "fma", "f16c"]
    assert not {"avx512_bf16", "amx_bf16"} & set(flags)


def test_arm_asimd_is_reported_as_neon():
    assert cpu_flags(ARM) == ["neon", "asimddp", "sve", "sve2", "bf16", "i8mm"]


def test_machine_info_is_json_and_names_cpu_and_flags():
    info = machine_info()
    json.dumps(info)  # goes into results JSON as is
    assert info["cpu_model"] and info["logical_cores"] >= 1
    assert set(info["cpu_flags"]) <= set(ISA_FLAGS)
    assert info["cpu_flags"] == cpu_flags()


def test_machine_info_does_not_import_torch():
    code = "import sys, joules.system as s; s.machine_info(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_backfill_machine_adds_flags_only_where_missing():
    old = backfill_machine({"machine": {"platform": "x"}})
    assert "cpu_flags" in old["machine"] and old["machine"]["recorded"]
    kept = {"cpu_flags": {"avx2": True}}
    assert backfill_machine({"machine": kept})["machine"] is kept
