"""The stage table: what a run calls to load, compress, evaluate, bench and predict.

    >>> from joules.sweep.stages import default_stages
    >>> stages = default_stages()
    >>> sorted(stages.missing)   # doctest: +SKIP
    ['bench', 'predict']

The runner only sees a :class:`Stages` value, so tests pass tiny fakes (``joules.testing.sweep``)
and a stage whose module is not installed is recorded in ``missing``: a run that needs it fails
with that reason (stored, re-tried with ``--retry-failed`` once the stage exists), it is never
skipped silently nor reported as done.

The timed bench runs in a fresh Python process (:func:`bench`): the sweep's own process holds
the base model of every run, its compressed copy and the evaluation's buffers, so its resident
memory says nothing about a model's; the child loads only the model it benches (the baseline
from its spec, a compressed model from a directory :func:`joules.compress.save_compressed`
wrote), so ``peak_rss_bytes`` is that model's, and no other work of the sweep shares its CPU
caches. It costs a model load per bench (plus one save per compressed model), recorded in the
result's ``isolation`` entry. :func:`bench_in_process` is the old behaviour, for callers that
want speed over honest memory figures (the fakes run in process too).

Evaluation runs any registered task (:mod:`joules.evaluate.tasks`): the sweep's protocol
(``split``, ``window``, ``stride``, ``limit_tokens``, ``limit``) goes to every task that has an
option of that name.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from joules.data import load_choice
from joules.errors import ConfigError
from joules.serialize import to_jsonable
from joules.sweep.spec import BASELINE, BenchSpec, CalibrationSpec, DeploySpec, EvalSpec

# Each stage imports the torch layers it drives (models, compress, evaluate, bench, predict)
# inside its function: the sweep package (spec, store, analyze) is read by `joules report` and
# `joules recommend`, which must not pay for importing torch.

Progress = Callable[[int, int], None]  # (done, total) of the current phase


@dataclass
class Stages:
    """Callables a run is made of (each may be None when its module is not installed).

    load(model_spec, dtype) -> (model, tokenizer, info)
    calibration(tokenizer, CalibrationSpec) -> (LongTensor [n, length], {sha256, ...})
    compress(model, recipe, (tokens, calib info), tokenizer, info, progress) -> (model', manifest)
    layer_paths(model) -> {layer name: "emulated" | "kernel:<name>/<dtype>"} after a forward
    evaluate(task, model, tokenizer, info, EvalSpec, progress) -> {result, window_nll, window_tokens}
    bench(model, tokenizer, info, BenchSpec, progress) -> BenchResult dict
    predict(model, info, manifest, hardware, BenchSpec | None) -> Prediction dict
    baseline_manifest(model, info) -> manifest-like dict of the model as loaded
    export(model, tokenizer, info, manifest, DeploySpec, path) -> the deployable file's facts
        (path, size_bytes, sha256, types, n_elements, bits_per_weight, exact)
    evaluate_file(task, path, tokenizer, info, EvalSpec, progress, reference_path) -> as
        evaluate, on the exported file through ``EvalSpec.runtime``
    """

    load: Callable[[str, str], tuple[Any, Any, Any]]
    calibration: Callable[[Any, CalibrationSpec], tuple[Any, dict[str, Any]]] | None
    compress: Callable[..., tuple[Any, dict[str, Any]]] | None
    evaluate: Callable[[str, Any, Any, Any, EvalSpec, Progress | None], dict[str, Any]] | None
    bench: Callable[[Any, Any, Any, BenchSpec, Progress | None], dict[str, Any]] | None
    predict: Callable[[Any, Any, dict[str, Any], str, BenchSpec | None], dict[str, Any]] | None
    baseline_manifest: Callable[[Any, Any], dict[str, Any]]
    layer_paths: Callable[[Any], dict[str, str]] | None = None
    export: Callable[..., dict[str, Any]] | None = None
    evaluate_file: Callable[..., dict[str, Any]] | None = None
    missing: dict[str, str] = field(default_factory=dict)

    def need(self, name: str) -> Callable[..., Any]:
        """The stage ``name``, or a one-line error saying why it is not available."""
        fn = getattr(self, name)
        if fn is None:
            raise ConfigError(
                f"stage {name!r} is not available: {self.missing.get(name, 'not configured')}"
            )
        return fn


# ---- default implementations over the joules library ------------------------------------


def load(spec: str, dtype: str) -> tuple[Any, Any, Any]:
    import torch

    import joules.compress  # registers the loader of compressed directories
    import joules.deploy  # noqa: F401  (registers the llamacpp(ftype=...) peer step)
    from joules.models import load_model

    return tuple(load_model(spec, dtype=getattr(torch, dtype)))  # type: ignore[return-value]


def calibration(tokenizer: Any, c: CalibrationSpec) -> tuple[Any, dict[str, Any]]:
    from joules.compress import calibration_tokens

    return calibration_tokens(tokenizer, n=c.n, length=c.length, seed=c.seed)


def compress(
    model: Any, recipe: str, calib: tuple[Any, dict[str, Any]], tokenizer: Any, info: Any,
    progress: Progress | None,
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    from joules.compress import compress as run_compress

    tokens, calib_info = calib
    # Compress a copy: compress() works in place, and the loaded model is shared by every run
    # of this model (and its baseline).
    cm = run_compress(
        copy.deepcopy(model),
        recipe,
        calibration=tokens,
        tokenizer=tokenizer,
        calibration_info=calib_info,
        source=getattr(info, "spec", "") or "",
        prequantized=getattr(info, "prequantized", None),
        progress=(lambda what, done, total: progress(done, total)) if progress else None,
    )
    # What the bench subprocess needs to save it (its manifest), and what a deviation task
    # compares it with (the model it was compressed from, as loaded).
    # (A weak reference: a module assigned to a module's attribute becomes its submodule.)
    cm.model.joules_manifest = cm.manifest
    cm.model.joules_reference = weakref.ref(model)
    return cm.model, cm.manifest.to_dict()


def layer_paths(model: Any) -> dict[str, str]:
    """The kernel path each compressed linear ran in the timed forwards, by name: as the bench
    subprocess reported it when the model was benched in one, else its last forward here."""
    from joules.compress import layer_paths as paths

    benched = getattr(model, "joules_bench_layer_paths", None)
    return dict(benched) if benched is not None else paths(model)


# The sweep's evaluation protocol, passed to every task that has an option of that name.
PROTOCOL_OPTIONS = ("split", "window", "stride", "limit_tokens", "limit")


def task_options(task: str, ev: EvalSpec) -> dict[str, Any]:
    """The options task ``task`` gets from the sweep's protocol ``ev`` (those it accepts)."""
    from joules.evaluate import tasks

    accepted = set(tasks.options(task))
    return {k: getattr(ev, k) for k in PROTOCOL_OPTIONS if k in accepted and hasattr(ev, k)}


def evaluate(
    task: str, model: Any, tokenizer: Any, info: Any, ev: EvalSpec, progress: Progress | None
) -> dict[str, Any]:
    """Run registered task ``task`` (see :mod:`joules.evaluate.tasks`) under the protocol ``ev``.

    Returns ``{"result": ..., plus what pairing with the baseline needs}``: a perplexity's
    per-window NLL sums and tokens (``window_nll``, ``window_tokens``), a multiple-choice task's
    per-item correctness of ``acc_norm`` (``items``, ``item_correct``). A deviation compares a
    compressed model with the model it was compressed from (the baseline with itself).
    """
    from joules.evaluate import tasks

    opts = task_options(task, ev)
    if "reference" in tasks.options(task):
        ref = getattr(model, "joules_reference", None)
        if ref is not None and ref() is not None:
            opts["reference"] = ref()
    r = tasks.run_task(task, model, tokenizer, info, progress=progress, **opts)
    return _eval_dict(r, task, opts)


def _eval_dict(r: Any, task: str, opts: dict[str, Any]) -> dict[str, Any]:
    """A task result as the sweep stores it (see :func:`evaluate`)."""
    from joules.evaluate import tasks
    from joules.evaluate.results import ChoiceResult, PerplexityResult

    if isinstance(r, PerplexityResult):
        d = r.to_dict()
        return {
            "result": d,
            "window_nll": list(d.pop("window_nll_sums")),
            "window_tokens": list(d.pop("window_tokens")),
        }
    if isinstance(r, ChoiceResult):
        data = load_choice(getattr(tasks.get(task, **opts), "data", None) or "hellaswag")
        return {
            "result": r.to_dict(),
            "items": list(r.items),
            "item_correct": [
                int(p == data[i].label) for i, p in zip(r.items, r.predictions_norm, strict=True)
            ],
        }
    return {"result": r.to_dict()}


def evaluate_file(
    task: str,
    path: str,
    tokenizer: Any,
    info: Any,
    ev: EvalSpec,
    progress: Progress | None,
    reference_path: str | None = None,
) -> dict[str, Any]:
    """Run task ``task`` on the exported file ``path`` through ``ev.runtime`` (llamacpp).

    A perplexity task runs :func:`joules.deploy.llamacpp.llamacpp_perplexity` on the windows the
    torch path plans (same tokens, BOS rule, scored positions); a task with a ``runtime`` option
    (deviation: KL divergence from the baseline's file ``reference_path``) gets the runtime and
    the reference. Returns what :func:`evaluate` returns."""
    from joules.data import load_text
    from joules.deploy.llamacpp import llamacpp_perplexity
    from joules.evaluate import tasks

    opts = task_options(task, ev)
    cls = tasks.task_class(task)
    if issubclass(cls, tasks.Wikitext2):
        cfg = tasks.get(task, **opts)
        text = load_text(cfg.data or "wikitext2", split=cfg.split)
        r = llamacpp_perplexity(
            path, tokenizer, text, window=cfg.window, stride=cfg.stride,
            limit_tokens=cfg.limit_tokens, add_bos=cfg.add_bos,
            dataset=cfg.data or "wikitext2", split=cfg.split,
        )  # fmt: skip
        return _eval_dict(r, task, opts)
    if "runtime" not in tasks.options(task):
        raise ConfigError(f"task {task!r} runs on torch models only, not on {ev.runtime}")
    opts["runtime"] = ev.runtime
    if "reference" in tasks.options(task):
        opts["reference"] = reference_path or path  # the baseline is its own reference
    r = tasks.run_task(task, path, tokenizer, info, progress=progress, **opts)
    return _eval_dict(r, task, opts)


def _gguf_facts(path: str) -> dict[str, Any]:
    """Size, sha256, tensor types and bits per weight of a GGUF file (llama.cpp's BPW: file
    bits over the elements of every tensor in it)."""
    from collections import Counter

    from joules.deploy.llamacpp import gguf_tensor_table
    from joules.fingerprint import file_sha256

    size, digest = file_sha256(path)
    table = gguf_tensor_table(path)
    n_elements = sum(int(row[2]) for row in table)
    return {
        "path": str(path),
        "size_bytes": size,
        "sha256": digest,
        "types": dict(Counter(row[1] for row in table)),
        "n_elements": n_elements,
        "bits_per_weight": 8.0 * size / n_elements if n_elements else None,
    }


def export(
    model: Any,
    tokenizer: Any,
    info: Any,
    manifest: dict[str, Any],
    d: DeploySpec,
    path: str,
) -> dict[str, Any]:
    """Write the run's deployable GGUF file at ``path`` and return its facts.

    The baseline is exported from its spec, all float (``d.float_type``): the reference of
    every KL divergence. A compressed model is saved, then exported with its stored block bytes
    (never re-quantized) and a float token embedding and untied output head stored as
    ``d.embedding`` / ``d.output`` (llama.cpp's presets quantize them too). A llama.cpp peer (``llamacpp(ftype=...)``) already is a file:
    copied. The file appears atomically at ``path``."""
    import shutil

    from joules.deploy import export_gguf
    from joules.serialize import atomic_path

    t0 = time.perf_counter()
    exact = True
    peer = manifest.get("gguf_file")
    if peer:
        with atomic_path(path) as tmp:
            shutil.copyfile(peer["path"], tmp)
    else:
        if manifest.get("recipe") == BASELINE:
            source = str(getattr(info, "spec", "") or "")
            if not source:
                raise ConfigError("the baseline's file needs the model's spec: load it by spec")
            res = export_gguf(source, path, float_type=d.float_type)
        else:
            source, _ = _saved_dir(model, tokenizer)
            floats = ("f32", "f16", "bf16")
            # a model compressed for a file size (gguf_mix) chose its embedding's and head's
            # types inside its byte budget: export_gguf takes them from its manifest
            planned = manifest.get("gguf_export") or {}
            emb = None if d.embedding in floats or planned.get("embedding") else d.embedding
            head = None if d.output in floats or planned.get("output") else d.output
            res = export_gguf(source, path, float_type=d.float_type, embedding=emb,
                              output_head=head)  # fmt: skip
        exact = bool(res.exact)
    out = _gguf_facts(path)
    out.update(exact=exact, export_s=time.perf_counter() - t0)
    return out


def bench_config(b: BenchSpec) -> Any:
    from joules.bench import BenchConfig

    return BenchConfig(
        prompt_lens=(b.prompt_len,),
        gen_len=b.gen_len,
        batch_sizes=(b.batch,),
        repeats=b.repeats,
        warmup=b.warmup,
        runtime=b.runtime,
    )


def bench_in_process(
    model: Any, tokenizer: Any, info: Any, b: BenchSpec, progress: Progress | None
) -> dict[str, Any]:
    """Bench ``model`` in this process: its peak RSS includes whatever else this process holds."""
    from joules.bench import run_bench

    out = run_bench(model, tokenizer, info, bench_config(b), progress=progress).to_dict()
    out["isolation"] = {"mode": "in-process"}
    return out


def _model_dtype(model: Any) -> str:
    """The dtype the model was loaded in (its input embedding's), as a torch attribute name."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dt = emb.weight.dtype if emb is not None else next(model.parameters()).dtype
    return str(dt).removeprefix("torch.")


def _saved_dir(model: Any, tokenizer: Any) -> tuple[str, float]:
    """A directory holding compressed ``model`` (saved once per model object; removed with it)."""
    held = getattr(model, "joules_saved_dir", None)
    if held is not None:
        return str(held[1]), 0.0
    from joules.compress import save_compressed

    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="joules-bench-")
    out = os.path.join(tmp.name, "model")
    save_compressed(model, copy.deepcopy(model.joules_manifest), out, tokenizer)
    model.joules_saved_dir = (tmp, out)  # the TemporaryDirectory is removed when model is freed
    return out, time.perf_counter() - t0


def bench(
    model: Any,
    tokenizer: Any,
    info: Any,
    b: BenchSpec,
    progress: Progress | None,
    *,
    probe_if_missing: bool = True,
) -> dict[str, Any]:
    """Bench ``model`` in a fresh Python process that loads only it (see the module doc).

    The baseline is loaded from its spec (``info.spec``) in the dtype it was loaded here; a
    compressed model (one :func:`compress` returned) is saved to a temporary directory and
    loaded from there. The result's ``isolation`` records the child's load time, its resident
    memory once loaded and the save time; the kernel path of each layer in the child's timed
    forwards is kept on ``model`` for :func:`layer_paths`. ``probe_if_missing``: as
    :func:`joules.bench.run_bench` (probe the machine's limits when none are cached).
    """
    save_s = 0.0
    if isinstance(model, str | os.PathLike):  # a file runtime benches the exported file
        source = str(model)
    elif getattr(model, "joules_manifest", None) is not None:
        source, save_s = _saved_dir(model, tokenizer)
    elif getattr(info, "spec", None):
        source = str(info.spec)
    else:
        raise ConfigError("the bench subprocess needs the model's spec: load it with load_model")
    job = {
        "source": source,
        "dtype": "auto" if isinstance(model, str | os.PathLike) else _model_dtype(model),
        "bench": bench_config(b).to_dict(),
        "spec": str(getattr(info, "spec", "") or source),
        "probe_if_missing": probe_if_missing,
    }
    with tempfile.TemporaryDirectory(prefix="joules-bench-io-") as io_dir:
        if isinstance(model, str | os.PathLike) and hasattr(info, "to_dict"):
            # A file runtime needs the tokenizer and the model's shape, not a torch copy of the
            # file: hand the child the ones this process holds (the file's are the same model's)
            # instead of converting the GGUF to torch there again (~20 s a run).
            tokenizer.save_pretrained(os.path.join(io_dir, "tokenizer"))
            job["tokenizer"] = os.path.join(io_dir, "tokenizer")
            job["info"] = to_jsonable(info.to_dict())
        job_path, out_path = os.path.join(io_dir, "job.json"), os.path.join(io_dir, "out.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        _run_child(job_path, out_path, progress)
        with open(out_path) as f:
            out = json.load(f)
    out["isolation"]["save_s"] = save_s
    paths = out.pop("layer_paths", None)
    if not isinstance(model, str | os.PathLike):
        model.joules_bench_layer_paths = paths
    return out


def _run_child(job_path: str, out_path: str, progress: Progress | None) -> None:
    """Run :func:`bench_child` in a fresh interpreter; its progress lines drive ``progress``."""
    import joules

    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(joules.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [
        sys.executable,
        "-c",
        "import sys; from joules.sweep.stages import bench_child; bench_child(*sys.argv[1:])",
        job_path,
        out_path,
    ]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "joules-progress" and progress is not None:
                progress(int(parts[1]), int(parts[2]))
        rc = proc.wait()
        if rc != 0:
            err.seek(0)
            lines = [x for x in err.read().strip().splitlines() if x.strip()]
            last = lines[-1] if lines else f"exit status {rc}"
            raise RuntimeError(f"bench subprocess failed: {last}")


def _release_free_memory() -> None:
    """Give the heap memory that loading freed back to the OS (glibc ``malloc_trim``).

    Loading frees memory it used only in passing (the safetensors read, dtype conversions;
    ``load_compressed`` no longer builds the dense model at all); glibc keeps freed blocks in
    the process, so without this the RSS of a loaded model could include them. The RSS before
    the trim is recorded beside it. A no-op where glibc is absent."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def bench_child(job_path: str, out_path: str) -> None:
    """The bench subprocess: load the job's model alone, bench it, write the result as JSON."""
    import psutil
    import torch

    from joules.bench import BenchConfig, get_runtime, run_bench
    from joules.compress import layer_paths as paths
    from joules.models import load_model

    with open(job_path) as f:
        job = json.load(f)
    t0 = time.perf_counter()
    runtime = get_runtime(job["bench"].get("runtime", "eager"))
    if runtime.takes_torch_model:
        model, tokenizer, info = load_model(job["source"], dtype=getattr(torch, job["dtype"]))
    elif job.get("tokenizer"):  # llamacpp: the file, with the parent's tokenizer and shape
        from transformers import AutoTokenizer

        from joules.models.info import ModelInfo

        model = job["source"]
        tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
        info = ModelInfo.from_dict(job["info"])
    else:  # llamacpp: the file itself (its own loader reads the tokenizer and facts)
        model, tokenizer, info = runtime.load(job["source"])
    load_s = time.perf_counter() - t0
    rss_load_peak = psutil.Process().memory_info().rss
    _release_free_memory()
    rss_loaded = psutil.Process().memory_info().rss
    cfg = BenchConfig.from_dict(job["bench"])

    def progress(done: int, total: int) -> None:
        print(f"joules-progress {done} {total}", flush=True)

    out = run_bench(
        model, tokenizer, info, cfg, progress=progress, probe_if_missing=job["probe_if_missing"]
    ).to_dict()
    out["model"] = job["spec"]
    out["isolation"] = {
        "mode": "subprocess",
        "load_s": load_s,
        "rss_after_load_bytes": rss_loaded,
        "rss_before_trim_bytes": rss_load_peak,
        "note": "benched in a fresh process holding only this model; load_s is its load time",
    }
    out["layer_paths"] = paths(model) if runtime.takes_torch_model else None
    with open(out_path, "w") as f:
        json.dump(to_jsonable(out), f)


def predict(
    model: Any, info: Any, manifest: dict[str, Any], hardware: str, b: BenchSpec | None
) -> dict[str, Any]:
    from joules.predict import ModelShape, Workload
    from joules.predict import predict as run_predict

    shape = ModelShape.from_config(model.config, name=getattr(info, "spec", None))
    workload = Workload(prompt_len=b.prompt_len, gen_len=b.gen_len, batch=b.batch) if b else None
    compressed = manifest if manifest.get("recipe") != BASELINE else None
    return run_predict(shape, hardware, workload, manifest=compressed).to_dict()


def baseline_manifest(model: Any, info: Any) -> dict[str, Any]:
    """The model as loaded: bytes of its parameters and buffers, and where its weights came from."""
    params = list(model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    nbytes += sum(b.numel() * b.element_size() for b in model.buffers())
    n_params = sum(p.numel() for p in params)
    pq = getattr(info, "prequantized", None)
    return {
        "recipe": BASELINE,
        "model_bytes": nbytes,
        "bits_per_weight": 8.0 * sum(p.numel() * p.element_size() for p in params) / n_params,
        "dtype": str(next(iter(params)).dtype).removeprefix("torch."),
        "prequantized": pq,
        "synthetic": getattr(info, "synthetic", None),
        "layers": {},
        "note": f"as loaded; its weights were {pq} in the source file before joules saw them"
        if pq
        else "as loaded",
    }


def default_stages(isolate_bench: bool = True) -> Stages:
    """Stages over the installed joules library; absent modules are listed in ``missing``.

    ``isolate_bench`` False benches in this process (:func:`bench_in_process`): faster, but
    a run's peak RSS then includes the sweep's base model and everything else it holds."""
    import importlib

    missing: dict[str, str] = {}

    def have(stage: str, module: str, *names: str) -> bool:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing[stage] = f"{module} is not installed ({exc})"
            return False
        for n in names:
            if not hasattr(mod, n):
                missing[stage] = f"{module} has no {n}"
                return False
        return True

    has_compress = have("compress", "joules.compress", "compress", "parse_recipe")
    if has_compress and not have("calibration", "joules.compress", "calibration_tokens"):
        has_compress = False
    elif not has_compress:
        missing["calibration"] = missing["compress"]
    return Stages(
        load=load,
        calibration=calibration if has_compress else None,
        compress=compress if has_compress else None,
        evaluate=evaluate,
        bench=(bench if isolate_bench else bench_in_process)
        if have("bench", "joules.bench", "BenchConfig", "run_bench")
        else None,
        predict=predict if have("predict", "joules.predict", "predict") else None,
        baseline_manifest=baseline_manifest,
        layer_paths=layer_paths if has_compress else None,
        export=export if have("export", "joules.deploy", "export_gguf") else None,
        evaluate_file=evaluate_file
        if have("evaluate_file", "joules.deploy.llamacpp", "llamacpp_perplexity")
        else None,
        missing=missing,
    )
