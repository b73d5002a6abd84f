"""The sweep spec: a TOML file crossing models × recipes × tasks × workloads × hardware.

    >>> from joules.sweep.spec import parse_spec
    >>> spec = parse_spec('''
    ... models = ["smollm2-135m"]
    ... recipes = ["baseline", "rtn(format=int8-ch)"]
    ... [eval]
    ... tasks = ["wikitext2"]
    ... limit_tokens = 4096
    ... [bench]
    ... prompt_len = [128]
    ... gen_len = 32
    ... [predict]
    ... hardware = ["this-machine", "h100"]
    ... ''', check_recipes=False, check_models=False)
    >>> [(r.recipe, r.bench.prompt_len) for r in spec.runs()]
    [('baseline', 128), ('rtn(format=int8-ch)', 128)]

One run is (model, recipe, bench workload): it compresses the model once, evaluates every task,
benches that workload and predicts it on every listed hardware. ``[bench]`` and ``[predict]`` are
optional; a spec with only ``[eval]`` evaluates only (one run per model × recipe).

Every validation error names the key, its line in the file and the valid values, because
``tomllib`` reports no line numbers for values it parsed fine: :class:`SpecText` finds them.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from joules.errors import ConfigError
from joules.fingerprint import sha

BASELINE = "baseline"  # the recipe that leaves the model as loaded


def known_tasks() -> tuple[str, ...]:
    """Tasks a sweep can run: every task registered in :mod:`joules.evaluate.tasks`.

    wikitext2 gives per-window NLLs and hellaswag per-item correctness, so a compressed
    model's perplexity increase and accuracy drop are decided on the paired difference against
    its baseline."""
    from joules.evaluate import tasks  # lazy: the tasks import torch; a spec is read without

    return tuple(tasks.names())


def known_runtimes(torch_only: bool = False) -> tuple[str, ...]:
    """Runtimes a sweep can bench with: every registered runtime
    (:mod:`joules.bench.runtimes`). One that runs a torch module benches the model the sweep
    compressed; one that runs its own file (llamacpp: ``takes_torch_model`` False) benches the
    file each run exports (see ``[deploy]``). ``torch_only``: the first kind alone."""
    from joules.bench import runtimes  # lazy: the runtimes import torch; a spec is read without

    names = runtimes.runtime_names()
    if not torch_only:
        return tuple(names)
    return tuple(n for n in names if runtimes.get_runtime(n).takes_torch_model)


def file_runtimes() -> tuple[str, ...]:
    """Registered runtimes that run an exported file (llamacpp), not a torch module."""
    from joules.bench import runtimes  # lazy, as above

    torch_rt = set(known_runtimes(torch_only=True))
    return tuple(n for n in runtimes.runtime_names() if n not in torch_rt)


def eval_runtimes() -> tuple[str, ...]:
    """What ``[eval] runtime`` accepts: ``torch`` (the compressed torch model, the default) or
    a runtime that runs the exported file (llamacpp: quality of the very file a user ships)."""
    return ("torch", *file_runtimes())


def task_runs_on_file(task: str) -> bool:
    """Whether registered task ``task`` evaluates an exported file: a perplexity task (the
    sweep runs it through :func:`joules.deploy.llamacpp.llamacpp_perplexity`) or a task with a
    ``runtime`` option (deviation: KL divergence through llama.cpp)."""
    from joules.evaluate import tasks  # lazy, as known_tasks

    return issubclass(tasks.task_class(task), tasks.Wikitext2) or "runtime" in tasks.options(task)


def deploy_problem(recipe: str, float_type: str) -> str | None:
    """Why ``recipe`` has no deployable file (None when it has one); see
    :func:`joules.deploy.mapping.recipe_gguf_problem`."""
    if recipe == BASELINE:
        return None
    from joules.deploy.mapping import recipe_gguf_problem  # lazy: parses with the step registry

    return recipe_gguf_problem(recipe)


class SpecText:
    """Finds the line of a key (and of one value inside it) in the spec's text."""

    _HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")

    def __init__(self, text: str, path: str = "<spec>") -> None:
        self.lines = text.splitlines()
        self.path = path

    def line_of(self, table: str | None, key: str, value: str | None = None) -> int | None:
        """1-based line of ``key =`` inside ``[table]`` (None: top level); with ``value``, the
        first line from there on that contains it quoted."""
        current: str | None = None
        key_re = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for i, line in enumerate(self.lines):
            m = self._HEADER.match(line)
            if m:
                current = m.group(1)
                continue
            if current == table and key_re.match(line):
                if value is None:
                    return i + 1
                for j in range(i, len(self.lines)):
                    if f'"{value}"' in self.lines[j] or f"'{value}'" in self.lines[j]:
                        return j + 1
                    if j > i and self._HEADER.match(self.lines[j]):
                        break
                return i + 1
        if value is None and table is not None:
            for i, line in enumerate(self.lines):
                m = self._HEADER.match(line)
                if m and m.group(1) == table:
                    return i + 1
        return None

    def error(
        self, table: str | None, key: str, problem: str, valid: str, value: str | None = None
    ) -> ConfigError:
        line = self.line_of(table, key, value)
        where = f"{self.path}:{line}" if line else self.path
        name = f"{table}.{key}" if table else key
        return ConfigError(f"{where}: {name}: {problem}; valid: {valid}")


@dataclass(frozen=True)
class EvalSpec:
    """How every task is evaluated (the same protocol for the baseline and each recipe)."""

    tasks: tuple[str, ...] = ("wikitext2",)
    limit_tokens: int | None = 4096
    # 512-token windows: 4,096 tokens make 8 windows, enough for a paired interval across
    # windows (the demo's choice); longer evaluations may raise it.
    window: int = 512
    stride: int | None = None
    split: str = "test"  # evaluate on test; calibration uses valid, never the reverse
    limit: int | None = None  # items of a multiple-choice task (hellaswag), drawn seeded; None: all
    # "torch": the compressed torch model; "llamacpp": the GGUF file the run exports (`[deploy]`)
    runtime: str = "torch"


@dataclass(frozen=True)
class BenchSpec:
    """One bench workload (a run benches exactly one)."""

    prompt_len: int
    gen_len: int
    batch: int = 1
    repeats: int = 3
    warmup: int = 1
    runtime: str = "eager"


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration tokens for recipes that need them: WikiText-2 valid, seeded."""

    n: int = 128
    length: int = 256
    seed: int = 0


@dataclass(frozen=True)
class DeploySpec:
    """How a run's deployable file is written when a runtime runs files (``[deploy]``).

    ``embedding``: the GGUF type of a float token embedding (with llama.cpp's per-tensor
    fallback: a 576-wide SmolLM2 row falls from Q6_K to Q8_0), as ``llama-quantize``'s presets
    store it for a tied model; ``float_type``: other float tensors (the baseline's file is all
    ``float_type``: the reference every KL divergence is taken against)."""

    embedding: str = "gguf-q6_k"
    output: str = "gguf-q6_k"  # an untied float output head (llama-quantize: Q6_K)
    float_type: str = "f32"


@dataclass(frozen=True)
class KeyEnv:
    """What a run's key holds beside its config (see :mod:`joules.fingerprint`).

    ``versions``: library versions with ``joules_code``, the code fingerprint; ``compute``: the
    compute identity (CPU flags, forced paths); ``models``: model spec -> content identity;
    ``recipes``: recipe string -> every step with every field (defaults expanded). A spec or
    recipe missing from the maps keys by its text alone (fakes in tests; the real stages
    resolve both before a run).
    """

    versions: Mapping[str, str]
    compute: Mapping[str, Any] = field(default_factory=dict)
    models: Mapping[str, Any] = field(default_factory=dict)
    recipes: Mapping[str, Any] = field(default_factory=dict)

    def model(self, spec: str) -> Any:
        return self.models.get(spec, {"unresolved": spec})

    def recipe(self, text: str) -> Any:
        if text == BASELINE:
            return []
        return self.recipes.get(text, text)


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides one run's results (its key hashes this with a :class:`KeyEnv`)."""

    model: str
    recipe: str
    eval: EvalSpec
    bench: BenchSpec | None
    hardware: tuple[str, ...]
    calibration: CalibrationSpec
    dtype: str = "float32"
    deploy: DeploySpec | None = None  # set when a runtime runs the exported file

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["deploy"] is None:
            del d["deploy"]  # runs without a file keep the keys they had
        return d

    @property
    def needs_file(self) -> bool:
        """Whether this run exports its deployable file (a runtime runs it)."""
        return self.deploy is not None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        ev = dict(d["eval"])
        ev["tasks"] = tuple(ev["tasks"])
        return cls(
            model=d["model"],
            recipe=d["recipe"],
            eval=EvalSpec(**ev),
            bench=BenchSpec(**d["bench"]) if d.get("bench") else None,
            hardware=tuple(d.get("hardware", ())),
            calibration=CalibrationSpec(**d.get("calibration", {})),
            dtype=d.get("dtype", "float32"),
            deploy=DeploySpec(**d["deploy"]) if d.get("deploy") else None,
        )

    def config_id(self) -> str:
        """Hash of the configuration alone: two keys of one config_id are the same run under
        other code, libraries, machine or model content (one of them is stale)."""
        return sha(self.to_dict(), 20)

    def key_parts(self, env: KeyEnv | Mapping[str, str]) -> dict[str, Any]:
        """The components the key hashes, stored beside it so a later sweep can say which one
        changed: config, recipe with every default expanded, model content, library versions
        (code fingerprint included), compute identity."""
        if not isinstance(env, KeyEnv):
            env = KeyEnv(versions=env)
        return {
            "config": self.to_dict(),
            "recipe": env.recipe(self.recipe),
            "model": env.model(self.model),
            "versions": dict(env.versions),
            "compute": dict(env.compute),
        }

    def key(self, env: KeyEnv | Mapping[str, str]) -> str:
        """Hash of :meth:`key_parts` (hex, 20 characters); a bare mapping is the versions."""
        return sha(self.key_parts(env), 20)

    @property
    def label(self) -> str:
        w = (
            f" · p{self.bench.prompt_len}/g{self.bench.gen_len}/b{self.bench.batch}"
            if self.bench
            else ""
        )
        return f"{self.model} · {self.recipe}{w}"


@dataclass(frozen=True)
class SweepSpec:
    models: tuple[str, ...]
    recipes: tuple[str, ...]
    eval: EvalSpec
    bench: tuple[BenchSpec, ...] = ()
    hardware: tuple[str, ...] = ()
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    dtype: str = "float32"
    ray: dict[str, Any] = field(default_factory=dict)
    deploy: DeploySpec | None = None

    def runs(self) -> list[RunConfig]:
        """The cross product, grouped so runs sharing a compressed model are adjacent."""
        out = []
        for model in self.models:
            for recipe in self.recipes:
                for bench in self.bench or (None,):
                    out.append(
                        RunConfig(
                            model,
                            recipe,
                            self.eval,
                            bench,
                            self.hardware,
                            self.calibration,
                            self.dtype,
                            self.deploy,
                        )
                    )
        return out


_TOP = {"models", "recipes", "target_size", "dtype", "eval", "bench", "predict", "calibration",
        "ray", "deploy"}  # fmt: skip
_EVAL = {"tasks", "limit_tokens", "window", "stride", "split", "limit", "runtime"}
_DEPLOY = {"embedding", "output", "float_type"}
_FLOAT_TYPES = ("f32", "f16", "bf16")
_BENCH = {"prompt_len", "gen_len", "batch", "repeats", "warmup", "runtime"}
_PREDICT = {"hardware"}
_CALIB = {"n", "length", "seed"}
_RAY = {"num_cpus", "num_gpus"}
_DTYPES = ("float32", "bfloat16")


def _known(tbl: dict[str, Any], allowed: set[str], table: str | None, st: SpecText) -> None:
    for k in tbl:
        if k not in allowed:
            raise st.error(table, k, "unknown key", ", ".join(sorted(allowed)))


def _str_list(v: Any, table: str | None, key: str, st: SpecText, valid: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise st.error(table, key, f"must be a non-empty list of strings, got {v!r}", valid)
    if len(set(v)) != len(v):
        dup = next(x for x in v if v.count(x) > 1)
        raise st.error(table, key, f"{dup!r} is listed twice", valid, value=dup)
    return tuple(v)


def _int(
    v: Any, table: str, key: str, st: SpecText, lo: int = 1, allow_none: bool = False
) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise st.error(table, key, f"must be an integer ≥ {lo}, got {v!r}", f"integers ≥ {lo}")
    return v


def _int_list(v: Any, table: str, key: str, st: SpecText) -> list[int]:
    vals = v if isinstance(v, list) else [v]
    if not vals:
        raise st.error(table, key, "is empty", "a positive integer or a list of them")
    return [_int(x, table, key, st) for x in vals]  # type: ignore[misc]


def _canonical_recipe(text: str) -> str:
    """The recipe's canonical string (so whitespace or argument order never changes a key)."""
    if text == BASELINE:
        return BASELINE
    import joules.deploy  # noqa: F401  (registers the llamacpp(ftype=...) peer step)
    from joules.compress import parse_recipe

    return parse_recipe(text).to_string()


def known_hardware() -> tuple[str, ...]:
    """Hardware names the predictor knows (this-machine included)."""
    from joules.predict import hardware_names  # lazy: the predictor's catalog loads on demand

    return tuple(hardware_names())


def parse_spec(
    text: str,
    path: str = "<spec>",
    *,
    check_recipes: bool = True,
    check_models: bool = True,
    recipe_parser: Callable[[str], str] | None = None,
    hardware: Sequence[str] | None = None,
) -> SweepSpec:
    """Parse and validate a spec's text; every error names the key, its line and valid values.

    ``check_recipes`` parses each recipe with :func:`joules.compress.parse_recipe` (or
    ``recipe_parser``), storing its canonical string; ``check_models`` resolves each model spec.
    """
    st = SpecText(text, path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _known(raw, _TOP, None, st)
    for key in ("models", "recipes"):
        if key not in raw:
            raise ConfigError(f"{path}: missing top-level key {key!r}; e.g. {key} = [...]")
    models = _str_list(
        raw["models"], None, "models", st, "model specs (smollm2-135m, a dir, a .gguf)"
    )
    if check_models:
        from joules.models import resolve

        for m in models:
            try:
                resolve(m)
            except Exception as exc:
                raise st.error(
                    None, "models", str(exc), "smollm2-135m, an HF dir or a .gguf", m
                ) from None
    recipes_raw = _str_list(raw["recipes"], None, "recipes", st, "baseline or a recipe string")
    recipes = []
    parse = recipe_parser or (_canonical_recipe if check_recipes else None)
    for r in recipes_raw:
        if parse is None or r == BASELINE:
            recipes.append(r.strip())
            continue
        try:
            recipes.append(parse(r))
        except ConfigError as exc:
            raise st.error(
                None, "recipes", f"{r!r}: {exc}", "baseline or e.g. rtn(format=int8-ch)", r
            ) from None
    if "target_size" in raw:
        recipes += _target_size_recipes(raw["target_size"], models, check_models, st)
    if len(set(recipes)) != len(recipes):
        raise st.error(None, "recipes", "two recipes are the same once parsed", "distinct recipes")

    dtype = raw.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise st.error(None, "dtype", f"unknown dtype {dtype!r}", ", ".join(_DTYPES))

    ev_raw = raw.get("eval")
    if not isinstance(ev_raw, dict):
        raise ConfigError(f'{path}: missing [eval] table; e.g. [eval] tasks = ["wikitext2"]')
    _known(ev_raw, _EVAL, "eval", st)
    known = known_tasks()
    tasks = _str_list(ev_raw.get("tasks", ["wikitext2"]), "eval", "tasks", st, ", ".join(known))
    for t in tasks:
        if t not in known:
            raise st.error("eval", "tasks", f"unknown task {t!r}", ", ".join(known), t)
    split = ev_raw.get("split", "test")
    if split != "test":
        raise st.error(
            "eval", "split", f"{split!r}: evaluate on test (valid is for calibration)", "test"
        )
    window = _int(ev_raw.get("window", 512), "eval", "window", st, lo=2)
    stride = _int(ev_raw.get("stride"), "eval", "stride", st, allow_none=True)
    if stride is not None and stride > window:  # type: ignore[operator]
        raise st.error("eval", "stride", f"{stride} exceeds the window {window}", f"1..{window}")
    eval_rt = ev_raw.get("runtime", "torch")
    if eval_rt != "torch":
        valid_ert = eval_runtimes()
        if eval_rt not in valid_ert:
            raise st.error(
                "eval", "runtime", f"unknown runtime {eval_rt!r}", ", ".join(valid_ert), eval_rt
            )
        for t in tasks:
            if not task_runs_on_file(t):
                raise st.error(
                    "eval", "tasks", f"task {t!r} runs on torch models only, not {eval_rt}",
                    ", ".join(x for x in known if task_runs_on_file(x)), t,
                )  # fmt: skip
    eval_spec = EvalSpec(
        runtime=eval_rt,
        tasks=tasks,
        limit_tokens=_int(ev_raw.get("limit_tokens", 4096), "eval", "limit_tokens", st, lo=2),
        window=window,  # type: ignore[arg-type]
        stride=stride,
        split=split,
        limit=_int(ev_raw.get("limit"), "eval", "limit", st, allow_none=True),
    )

    benches: list[BenchSpec] = []
    if "bench" in raw:
        b = raw["bench"]
        _known(b, _BENCH, "bench", st)
        for k in ("prompt_len", "gen_len"):
            if k not in b:
                raise st.error("bench", k, "missing", "a positive integer (or a list of them)")
        runtime = b.get("runtime", "eager")
        valid_rt = known_runtimes()
        if runtime not in valid_rt:
            raise st.error(
                "bench", "runtime", f"unknown runtime {runtime!r}", ", ".join(valid_rt), runtime
            )
        for p in _int_list(b["prompt_len"], "bench", "prompt_len", st):
            for g in _int_list(b["gen_len"], "bench", "gen_len", st):
                for bs in _int_list(b.get("batch", 1), "bench", "batch", st):
                    benches.append(
                        BenchSpec(
                            prompt_len=p,
                            gen_len=g,
                            batch=bs,
                            repeats=_int(b.get("repeats", 3), "bench", "repeats", st),  # type: ignore[arg-type]
                            warmup=_int(b.get("warmup", 1), "bench", "warmup", st, lo=0),  # type: ignore[arg-type]
                            runtime=runtime,
                        )
                    )

    hw: tuple[str, ...] = ()
    if "predict" in raw:
        p = raw["predict"]
        _known(p, _PREDICT, "predict", st)
        valid_hw = tuple(hardware) if hardware is not None else known_hardware()
        hw = _str_list(p.get("hardware", []), "predict", "hardware", st, ", ".join(valid_hw))
        for h in hw:
            if h not in valid_hw:
                raise st.error(
                    "predict", "hardware", f"unknown hardware {h!r}", ", ".join(valid_hw), h
                )

    c = raw.get("calibration", {})
    _known(c, _CALIB, "calibration", st)
    calib = CalibrationSpec(
        n=_int(c.get("n", 128), "calibration", "n", st),  # type: ignore[arg-type]
        length=_int(c.get("length", 256), "calibration", "length", st, lo=2),  # type: ignore[arg-type]
        seed=_int(c.get("seed", 0), "calibration", "seed", st, lo=0),  # type: ignore[arg-type]
    )
    deploy = _deploy_spec(raw, eval_spec, benches, recipes, st)
    ray = raw.get("ray", {})
    _known(ray, _RAY, "ray", st)
    for k, v in ray.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise st.error("ray", k, f"must be a non-negative number, got {v!r}", "e.g. 1 or 0.5")
    return SweepSpec(
        models=models,
        recipes=tuple(recipes),
        eval=eval_spec,
        bench=tuple(benches),
        hardware=hw,
        calibration=calib,
        dtype=dtype,
        ray=dict(ray),
        deploy=deploy,
    )


def _target_size_recipes(
    raw: Any, models: Sequence[str], check_models: bool, st: SpecText
) -> list[str]:
    """``target_size = ["80MB", ...]``: one ``gguf_mix(bytes=N)`` recipe per whole-file size,
    N the budget :func:`joules.deploy.size.size_plan` leaves for the embedding and the linears of
    the spec's model (measured on its F32 export: one model per spec)."""
    from joules.deploy.size import parse_size, size_plan  # lazy: the deploy layer, gguf

    sizes = _str_list(raw, None, "target_size", st, 'whole GGUF file sizes, e.g. ["80MB"]')
    if len(models) != 1 or not check_models:
        raise st.error(
            None, "target_size", "the byte budget of a file size depends on the model",
            "one model per spec with target_size (split the spec per model)",
        )  # fmt: skip
    out = []
    for text in sizes:
        try:
            plan = size_plan(models[0], parse_size(text))
        except ConfigError as exc:
            raise st.error(None, "target_size", str(exc), "e.g. 80MB or 86.5MiB", text) from None
        out.append(f"gguf_mix(bytes={plan.budget_bytes})")
    return out


def _deploy_spec(
    raw: dict[str, Any],
    ev: EvalSpec,
    benches: Sequence[BenchSpec],
    recipes: Sequence[str],
    st: SpecText,
) -> DeploySpec | None:
    """``[deploy]``, required in effect when a runtime runs files: every recipe must then map to
    a deployable file, else the spec is refused here, before any run, with the reason."""
    d = raw.get("deploy", {})
    if not isinstance(d, dict):
        raise st.error(None, "deploy", "must be a table", "[deploy] embedding = ...")
    _known(d, _DEPLOY, "deploy", st)
    file_rt = set(file_runtimes()) if (ev.runtime != "torch" or benches) else set()
    uses = [ev.runtime] if ev.runtime in file_rt else []
    uses += sorted({b.runtime for b in benches if b.runtime in file_rt})
    if not uses:
        if d:
            raise st.error(
                "deploy", next(iter(d)), "no runtime runs an exported file",
                'set [eval] runtime or [bench] runtime to "llamacpp"', None,
            )  # fmt: skip
        return None
    float_type = d.get("float_type", "f32")
    if float_type not in _FLOAT_TYPES:
        raise st.error(
            "deploy", "float_type", f"unknown float type {float_type!r}", ", ".join(_FLOAT_TYPES)
        )
    from joules.deploy.mapping import embedding_problem  # lazy: the format registry

    chosen = {}
    for k in ("embedding", "output"):
        chosen[k] = d.get(k, getattr(DeploySpec, k))
        problem = embedding_problem(chosen[k])
        if problem:
            raise st.error("deploy", k, problem, "a gguf-* format, e.g. gguf-q6_k, or f32/f16")
    for r in recipes:
        why = deploy_problem(r, float_type)
        if why:
            raise st.error(
                None, "recipes", f"{r!r} has no deployable file for {'/'.join(uses)}: {why}",
                "recipes whose weights map to GGUF types (see joules.deploy.mapping)", r,
            )  # fmt: skip
    return DeploySpec(embedding=chosen["embedding"], output=chosen["output"], float_type=float_type)


def load_spec(path: str | Path, **kwargs: Any) -> SweepSpec:
    """Read and validate a spec file (see :func:`parse_spec`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"no sweep spec at {str(p)!r}: pass a TOML file (see `joules sweep --help`)"
        )
    return parse_spec(p.read_text(), str(p), **kwargs)


def iter_keys(
    runs: Sequence[RunConfig], env: KeyEnv | Mapping[str, str]
) -> Iterator[tuple[str, RunConfig]]:
    for r in runs:
        yield r.key(env), r
