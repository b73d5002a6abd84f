"""joules' GGUF files against llama.cpp's own quantizer, with and without an importance matrix,
measured by the sweep on the llamacpp runtime, then decoded in one interleaved run.

    python benchmarks/deploy.py                       # every row (the lead's run, quiet machine)
    python benchmarks/deploy.py --tokens 4096 --calib-n 32 --rows baseline,llamacpp-q4_0+imatrix,gptq-q4_0
    python benchmarks/deploy.py --quick --work /tmp/deploy-quick --out /tmp/deploy-quick.json
    python benchmarks/deploy.py --table               # the table again from the committed JSON

1. The sweep (``joules.sweep.run_sweep``; no second pipeline). The script writes its spec as
   ``--work/deploy.toml`` (store ``--work/deploy.db``: a re-run re-does nothing, a failed run is
   retried) with ``[eval] runtime = "llamacpp"``, ``[bench] runtime = "llamacpp"`` and
   ``[deploy]``: every run exports its GGUF file, and llama.cpp evaluates it over the first
   ``--tokens`` WikiText-2 **test** tokens in windows of ``--window`` (``wikitext2``: perplexity;
   ``deviation``: KL divergence from the baseline's F32 file, as ``llama-perplexity
   --kl-divergence`` reports it) and benches it once (``--prompt-len`` / ``--gen-len``, 1 repeat).
   Rows: the baseline (all F32, the reference); every llama.cpp preset but IQ3_XXS
   (``llamacpp(ftype=P, imatrix=false|true)``: ``llama_model_quantize`` of the F32 export, the
   importance matrix computed from the calibration tokens); for every preset whose per-tensor
   types joules writes byte-exact, joules' ``rtn``, ``gptq`` and ``awq | gptq`` giving every
   linear the type llama.cpp's file holds for it (``overrides=[GLOB=FORMAT, ...]``; AWQ searches
   its scales with the preset's most common type, Q4_0 standing in for IQ4 types): ``rtn`` copies the file without an importance
   matrix (a path check: the same bytes), ``gptq`` and ``awq | gptq`` the file with one (llama.cpp
   picks other types with an imatrix; each calibrated row is the size of the peer it must beat). Calibration: ``--calib-n`` × ``--calib-len``
   tokens of WikiText-2 **valid**. The float embedding is stored as llama-quantize stores it
   (``[deploy] embedding = "gguf-q6_k"``, Q8_0 on 576-wide rows).
2. Decode speed of every file in one run: ``--repeats`` rounds, each round every file once
   (``run_bench`` on the llamacpp runtime: 1 warm-up, 1 timed generation), the order shuffled
   per round (``--seed``). Per file the median tok/s with the 95 % Student t interval of the
   mean over rounds, the estimated J/token (no energy counter on a VM: the meter's method is
   recorded); per joules file the ratio to llama.cpp's own file of the same types (the one it
   copied its types from): geometric mean of the per-round ratios, 95 % Student t interval over the
   rounds' log ratios (both files were decoded in every round).
3. The torch path on the same windows: ``gptq-q4_0``'s file loaded into torch (transformers
   dequantizes it) scored by the same task as llama.cpp scored it (``--no-parity`` skips it).

Writes ``--out`` (``benchmarks/results/deploy.json``): header (command, versions, machine with
CPU flags), settings, the spec, every row's figures, the speed run's rounds, the table and the
headline. ``--table`` re-derives the table and headline from the JSON (nothing measured), writes
it back and prints the block; for the committed JSON it also replaces the block in README.md and
docs/results/deploy.md. The default model's weights were Q4_1 before joules saw them (93.8 MiB
grid): rows at or above that size match it almost exactly, so claim nothing from them.
"""

from __future__ import annotations

import fnmatch
import json
import math
import random
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import RowCache, figure_png, header, parser, write_json
from joules.deploy.peer import NEEDS_IMATRIX, PRESETS
from joules.formats.gguf import PRESETS as JOULES_GGUF
from joules.measure.stats import summarize, t_quantile_975
from joules.paths import cache_dir
from joules.serialize import atomic_write_text
from joules.sweep import RunConfig, Store, SweepProgress, parse_spec, run_sweep

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "deploy.json"
PAGES = (ROOT / "README.md", ROOT / "docs" / "results" / "deploy.md")
# the presets at and above the Q4_1 grid, in their own run and table (docs only: claim nothing)
ABOVE = HERE / "results" / "deploy_above_grid.json"
PAGES_OF = {OUT.resolve(): PAGES, ABOVE.resolve(): (ROOT / "docs" / "results" / "deploy.md",)}
FIGURE = ROOT / "docs" / "assets" / "deploy_size_curve.png"
LAYOUT = "sweep-v1"  # the JSON's layout
MODEL = "smollm2-135m"

PEER_PRESETS = tuple(p for p in PRESETS if p not in NEEDS_IMATRIX)  # IQ3_XXS needs an imatrix
METHODS = ("rtn", "gptq", "awq")  # awq: awq(...) | gptq(...)
# ``size-P``: joules' file of a target size (gguf_mix: one GGUF type per tensor chosen under the
# byte budget, then GPTQ) as large as llama.cpp's preset P file with an importance matrix;
# ``size-NNmib``: of NN MiB (points of the curve between the presets)
SIZE = "size"
_SIZE_MIB = re.compile(r"^size-(\d+(?:\.\d+)?)mib$")
# GGML types joules writes byte-exact (joules.formats.gguf presets)
EXACT_TYPES = frozenset(s.removeprefix("gguf-").upper() for s in JOULES_GGUF)
QUICK_ROWS = (
    "baseline",
    "llamacpp-q4_0",
    "llamacpp-q4_0+imatrix",
    "rtn-q4_0",
    "gptq-q4_0",
    "llamacpp-q4_k_m",
    "gptq-q4_k_m",
)
PARITY_ROW = "gptq-q4_0"
NOTE_Q4_1 = (
    "the default model's weights were Q4_1 before joules saw them: its baseline is an F32 copy "
    "of Q4_1 values, so a file at or above the Q4_1 grid's size ({mib:.1f} MiB, the shipped "
    "file) can hold those values almost exactly; only rows below it test quantization "
    "(below_q4_1_grid): claim nothing from the others"
)


# ----------------------------------------------------------------------------------------------
# Rows and recipes
# ----------------------------------------------------------------------------------------------


def peer_row(preset: str, imatrix: bool) -> str:
    return f"llamacpp-{preset.lower()}" + ("+imatrix" if imatrix else "")


def joules_row(method: str, preset: str) -> str:
    return f"{method}-{preset.lower()}"


def type_source(method: str, preset: str | None) -> str | None:
    """The llama.cpp file whose per-tensor types a joules row copies: for ``rtn`` (no
    calibration) the preset's file without an importance matrix (so ``rtn`` is a path check
    against it, byte for byte), for the calibrated methods the file with one (llama.cpp picks
    other types with an imatrix, e.g. Q4_1 or IQ4_NL where it guards the first ffn_down with
    Q5_K without one): each calibrated row is then the same size as the peer it must beat.
    A ``size-P`` row takes its size (not its types) from P's imatrix file; ``size-NNmib`` none."""
    if preset is None:
        return None
    return peer_row(preset, imatrix=method != "rtn")


def all_rows() -> list[str]:
    """Every row id, in table order (baseline, then per preset: llama.cpp, +imatrix, joules)."""
    out = ["baseline"]
    for p in PEER_PRESETS:
        out += [peer_row(p, False), peer_row(p, True)]
        out += [joules_row(m, p) for m in (*METHODS, SIZE)]
    return out


def parse_row(row: str) -> tuple[str, str | None, bool]:
    """(kind, preset, imatrix) of a row id; kind: baseline, peer, peer+imatrix, joules."""
    if row == "baseline":
        return "baseline", None, False
    if _SIZE_MIB.match(row):
        return "joules", None, False
    method, _, rest = row.partition("-")
    imatrix = rest.endswith("+imatrix")
    preset = rest.removesuffix("+imatrix").upper()
    if method == "llamacpp":
        return ("peer+imatrix" if imatrix else "peer"), preset, imatrix
    return "joules", preset, False


def peer_recipe(preset: str, imatrix: bool) -> str:
    return f"llamacpp(ftype={preset}, imatrix={'true' if imatrix else 'false'})"


def module_types(tensor_types: dict[str, str]) -> dict[str, str]:
    """{HF linear module name: GGML type} of a GGUF file's decoder weights (norms left out)."""
    from joules.models.gguf import hf_name

    return {
        hf_name(n).removesuffix(".weight"): t
        for n, t in tensor_types.items()
        if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n
    }


def _suffix(module: str) -> str | None:
    m = re.match(r"^.*?layers\.\d+\.(.+)$", module)
    return m.group(1) if m else None


def _most_common(types: list[str]) -> str:
    counts = Counter(types)
    return min(counts, key=lambda t: (-counts[t], t))  # ties: alphabetical, so it is stable


def type_layout(per_module: dict[str, str]) -> tuple[str, list[tuple[str, str]]]:
    """(default type, [(GLOB, type), ...] first match wins) giving every module its type: one
    ``*.SUFFIX`` glob where a module kind's layers mostly share a type, the exceptions by name
    first.

    >>> type_layout({"m.layers.0.a": "Q5_0", "m.layers.1.a": "Q5_0", "m.layers.0.b": "Q6_K",
    ...              "m.layers.1.b": "Q4_K", "m.layers.2.b": "Q4_K"})
    ('Q4_K', [('m.layers.0.b', 'Q6_K'), ('*.a', 'Q5_0')])
    """
    default = _most_common(list(per_module.values()))
    by_suffix: dict[str, dict[str, str]] = {}
    exact: list[tuple[str, str]] = []
    for m, t in per_module.items():
        s = _suffix(m)
        if s is None:
            if t != default:
                exact.append((m, t))
        else:
            by_suffix.setdefault(s, {})[m] = t
    globs: list[tuple[str, str]] = []
    for s, mods in sorted(by_suffix.items()):
        top = _most_common(list(mods.values()))
        exact += [(m, t) for m, t in mods.items() if t != top]
        if top != default:
            globs.append((f"*.{s}", top))
    layout = exact + globs
    assert all(resolve_type(m, default, layout) == t for m, t in per_module.items())
    return default, layout


def resolve_type(module: str, default: str, layout: list[tuple[str, str]]) -> str:
    """The type ``layout`` gives ``module`` (gptq's ``overrides``: first match wins)."""
    return next((t for pat, t in layout if fnmatch.fnmatchcase(module, pat)), default)


def _fmt(t: str) -> str:
    return f"gguf-{t.lower()}"


def unmapped_types(per_module: dict[str, str]) -> list[str]:
    """The module types joules cannot write byte-exact (empty: a joules row can copy the file)."""
    return sorted({t for t in per_module.values() if t not in EXACT_TYPES})


def joules_recipe(method: str, per_module: dict[str, str]) -> str:
    """joules' ``method`` (rtn, gptq, awq) giving every linear the type ``per_module`` names."""
    default, layout = type_layout(per_module)
    over = ", ".join(f'"{pat}={_fmt(t)}"' for pat, t in layout)
    gptq = f"gptq(format={_fmt(default)}" + (f", overrides=[{over}])" if layout else ")")
    if method == "gptq":
        return gptq
    if method == "awq":  # scales searched with the most common type
        # ... or, for IQ4 (joules' IQ4 search is ~18x slower than Q4_0's and AWQ rounds
        # thousands of times), with Q4_0, the same blocks of 32; GPTQ then rounds into IQ4
        proxy = ", search_format=gguf-q4_0" if default.startswith("IQ4") else ""
        return f"awq(format={_fmt(default)}{proxy}) | {gptq}"
    if method != "rtn":
        raise ValueError(f"unknown method {method!r}")
    if not layout:
        return f"rtn(format={_fmt(default)})"
    # rtn has no overrides: one step per type, each on disjoint targets
    groups: dict[str, list[str]] = {}
    by_suffix: dict[str | None, dict[str, str]] = {}
    for m, t in per_module.items():
        by_suffix.setdefault(_suffix(m), {})[m] = t
    for s, mods in sorted(by_suffix.items(), key=lambda kv: kv[0] or ""):
        if s is not None and len(set(mods.values())) == 1:
            groups.setdefault(next(iter(mods.values())), []).append(f"*.{s}")
        else:
            for m, t in sorted(mods.items()):
                groups.setdefault(t, []).append(m)
    steps = []
    for t, targets in sorted(groups.items()):
        quoted = ", ".join(f'"{x}"' for x in targets)
        steps.append(f"rtn(format={_fmt(t)}, targets=[{quoted}])")
    return " | ".join(steps)


def spec_text(settings: dict[str, Any], recipes: list[str]) -> str:
    """The sweep spec (TOML) of ``recipes`` under ``settings``."""
    lines = [
        "# written by benchmarks/deploy.py: the deploy benchmark's sweep (llama.cpp runs every file)",
        f"models = [{json.dumps(MODEL)}]",
        "recipes = [",
        *[f"  {json.dumps(r, ensure_ascii=False)}," for r in recipes],
        "]",
        "",
        "[eval]",
        'tasks = ["wikitext2", "deviation"]',
        f"limit_tokens = {settings['tokens']}",
        f"window = {settings['window']}",
        'runtime = "llamacpp"',
        "",
        "[calibration]",
        f"n = {settings['calib_n']}",
        f"length = {settings['calib_len']}",
        "",
        "[bench]",
        f"prompt_len = [{settings['prompt_len']}]",
        f"gen_len = {settings['gen_len']}",
        "repeats = 1",
        'runtime = "llamacpp"',
        "",
        "[deploy]",
        'embedding = "gguf-q6_k"',
        'output = "gguf-q6_k"',
        "",
    ]
    return "\n".join(lines)


def target_bytes(row: str, peer_sizes: dict[str, int]) -> int | None:
    """The whole-file size a ``size-*`` row targets (None: not a size row, or its peer's file
    has not been made)."""
    m = _SIZE_MIB.match(row)
    if m:
        return int(float(m.group(1)) * 2**20)
    if row.partition("-")[0] != SIZE:
        return None
    return peer_sizes.get(type_source(SIZE, parse_row(row)[1]) or "")


def size_recipe(target: int) -> str:
    """``gguf_mix`` with the budget a ``target``-byte file leaves for the embedding and the
    linears (``joules compress --target-size``'s arithmetic: :func:`joules.deploy.size.size_plan`)."""
    from joules.deploy.size import size_plan

    return f"gguf_mix(bytes={size_plan(MODEL, target).budget_bytes})"


def row_recipes(
    rows: list[str],
    peer_types: dict[str, dict[str, str]],
    peer_sizes: dict[str, int] | None = None,
) -> dict[str, str]:
    """{row: recipe} of ``rows`` whose recipe is known: every baseline and peer row, the
    joules rows whose :func:`type_source` file has types in ``peer_types`` that joules writes
    byte-exact, and the ``size-*`` rows whose size is known (``peer_sizes``: file bytes)."""
    out: dict[str, str] = {}
    for row in rows:
        kind, preset, imatrix = parse_row(row)
        if row.partition("-")[0] == SIZE:
            target = target_bytes(row, peer_sizes or {})
            if target is not None:
                out[row] = size_recipe(target)
        elif kind == "baseline":
            out[row] = "baseline"
        elif kind.startswith("peer"):
            out[row] = peer_recipe(preset, imatrix)  # type: ignore[arg-type]
        else:
            per = peer_types.get(type_source(row.partition("-")[0], preset))  # type: ignore[arg-type]
            if per and not unmapped_types(per):
                out[row] = joules_recipe(row.partition("-")[0], per)
    return out


# ----------------------------------------------------------------------------------------------
# Measuring: the sweep, the interleaved decode run, the torch parity check
# ----------------------------------------------------------------------------------------------


class _Printer(SweepProgress):
    """Sweep progress, one line per run and phase (stdout)."""

    t0 = time.perf_counter()  # one clock for both sweeps of a run

    def __init__(self) -> None:
        self.last = ""

    def _say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.0f} s] {text}", flush=True)

    def sweep(self, done: int, total: int) -> None:
        self._say(f"sweep {done}/{total}")

    def run_start(self, label: str) -> None:
        self.last = ""
        self._say(f"run {label if len(label) < 100 else label[:96] + ' ...'}")

    def phase(self, name: str, done: int | None = None, total: int | None = None) -> None:
        if name != self.last:
            self.last = name
            self._say(f"  {name}")

    def run_end(self, label: str, status: str) -> None:
        self._say(f"  {status}")


def sweep(settings: dict[str, Any], recipes: dict[str, str], work: Path, reuse_stale: bool) -> Any:
    """Run the sweep of ``recipes`` (resumable) and return (spec, {row: RunRow or None})."""
    path = work / "deploy.toml"
    text = spec_text(settings, list(recipes.values()))
    atomic_write_text(path, text)
    spec = parse_spec(text, str(path))
    summary = run_sweep(
        spec,
        str(work / "deploy.db"),
        retry_failed=True,
        reuse_stale=reuse_stale,
        progress=_Printer(),
    )
    for label, err in summary.failures:
        print(f"FAILED {label}: {err}", file=sys.stderr)
    ids = {cfg.config_id(): row for row, cfg in zip(recipes, spec.runs(), strict=True)}
    found: dict[str, Any] = dict.fromkeys(recipes)
    with Store(work / "deploy.db") as store:
        for run in store.runs():
            row = ids.get(RunConfig.from_dict(run.config).config_id())
            if row is not None and (found[row] is None or run.status == "done"):
                found[row] = run
    return spec, found


def file_types(run: Any) -> dict[str, str]:
    """{GGUF tensor: type} of a run's file: the peer manifest's record, else read from it."""
    rec = (run.manifest or {}).get("gguf_file") or {}
    types = rec.get("types")
    if isinstance(types, dict) and types and all(isinstance(v, str) for v in types.values()):
        return dict(types)
    from joules.deploy.llamacpp import gguf_tensor_table

    return {t[0]: t[1] for t in gguf_tensor_table(run.manifest["deploy"]["gguf"]["path"])}


def _t_interval(values: list[float]) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    s = summarize(values)
    return (s.ci95_low, s.ci95_high)


def paired_ratio(a: list[float], b: list[float]) -> dict[str, Any]:
    """a / b over paired rounds: geometric mean of the per-round ratios, 95 % Student t interval
    over the rounds' log ratios.

    >>> r = paired_ratio([100.0, 110.0, 90.0], [100.0, 100.0, 100.0])
    >>> round(r["ratio"], 4), r["rounds"], r["ci95"][0] < 1 < r["ci95"][1]
    (0.9967, 3, True)
    """
    logs = [math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0 and y > 0]
    mean = statistics.fmean(logs)
    ci = None
    if len(logs) >= 2:
        half = t_quantile_975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
        ci = [math.exp(mean - half), math.exp(mean + half)]
    return {"ratio": math.exp(mean), "ci95": ci, "rounds": len(logs)}


def decode_rounds(files: dict[str, str], settings: dict[str, Any]) -> dict[str, Any]:
    """Every file decoded once per round, ``repeats`` rounds, order shuffled per round."""
    from joules.bench import BenchConfig, run_bench
    from joules.measure import detect_meter
    from joules.models import load_model

    lm = load_model(MODEL)
    tok, info = lm.tokenizer, lm.info
    del lm
    cfg = BenchConfig(
        prompt_lens=(settings["prompt_len"],),
        gen_len=settings["gen_len"],
        repeats=1,
        warmup=1,
        runtime="llamacpp",
        threads=settings["threads"],
        dtype="auto",
    )
    rng = random.Random(settings["seed"])
    order = sorted(files)
    rounds: list[list[str]] = []
    per: dict[str, dict[str, list[Any]]] = {
        r: {"tok_s": [], "j_per_token": [], "ttft_ms": [], "energy_method": []} for r in files
    }
    threads = settings["threads"]
    with detect_meter() as meter:
        for i in range(settings["repeats"]):
            rng.shuffle(order)
            rounds.append(list(order))
            for row in order:
                b = run_bench(files[row], tok, info, cfg, meter=meter, probe_if_missing=False)
                r, threads = b.rows[0], b.threads
                e = r.decode_energy
                per[row]["tok_s"].append(r.decode_tok_s)
                per[row]["ttft_ms"].append(1e3 * r.ttft_s.median)
                per[row]["j_per_token"].append(e.j_per_token if e else None)
                per[row]["energy_method"].append(e.method if e else None)
            print(f"decode round {i + 1}/{settings['repeats']} done", flush=True)
    return {
        "method": "run_bench on the llamacpp runtime, batch 1, 1 warm-up + 1 timed generation "
        "per file per round; every file once per round, the order shuffled per round "
        f"(random.Random({settings['seed']})); tok/s: median over rounds with the 95 % "
        "Student t interval of the mean; ratio: geometric mean of the per-round ratios with a "
        "95 % Student t interval over the rounds' log ratios",
        "threads": threads,
        "order": rounds,
        "files": per,
    }


def parity(path: str, run: Any, spec: Any) -> dict[str, Any]:
    """The torch path (transformers dequantizes the file) against llama.cpp's perplexity of the
    same file on the same windows."""
    from joules.evaluate import tasks
    from joules.models import load_model
    from joules.sweep.stages import task_options

    lm = load_model(path)
    res = tasks.run_task(
        "wikitext2", lm.model, lm.tokenizer, lm.info, **task_options("wikitext2", spec.eval)
    )
    ll = run.eval["wikitext2"]["result"]
    return {
        "torch_perplexity": res.perplexity,
        "llamacpp_perplexity": ll["perplexity"],
        "ratio": ll["perplexity"] / res.perplexity,
        "tokens_scored": res.tokens_scored,
        "same_windows": res.windows == ll.get("windows")
        and res.tokens_scored == ll.get("tokens_scored"),
        "row": PARITY_ROW,
    }


def _metric(run: Any, name: str) -> tuple[float | None, list[float] | None]:
    m = run.metric(name) if run is not None else None
    if m is None or m.value is None:
        return None, None
    return m.value, ([m.lo, m.hi] if m.lo is not None and m.hi is not None else None)


def measured_row(row: str, recipe: str | None, run: Any, grid_bytes: int) -> dict[str, Any]:
    """A row's figures from its sweep run (None where it did not finish)."""
    kind, preset, _ = parse_row(row)
    out: dict[str, Any] = {
        "row": row,
        "kind": kind,
        "method": "llama.cpp"
        if kind.startswith("peer")
        else {
            "rtn": "rtn",
            "gptq": "gptq",
            "awq": "awq | gptq",
            SIZE: "gguf_mix (target size)",
        }.get(row.partition("-")[0]),
        "preset": preset,
        "recipe": recipe,
        "status": None if run is None else run.status,
        "error": None if run is None else run.error,
    }
    if run is None or run.status != "done":
        return out
    facts = run.manifest["deploy"]["gguf"]
    kld, kld_ci = _metric(run, "kld_mean")
    ppl_ratio, ppl_ratio_ci = _metric(run, "ppl_ratio")
    ppl, ppl_ci = _metric(run, "perplexity")
    jpt = run.metric("j_per_token")
    out.update(
        run_key=run.key,
        file=facts["path"],
        sha256=facts["sha256"],
        size_bytes=facts["size_bytes"],
        file_mib=facts["size_bytes"] / 2**20,
        bits_per_weight=facts.get("bits_per_weight"),
        types=facts.get("types"),
        below_q4_1_grid=facts["size_bytes"] < grid_bytes,
        kld_mean=kld,
        kld_mean_ci95=kld_ci,
        kld_median=_metric(run, "kld_median")[0],
        kld_p99=_metric(run, "kld_p99")[0],
        kld_max=_metric(run, "kld_max")[0],
        same_top_pct=_metric(run, "same_top_pct")[0],
        ppl_ratio=ppl_ratio,
        ppl_ratio_ci95=ppl_ratio_ci,
        perplexity=ppl,
        perplexity_ci95=ppl_ci,
        sweep_bench={
            "tokens_per_s": _metric(run, "tokens_per_s")[0],
            "j_per_token": None if jpt is None else jpt.value,
            "energy_method": None if jpt is None else jpt.method,
            "note": "the sweep's own bench (1 repeat); the table's speed is the decode run's",
        },
        wall_s=run.wall_s,
        timings=run.timings,
    )
    return out


def needed_rows(wanted: list[str]) -> list[str]:
    """``wanted`` with the baseline and, for each joules row, its preset's llama.cpp file without
    imatrix (the types it copies), in table order."""
    extra = {"baseline"} | {
        type_source(w.partition("-")[0], parse_row(w)[1])
        for w in wanted
        if parse_row(w)[0] == "joules"
    }
    return [r for r in all_rows() if r in wanted or r in extra] + sorted(
        (w for w in wanted if _SIZE_MIB.match(w)), key=lambda w: float(w[5:-3])
    )


def run(args: Any) -> dict[str, Any]:
    from joules.models.loading import smollm2_gguf_path

    settings = settings_of(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    needed = needed_rows(rows_of(args))
    t0 = time.perf_counter()
    # first the files joules rows copy their types from, then everything (the store skips them)
    first = row_recipes([r for r in needed if parse_row(r)[0] != "joules"], {})
    _, runs = sweep(settings, first, work, args.reuse_stale)
    peers = {
        r: run
        for r, run in runs.items()
        if run is not None and run.status == "done" and parse_row(r)[0].startswith("peer")
    }
    peer_types = {r: module_types(file_types(run)) for r, run in peers.items()}
    peer_sizes = {r: run.manifest["deploy"]["gguf"]["size_bytes"] for r, run in peers.items()}
    grid_bytes = smollm2_gguf_path().stat().st_size
    recipes = row_recipes(needed, peer_types, peer_sizes)
    notes = []
    for r in needed:
        target = target_bytes(r, peer_sizes)
        if target is not None and target >= grid_bytes and r in recipes:
            del recipes[r]  # a target at or above the Q4_1 grid re-finds the shipped weights
            notes.append(
                f"no row {r}: its target ({target / 2**20:.1f} MiB) is not below the Q4_1 grid"
            )
            print(notes[-1], file=sys.stderr)
        if r in recipes or target is not None:
            continue
        src = type_source(r.partition("-")[0], parse_row(r)[1])
        per = peer_types.get(src or "")
        why = (
            f"{src}'s file holds {', '.join(unmapped_types(per))}, which joules does not write"
            if per
            else f"{src} did not finish"
        )
        notes.append(f"no row {r}: {why}")
        print(notes[-1], file=sys.stderr)
    spec, runs = sweep(settings, recipes, work, args.reuse_stale)
    sweep_s = time.perf_counter() - t0
    rows = [measured_row(r, recipes[r], runs[r], grid_bytes) for r in recipes]
    by = {r["row"]: r for r in rows}
    for r in rows:
        target = target_bytes(r["row"], peer_sizes)
        if target is not None:
            r["target_bytes"] = target
            r["size_source"] = type_source(SIZE, r["preset"])

    # each joules file must hold, tensor for tensor, the types of llama.cpp's file it copies
    for r in rows:
        method = r["row"].partition("-")[0]
        copies = r["kind"] == "joules" and method != SIZE and r["preset"]
        peer = by.get(type_source(method, r["preset"]) or "") if copies else None
        if r.get("file") and peer and peer.get("file"):
            mine, theirs = file_types(runs[r["row"]]), file_types(runs[peer["row"]])
            r["same_types_as"] = peer["row"]
            r["tensor_type_mismatches"] = sorted(
                n for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n)
            )

    files = {r["row"]: r["file"] for r in rows if r.get("file")}
    decode_settings = {
        k: settings[k] for k in ("prompt_len", "gen_len", "repeats", "threads", "seed")
    }
    speed_key = {"files": {k: by[k]["sha256"] for k in files}, "settings": decode_settings}
    cache = RowCache("deploy-decode", {"layout": LAYOUT}, root=work)
    speed = None if args.force else cache.get("decode", speed_key)
    t1 = time.perf_counter()
    if speed is None and files:
        speed = decode_rounds(files, settings)
        cache.put("decode", speed, speed_key)
    speed_s = time.perf_counter() - t1

    par = None
    if not args.no_parity and PARITY_ROW in files:
        pcache = RowCache("deploy-parity", {"layout": LAYOUT}, root=work)
        pkey = {"sha256": by[PARITY_ROW]["sha256"], "eval": asdict(spec.eval)}
        par = None if args.force else pcache.get(PARITY_ROW, pkey)
        if par is None:
            par = parity(files[PARITY_ROW], runs[PARITY_ROW], spec)
            pcache.put(PARITY_ROW, par, pkey)
    return {
        **header("benchmarks/deploy.py", args.argv),
        "layout": LAYOUT,
        "settings": settings,
        "wall_s": {"sweep": sweep_s, "decode": speed_s, "total": time.perf_counter() - t0},
        "notes": [
            NOTE_Q4_1.format(mib=grid_bytes / 2**20),
            "J/token: the decode run's meter, its method per file (estimated where the machine "
            "has no energy counter: CPU time x TDP share, ±30 %)",
            "kld_*: KL(baseline ‖ file) per scored token in nats, against the baseline's F32 "
            "file; ppl_ratio: file / baseline perplexity with its paired 95 % interval",
            *notes,
        ],
        "q4_1_grid_bytes": grid_bytes,
        "spec": (work / "deploy.toml").read_text(),
        "rows": rows,
        "decode": speed,
        "parity": par,
    }


# ----------------------------------------------------------------------------------------------
# The table and the headline (from the JSON alone)
# ----------------------------------------------------------------------------------------------


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _with_ci(v: float | None, ci: list[float] | None, spec: str) -> str | None:
    if v is None:
        return None
    return format(v, spec) + ("" if not ci else f" ({format(ci[0], spec)}–{format(ci[1], spec)})")


def with_speed(data: dict[str, Any]) -> dict[str, Any]:
    """Each row's ``decode`` figures (median tok/s, interval, J/token, ratio to llama.cpp's own
    file of the same types) from the decode run's rounds."""
    files = ((data.get("decode") or {}).get("files")) or {}
    by = {r["row"]: r for r in data["rows"]}
    for r in data["rows"]:
        f = files.get(r["row"])
        if not f:
            r["decode"] = None
            continue
        jpt = [x for x in f["j_per_token"] if x is not None]
        methods = sorted({m for m in f["energy_method"] if m})
        d: dict[str, Any] = {
            "tok_s_median": statistics.median(f["tok_s"]),
            "tok_s_ci95": list(ci) if (ci := _t_interval(f["tok_s"])) else None,
            "rounds": len(f["tok_s"]),
            "j_per_token_median": statistics.median(jpt) if jpt else None,
            "energy_method": "/".join(methods) or None,
            "vs_llamacpp": None,
        }
        peer = r.get("same_types_as") if r["kind"] == "joules" else None
        if peer and peer in files and by.get(peer):
            d["vs_llamacpp"] = {"peer": peer, **paired_ratio(f["tok_s"], files[peer]["tok_s"])}
        r["decode"] = d
    return data


def _types_text(types: dict[str, int] | None) -> str | None:
    if not types:
        return None
    return ", ".join(f"{k} {v}" for k, v in sorted(types.items(), key=lambda kv: (-kv[1], kv[0])))


def table_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's rows, one object per row, each cell's field (intervals as text)."""
    out = []
    for r in data["rows"]:
        d = r.get("decode") or {}
        vs = d.get("vs_llamacpp") or {}
        out.append(
            {
                "row": r["row"],
                "kind": r["kind"],
                "file_mib": r.get("file_mib"),
                "bits_per_weight": r.get("bits_per_weight"),
                "kld_mean": _with_ci(r.get("kld_mean"), r.get("kld_mean_ci95"), ".4f"),
                "kld_median": r.get("kld_median"),
                "kld_p99": r.get("kld_p99"),
                "kld_max": r.get("kld_max"),
                "same_top_pct": r.get("same_top_pct"),
                "ppl_ratio": _with_ci(r.get("ppl_ratio"), r.get("ppl_ratio_ci95"), ".4f"),
                "decode_tok_s": _with_ci(d.get("tok_s_median"), d.get("tok_s_ci95"), ".1f"),
                "vs_llamacpp": _with_ci(vs.get("ratio"), vs.get("ci95"), ".3f"),
                "j_per_token": d.get("j_per_token_median"),
                "claim": None
                if r.get("below_q4_1_grid") is None
                else ("yes" if r["below_q4_1_grid"] else "no"),
                "types": _types_text(r.get("types")),
            }
        )
    return out


def _kld_verdict(j: dict[str, Any], p: dict[str, Any]) -> str:
    jl, ph = j.get("kld_mean_ci95"), p.get("kld_mean_ci95")
    lower = "joules" if j["kld_mean"] < p["kld_mean"] else "llama.cpp"
    if jl and ph:
        if jl[1] < ph[0]:
            return "joules lower (95 % intervals apart)"
        if ph[1] < jl[0]:
            return "llama.cpp lower (95 % intervals apart)"
        return f"{lower} lower, 95 % intervals overlap (a tie)"
    return f"{lower} lower (no interval)"


def headline(data: dict[str, Any], tolerance: float = 0.05) -> list[str]:
    """For each size class below the Q4_1 grid (a preset joules has rows of): joules' best row
    (lowest mean KLD) against llama.cpp's best imatrix row (lowest mean KLD) of the same or
    larger size, at most ``tolerance`` larger (else the smallest larger one below the grid)."""
    grid = data["q4_1_grid_bytes"]
    done = [r for r in data["rows"] if r.get("kld_mean") is not None]
    imx = [r for r in done if r["kind"] == "peer+imatrix" and r["size_bytes"] < grid]
    lines = []
    presets = [
        p for p in PEER_PRESETS if any(r["preset"] == p and r["kind"] == "joules" for r in done)
    ]
    smallest_joules = None
    for p in presets:
        ours = [r for r in done if r["kind"] == "joules" and r["preset"] == p]
        j = min(ours, key=lambda r: r["kld_mean"])
        if j["size_bytes"] >= grid:
            continue
        smallest_joules = min(smallest_joules or j["size_bytes"], j["size_bytes"])
        larger = [r for r in imx if r["size_bytes"] >= j["size_bytes"]]
        near = [r for r in larger if r["size_bytes"] <= j["size_bytes"] * (1 + tolerance)]
        if not near and larger:
            size = min(r["size_bytes"] for r in larger)
            near = [r for r in larger if r["size_bytes"] == size]
        head = f"{p} class ({j['file_mib']:.1f} MiB): joules {j['row']} KLD {j['kld_mean']:.4f}"
        head += f", p99 {_num(j.get('kld_p99'), '.3f')}"
        if not near:
            lines.append(f"{head}; no llama.cpp imatrix row of the same or larger size ran")
            continue
        q = min(near, key=lambda r: r["kld_mean"])
        p99 = "-"
        if j.get("kld_p99") is not None and q.get("kld_p99") is not None:
            p99 = "joules lower" if j["kld_p99"] < q["kld_p99"] else "llama.cpp lower"
        lines.append(
            f"{head} vs llama.cpp {q['row']} ({q['file_mib']:.1f} MiB) KLD {q['kld_mean']:.4f}, "
            f"p99 {_num(q.get('kld_p99'), '.3f')}: mean KLD {_kld_verdict(j, q)}; p99 {p99}"
        )
    if smallest_joules is not None:
        below = sorted(
            (r for r in imx if r["size_bytes"] < smallest_joules), key=lambda r: -r["size_bytes"]
        )
        if below:
            lines.append(
                "no joules row below "
                f"{smallest_joules / 2**20:.1f} MiB (joules writes none of their types): "
                + ", ".join(
                    f"{r['row']} {r['file_mib']:.1f} MiB KLD {r['kld_mean']:.4f}" for r in below
                )
            )
    if not lines:
        lines.append("no joules row below the Q4_1 grid finished: nothing to compare")
    return lines


def curve_lines(data: dict[str, Any]) -> list[str]:
    """joules' files of a target size (``size-*`` rows) against each llama.cpp imatrix file below
    the Q4_1 grid: the best target-size file of the same or smaller size, on mean KLD (with the
    intervals' verdict), p99 and the perplexity ratio; then whether the curve lies below every
    imatrix point."""
    grid = data["q4_1_grid_bytes"]
    done = [r for r in data["rows"] if r.get("kld_mean") is not None]
    curve = [r for r in done if r["row"].partition("-")[0] == SIZE and r["size_bytes"] < grid]
    imx = sorted(
        (r for r in done if r["kind"] == "peer+imatrix" and r["size_bytes"] < grid),
        key=lambda r: r["size_bytes"],
    )
    if not curve or not imx:
        return []
    lines = []
    below = 0
    for q in imx:
        fits = [r for r in curve if r["size_bytes"] <= q["size_bytes"]]
        head = f"target-size curve at llama.cpp {q['row']} ({q['file_mib']:.1f} MiB)"
        if not fits:
            lines.append(f"{head}: no joules target-size file that small ran")
            continue
        j = min(fits, key=lambda r: r["kld_mean"])
        wins = (
            j["kld_mean"] < q["kld_mean"]
            and (j.get("kld_p99") or 0) <= (q.get("kld_p99") or 0)
            and (j.get("ppl_ratio") or 0) < (q.get("ppl_ratio") or 0)
        )
        below += wins
        lines.append(
            f"{head}: joules {j['row']} ({j['file_mib']:.1f} MiB) KLD {j['kld_mean']:.4f}, p99 "
            f"{_num(j.get('kld_p99'), '.3f')}, ppl x{_num(j.get('ppl_ratio'), '.4f')} vs "
            f"{q['kld_mean']:.4f}, p99 {_num(q.get('kld_p99'), '.3f')}, ppl "
            f"x{_num(q.get('ppl_ratio'), '.4f')}: mean KLD {_kld_verdict(j, q)}"
        )
    sizes = ", ".join(f"{r['file_mib']:.1f}" for r in sorted(curve, key=lambda r: r["size_bytes"]))
    lines.append(
        f"target-size curve ({len(curve)} files: {sizes} MiB): lower mean KLD, p99 and perplexity "
        f"than {below} of the {len(imx)} llama.cpp imatrix files below the Q4_1 grid"
    )
    return lines


def retable(data: dict[str, Any]) -> dict[str, Any]:
    """Re-derive every derived field (decode figures, table, headline) from the measured ones."""
    data = with_speed(data)
    data["table"] = table_rows(data)
    data["headline"] = headline(data) + curve_lines(data)
    return data


COLUMNS = (
    ("kind", "kind"),
    ("MiB", "file_mib"),
    ("bits/weight", "bits_per_weight"),
    ("KLD mean (95 %)", "kld_mean"),
    ("KLD median", "kld_median"),
    ("KLD p99", "kld_p99"),
    ("KLD max", "kld_max"),
    ("same top %", "same_top_pct"),
    ("ppl ratio (95 %)", "ppl_ratio"),
    ("decode tok/s (95 %)", "decode_tok_s"),
    ("vs llama.cpp same types (95 %)", "vs_llamacpp"),
    ("J/token", "j_per_token"),
    ("below Q4_1 grid", "claim"),
    ("tensor types", "types"),
)
FORMATS = {
    "file_mib": ".1f",
    "bits_per_weight": ".2f",
    "kld_median": ".4f",
    "kld_p99": ".3f",
    "kld_max": ".2f",
    "same_top_pct": ".2f",
    "j_per_token": ".4f",
}


def energy_method(data: dict[str, Any]) -> str | None:
    """The decode run's energy method when every file shares one (estimated on a VM)."""
    methods = {(r.get("decode") or {}).get("energy_method") for r in data["rows"]}
    methods.discard(None)
    return methods.pop() if len(methods) == 1 else None


def columns(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(header, field) of every column after the row id; J/token names its method."""
    method = energy_method(data)
    return [(f"{h} ({method})" if f == "j_per_token" and method else h, f) for h, f in COLUMNS]


def marker(data: dict[str, Any], name: str = OUT.name) -> str:
    cols = "; ".join(f"{h}={f}" for h, f in columns(data))
    return f"<!-- bench: results/{name} rows=table key=row cols={cols} -->"


def markdown(data: dict[str, Any], name: str = OUT.name) -> str:
    """The docs' block: the marker, the table and the headline lines, from the JSON alone."""
    if data.get("layout") != LAYOUT:
        raise SystemExit(
            f"{data.get('layout')!r} is not this script's layout {LAYOUT!r}: re-run it"
        )
    cols = columns(data)
    lines = [marker(data, name), "| row | " + " | ".join(h for h, _ in cols) + " |"]
    lines.append("|" + "---|" * (len(cols) + 1))
    for t in data["table"]:
        cells = [t["row"]]
        for _, f in cols:
            v = t[f]
            cells.append("-" if v is None else format(v, FORMATS.get(f, "")))
        lines.append("| " + " | ".join(cells) + " |")
    s = data["settings"]
    d = data.get("decode") or {}
    lines += ["", *[f"- {h}" for h in data["headline"]]]
    lines.append(
        f"- decode: {s['repeats']} rounds of every file in one run, order shuffled per round; "
        f"{s['prompt_len']}-token prompt, {s['gen_len']} tokens, {d.get('threads') or 'all'} "
        "threads; tok/s median (t interval of the mean), ratio: geometric mean of paired "
        f"rounds (t interval of the log ratios); J/token: {energy_method(data) or 'mixed'}"
    )
    grid = data["q4_1_grid_bytes"] / 2**20
    lines.append(
        f"- the baseline's weights were Q4_1 ({grid:.1f} MiB grid): rows at or above it "
        "(below Q4_1 grid: no) match it almost exactly; claim nothing from them"
    )
    p = data.get("parity")
    if p:
        lines.append(
            f"- torch path vs llama.cpp on the {p['row']} file: perplexity "
            f"{p['torch_perplexity']:.3f} vs {p['llamacpp_perplexity']:.3f} "
            f"(ratio {p['ratio']:.4f}, same windows: {'yes' if p['same_windows'] else 'no'})"
        )
    return "\n".join(lines)


# The committed JSON before this layout (benchmarks/results/deploy.json until the next full
# run): its table and lines, as the old script printed them. Delete with that file.
LEGACY_MARKER = (
    "<!-- bench: results/deploy.json rows=table key=row cols=MiB=file_mib; "
    "bits/weight=bits_per_weight; perplexity=perplexity; ±95 %=ppl_half_ci95; "
    "vs llama.cpp=vs_peer_ppl_ratio; decode tok/s=decode_tok_s; TTFT ms=ttft_ms; "
    "J/token (estimated)=decode_j_per_token; SoL %=decode_sol_pct; tensor types=types -->"
)


def splice(page: str, block: str, name: str = OUT.name) -> str:
    """``page`` with its block of ``results/NAME`` (marker, table, the ``- `` lines after one
    blank line) replaced by ``block``; unchanged when the page has none.

    >>> page = "intro\\n<!-- bench: results/deploy.json x -->\\n| a |\\n|---|\\n| 1 |\\n\\n- s\\n\\nend"
    >>> splice(page, "NEW")
    'intro\\nNEW\\n\\nend'
    """
    lines = page.split("\n")
    tag = f"<!-- bench: results/{name} "
    start = next((i for i, ln in enumerate(lines) if tag in ln), None)
    if start is None:
        return page
    end = start + 1
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    if end + 1 < len(lines) and lines[end] == "" and lines[end + 1].startswith("- "):
        end += 1
        while end < len(lines) and lines[end].startswith("- "):
            end += 1
    return "\n".join(lines[:start] + block.split("\n") + lines[end:])


def write_figure(data: dict[str, Any], path: Path) -> Path:
    """Mean KLD vs file size of the JSON's rows (:mod:`joules.report.curve`, the report's
    figure), rendered by headless chromium into the PNG ``path`` (the docs' picture)."""
    from joules.report.curve import rows_points, size_figure

    grid = data["q4_1_grid_bytes"] / 2**20
    below = [
        r for r in data["rows"] if r.get("size_bytes") and r["size_bytes"] < data["q4_1_grid_bytes"]
    ]
    fig = size_figure(
        rows_points(below),
        title=f"{MODEL}: files below the Q4_1 grid ({grid:.1f} MiB), "
        f"{data['settings']['tokens']:,} WikiText-2 test tokens, 95 % intervals",
    )
    fig.update_layout(width=1100, height=620)
    if figure_png(fig, path) is None:
        raise SystemExit("--figure needs chromium (Debian: apt install chromium)")
    return path


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def rows_of(args: Any) -> list[str]:
    known = all_rows()
    if args.rows == "all":
        return known
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in known and not _SIZE_MIB.match(r)]
    if unknown:
        sys.exit(f"unknown rows {unknown}: choose from all, {', '.join(known)}, size-NNmib")
    return [r for r in known if r in rows] + [r for r in rows if _SIZE_MIB.match(r)]


def settings_of(args: Any) -> dict[str, Any]:
    return {
        "tokens": args.tokens,
        "window": args.window,
        "calib_n": args.calib_n,
        "calib_len": args.calib_len,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "repeats": args.repeats,
        "threads": args.threads,
        "seed": args.seed,
        "rows": args.rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser(
        __doc__,
        out=OUT,
        threads=None,
        window=512,
        calib_len=256,
        repeats=5,
        force=True,
        table=True,
    )
    ap.add_argument("--tokens", type=int, help="WikiText-2 test tokens scored (16384; quick 2048)")
    ap.add_argument("--calib-n", type=int, help="calibration sequences (128; --quick: 16)")
    ap.add_argument(
        "--rows",
        help="comma-separated row ids, or all (default; --quick: a handful): "
        "baseline, llamacpp-P, llamacpp-P+imatrix, rtn-P, gptq-P, awq-P, size-P for a preset P "
        "(q4_0, q4_k_m...), size-NNmib; a joules row also runs llamacpp-P (its types; size-P: "
        "llamacpp-P+imatrix, its size)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 2,048 tokens, 16 × 256, rows {','.join(QUICK_ROWS)}",
    )
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="shuffles the decode order per round")
    ap.add_argument("--no-parity", action="store_true", help="skip the torch-path parity check")
    ap.add_argument(
        "--figure",
        type=Path,
        nargs="?",
        const=FIGURE,
        help="draw mean KLD vs file size from --out's JSON into this PNG (default: %(const)s)",
    )
    ap.add_argument(
        "--reuse-stale",
        action="store_true",
        help="keep runs of the same settings made by other joules code",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=cache_dir() / "bench-deploy",
        help="the spec, the store and the speed run's record (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    args.argv = argv
    if args.figure:
        data = json.loads(Path(args.out).read_text())
        print(f"wrote {write_figure(data, args.figure)}", file=sys.stderr)
        return 0
    if args.table:
        data = json.loads(Path(args.out).read_text())
        if data.get("layout") == LAYOUT:
            data = retable(data)
            write_json(args.out, data, indent=1)
            name = Path(args.out).name
            block = markdown(data, name)
            for page in PAGES_OF.get(Path(args.out).resolve(), ()):
                text = page.read_text()
                new = splice(text, block, name)
                if new != text:
                    atomic_write_text(page, new)
                    print(f"updated {page.relative_to(ROOT)}", file=sys.stderr)
        print(markdown(data, Path(args.out).name))
        return 0
    args.tokens = args.tokens or (2048 if args.quick else 16384)
    args.calib_n = args.calib_n or (16 if args.quick else 128)
    args.rows = args.rows or (",".join(QUICK_ROWS) if args.quick else "all")
    data = retable(run(args))
    write_json(args.out, data, indent=1, default=str)
    print(markdown(data, Path(args.out).name))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
