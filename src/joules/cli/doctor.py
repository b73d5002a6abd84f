"""``joules doctor``: what joules sees on this machine (versions, hardware, model, data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.markup import escape
from rich.table import Table

from joules.cli._app import JSON_OPTION, app, console, emit


@dataclass
class DoctorReport:
    system: Any
    default_model: dict[str, Any]
    data: dict[str, Any]
    meters: list[dict[str, Any]] = field(default_factory=list)
    meter_notes: list[str] = field(default_factory=list)  # backends not used, and why


def _default_model_status() -> dict[str, Any]:
    from joules.errors import JoulesError
    from joules.models.loading import DEFAULT_MODEL, converted_gguf_dir, smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except JoulesError as exc:
        return {"spec": DEFAULT_MODEL, "found": False, "problem": str(exc)}
    converted = converted_gguf_dir(path)
    return {
        "spec": DEFAULT_MODEL,
        "found": True,
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "converted_cache": str(converted) if converted.is_dir() else None,
    }


def _data_status() -> dict[str, Any]:
    from joules.data import choice_sets, text_sets

    return {"text": text_sets(), "choice": choice_sets()}


def _meters() -> tuple[list[dict[str, Any]], list[str]]:
    from joules.errors import JoulesError
    from joules.measure import meter_domains

    try:
        return meter_domains()
    except JoulesError as exc:  # doctor reports problems, it does not stop at them
        return [], [f"no meter: {exc}"]


def doctor_report() -> DoctorReport:
    from joules.system import system_info

    meters, notes = _meters()
    return DoctorReport(
        system_info(), _default_model_status(), _data_status(), meters, meter_notes=notes
    )


def _render(r: DoctorReport) -> None:
    s = r.system
    t = Table(title="joules doctor", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("python", f"{s.python} ({s.platform})")
    for name, ver in s.packages.items():
        t.add_row(name, ver)
    t.add_row("cpu", s.cpu_model)
    # Which of the speed-relevant ISA extensions this CPU has: bf16 is fast only with
    # avx512_bf16 or amx_bf16; an AVX2-only CPU emulates it (slower than fp32).
    t.add_row("cpu flags", " ".join(s.cpu_flags) or "none of the tracked ISA extensions seen")
    t.add_row("cores", f"{s.physical_cores} physical, {s.logical_cores} logical")
    t.add_row("torch threads", str(s.torch_threads))
    t.add_row("memory", f"{s.memory_bytes / 2**30:.1f} GiB")
    gpus = ", ".join(f"{g.index}: {g.name} ({g.memory_bytes / 2**30:.0f} GiB)" for g in s.gpus)
    t.add_row("gpus", gpus or "none seen by torch")
    if r.meters:
        for m in r.meters:
            device = f" on {m['device']}" if m.get("device") else ""
            total = "" if m.get("in_total", True) else ", part of another domain"
            t.add_row(f"meter {m['domain']}", f"{m['backend']} ({m['method']}{total}){device}")
    else:
        t.add_row("energy meters", "none")
    for note in r.meter_notes:
        t.add_row("meter note", f"[dim]{escape(note)}[/]")
    dm = r.default_model
    if dm["found"]:
        cached = "converted copy cached" if dm["converted_cache"] else "not yet converted"
        t.add_row("default model", f"{dm['spec']}: {dm['path']} ({cached})")
    else:
        t.add_row("default model", f"[red]missing[/]: {escape(dm['problem'])}")
    sets = [f"{n} ({', '.join(sp)})" for kind in r.data.values() for n, sp in kind.items()]
    t.add_row("data", "; ".join(sets))
    console.print(t)


@app.command()
def doctor(json: bool = JSON_OPTION) -> None:
    """Show versions, CPU, memory, GPUs, energy meters, and the default model and data found."""
    emit(doctor_report(), json, _render)
