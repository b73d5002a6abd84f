"""Calibration hands every linear its own input in every checkpoint dtype (issue 25, section 4).

Most checkpoints are bf16 and ``joules compress`` keeps the checkpoint dtype. The capture in
``BlockInputs.batches`` once de-duplicated inputs by their address while keeping only their fp32
copy alive: in bf16/fp16 the copy is a new tensor, the source was freed, and a later input of the
same size in the same block (``o_proj``'s, the post-attention norm's) got the same address, so
``gate_proj``/``up_proj`` were handed the q/k/v input and GPTQ, AWQ, SmoothQuant, Wanda/SparseGPT,
act-quant and outliers calibrated on the wrong activations. These tests compare what every step
reads with each linear's *true* input, captured independently by a plain pre-hook that clones it
on the spot, on tiny random llamas in bf16, fp16 and fp32 of several sizes and calibration shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from joules.compress import compress
from joules.compress.context import BlockInputs, CompressContext, dense_weight
from joules.compress.solvers.hessian import Hessian
from joules.compress.steps.gptq import hessians
from joules.errors import UnsupportedModelError
from joules.models import tiny_model

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
HIDDEN = [64, 128, 256]
# (sequences, tokens per sequence, mini-batch size): one shape with equal mini-batches and one
# whose last mini-batch is smaller (a different allocation size in the last batch).
SHAPES = [(4, 32, 2), (5, 48, 3)]


def _model(dtype: torch.dtype, hidden: int, seed: int = 0) -> nn.Module:
    model, _, _ = tiny_model(
        "llama", seed=seed, hidden_size=hidden, intermediate_size=2 * hidden, dtype=dtype
    )
    return model


def _calib(n: int, length: int, seed: int = 1) -> torch.Tensor:
    """Random byte tokens (ids 3..258): no data set needed, every id is a real token."""
    return torch.randint(3, 259, (n, length), generator=torch.Generator().manual_seed(seed))


def _block_targets(ctx: CompressContext) -> dict[int, dict[str, nn.Module]]:
    return ctx.by_block(ctx.resolve_targets(), "unused {name}")


@contextlib.contextmanager
def _true_inputs(mods: dict[str, nn.Module]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Each module's input per call, as ``[tokens, in]`` fp32, cloned the moment it is called
    (independent of ``BlockInputs``). A linear carrying ``act_quant`` sees its quantized input."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in mods}

    def hook(name: str):
        def fn(m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            aq = getattr(m, "act_quant", None)
            if aq is not None:
                x = aq(x)
            got[name].append(x.reshape(-1, x.shape[-1]).float().clone())

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def _wrong_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int) -> list[str]:
    """Every (block, module, mini-batch) whose captured input is not its true input."""
    ctx = CompressContext(model, calibration=calib, batch_size=batch_size)
    targets = _block_targets(ctx)
    wrong: list[str] = []

    def fn(i: int, block: nn.Module, block_name: str, inputs: BlockInputs) -> None:
        mods = targets[i]
        with _true_inputs(mods) as true:
            for k, batch in enumerate(inputs.batches(block, mods)):
                assert set(batch) == set(mods)
                for name, x in batch.items():
                    if not torch.equal(x, true[name][k]):
                        wrong.append(f"{block_name}.{name} (mini-batch {k})")
                # Modules fed the same tensor share one object (consumers share work on it):
                # q/k/v, gate/up; o_proj and down_proj each have their own.
                attn = [batch[f"self_attn.{p}_proj"] for p in "qkv"]
                assert attn[0] is attn[1] is attn[2]
                assert batch["mlp.gate_proj"] is batch["mlp.up_proj"]
                distinct = {id(x) for x in batch.values()}
                if len(distinct) != 4:
                    wrong.append(f"{block_name}: {len(distinct)} distinct inputs, not 4")
        with _true_inputs(mods) as true:
            captured = inputs.capture(block, mods)
            for name, x in captured.items():
                if not torch.equal(x, torch.cat(true[name])):
                    wrong.append(f"{block_name}.{name} (capture)")

    ctx.sequential(fn, step="test")
    return wrong


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_linear_is_handed_its_true_input(dtype, hidden, shape):
    n, length, batch_size = shape
    model = _model(dtype, hidden)
    assert _wrong_inputs(model, _calib(n, length), batch_size) == []


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hessians_equal_those_of_the_true_inputs(dtype, hidden, shape):
    """GPTQ/SparseGPT/mixed's accumulated ``X^T X`` (and token count) per linear are exactly the
    ones of its true inputs, and layers share a Hessian only when they share an input."""
    n, length, batch_size = shape
    model = _model(dtype, hidden)
    ctx = CompressContext(model, calibration=_calib(n, length), batch_size=batch_size)
    targets = _block_targets(ctx)
    wrong: list[str] = []

    def fn(i: int, block: nn.Module, block_name: str, inputs: BlockInputs) -> None:
        mods = targets[i]
        with _true_inputs(mods) as true:
            hs = hessians(inputs, block, mods)
        for name, h in hs.items():
            ref = Hessian(mods[name].in_features)
            for x in true[name]:
                ref.add(x)
            if h.n != ref.n or not torch.equal(h.sum, ref.sum):
                wrong.append(f"{block_name}.{name}")
        groups = {frozenset(n for n in hs if hs[n] is h) for h in hs.values()}
        expected = {
            frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}),
            frozenset({"self_attn.o_proj"}),
            frozenset({"mlp.gate_proj", "mlp.up_proj"}),
            frozenset({"mlp.down_proj"}),
        }
        if groups != expected:
            wrong.append(f"{block_name}: Hessians shared as {sorted(map(sorted, groups))}")

    ctx.sequential(fn, step="test")
    assert wrong == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_act_quant_linears_are_handed_their_own_quantized_input(dtype):
    """With ``act_quant`` attached the capture keys on the quantizer too: still the true input."""
    model = _model(dtype, 128)
    calib = _calib(4, 32)
    compress(model, "act_quant(format=int8, granularity=per-tensor)", calibration=calib)
    assert _wrong_inputs(model, calib, 2) == []


def _gptq_layers(
    model: nn.Module, calib: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GPTQ int4-g32 on ``model``'s block linears: per layer (original weight, dequantized
    weight, ``2/n X^T X`` of its *true* calibration inputs). The true inputs come from plain
    pre-hooks on the original linears: each is called by the calibration pass of its block
    only (GPTQ then replaces it), so they see exactly the inputs its Hessian should hold."""
    ctx = CompressContext(model)
    mods = {n: m for n, m in ctx.resolve_targets().items()}
    weights = {n: dense_weight(m) for n, m in mods.items()}
    with _true_inputs(mods) as true:
        compress(model, "gptq(format=int4-g32, targets=[model.layers.*])", calibration=calib)
    out = {}
    for name, m in mods.items():
        h = Hessian(m.in_features)
        for x in true[name]:
            h.add(x)
        out[name] = (weights[name], dense_weight(model.get_submodule(name)), h.matrix())
    return out


def _output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """Relative layer output error ``||X (Q - W)^T|| / ||X W^T||`` from ``H = 2/n X^T X``."""
    d, w, h = (q - w).double(), w.double(), h.double()
    return float(torch.sqrt(torch.trace(d @ h @ d.T) / torch.trace(w @ h @ w.T)))


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("hidden", [64, 128, 256])
def test_gptq_on_bf16_matches_gptq_on_its_fp32_copy(hidden, seed):
    """Layer by layer, GPTQ on a bf16 model does as well as on the same weights in fp32.

    Both runs start from identical weights (the bf16 ones, exact in fp32) and tokens; each
    layer's error is measured on that run's own true inputs. The runs' inputs differ only by
    bf16 rounding (relative 2^-9 per element) compounded through blocks quantized slightly
    differently; GPTQ's relative output error is a smooth function of the input statistics, so
    with the right Hessians the two errors agree to a few percent (measured: at most 2.4% over
    hidden 64/128/256 and seeds 0-2, torch 2.13 CPU). The bound, 5%, leaves twice that margin and
    is below what a mis-captured input costs: with gate/up handed another layer's input their
    error was 1.07-2.4x the fp32 run's on these models (1.6-2x in the issue).
    """
    fp32 = _model(torch.bfloat16, hidden, seed).float()
    bf16 = _model(torch.bfloat16, hidden, seed)
    calib = _calib(8, 64)
    ref = _gptq_layers(fp32, calib)
    got = _gptq_layers(bf16, calib)
    assert set(got) == set(ref) and len(ref) == 14
    ratios = {}
    for name, (w32, q32, h32) in ref.items():
        w16, q16, h16 = got[name]
        assert torch.equal(w16, w32)
        ratios[name] = _output_error(w16, q16, h16) / _output_error(w32, q32, h32)
    assert all(r < 1.05 for r in ratios.values()), ratios


class _WritesInPlace(nn.Module):
    """A block that rewrites a linear's input in place after the linear read it, then feeds the
    rewritten tensor (same storage, same shape) to a second linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = h * 1.0
        y = self.a(z)
        z.mul_(2.0)
        return self.b(z) + y


def test_an_input_rewritten_in_place_is_not_taken_for_the_same_input():
    """bf16: ``a``'s captured input is a copy taken before the write; ``b`` gets the rewritten
    values as its own input (same address, different version), not ``a``'s."""
    block = _WritesInPlace().to(torch.bfloat16)
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    mods = {"a": block.a, "b": block.b}
    with _true_inputs(mods) as true:
        (batch,) = list(BlockInputs([h], [{}]).batches(block, mods))
    assert batch["a"] is not batch["b"]
    assert torch.equal(batch["a"], true["a"][0]) and torch.equal(batch["b"], true["b"][0])


def test_an_fp32_input_rewritten_in_place_after_capture_fails_loudly():
    """fp32: the captured input is a view of the source (no copy), so a later in-place write
    would change what ``a``'s consumers read: that is an error, never silently wrong values."""
    block = _WritesInPlace()
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedModelError, match="'a' is modified in place"):
        list(BlockInputs([h], [{}]).batches(block, {"a": block.a, "b": block.b}))


class _SharesOnlySometimes(nn.Module):
    """Feeds ``a`` and ``b`` one tensor for a 2-sequence mini-batch, two different ones else."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.a(h) + self.b(h if h.shape[0] == 2 else h * 2.0)


def test_hessians_refuse_a_sharing_that_changes_between_mini_batches():
    """GPTQ shares one Hessian between layers fed one tensor, decided on the first mini-batch; a
    later mini-batch that feeds them different tensors is an error, not a Hessian of either."""
    block = _SharesOnlySometimes()
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(2, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)]
    mods = {"a": block.a, "b": block.b}
    with pytest.raises(UnsupportedModelError, match="'a' and 'b' shared one input"):
        hessians(BlockInputs(hidden, [{}, {}]), block, mods)
    hs = hessians(BlockInputs(hidden[::-1], [{}, {}]), block, mods)  # not shared at first: fine
    assert hs["a"] is not hs["b"]
