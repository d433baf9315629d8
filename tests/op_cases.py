"""One parametrisation of the curvature ops' cases, shared by every backend's tests.

Each backend test module imports :data:`SYRK_CASES`, :data:`ENERGY_CASES`,
:data:`PROJECTED_CASES` and :data:`GRADIENT_CASES` and checks its backend against the float64 reference with
:func:`assert_close_to_reference`; and it runs :data:`BAD_CALLS` (arguments every backend must
refuse with the same error, before any work) through :func:`assert_refused` and
:data:`GRAD_CALLS` (inputs that require grad) through :func:`assert_no_graph`. None of them
re-declares a matrix.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

D_VALUES = (1, 7, 64, 129, 300)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("dense", "packed")
TOKENS = (0, 1, 37)
LEADING = ("flat", "batched", "strided")  # (T, d), (B, T, d), and a non-contiguous view
MASKS = ("none", "all_false", "random")


@dataclass(frozen=True)
class OpCase:
    d: int
    dtype: torch.dtype
    layout: str
    tokens: int
    leading: str
    mask: str
    k: int = 0  # number of directions for fisher_energy / projected ops

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"d{self.d}-{dt}-{self.layout}-T{self.tokens}-{self.leading}-mask_{self.mask}"

    def make_x(self, device="cpu", seed=0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inputs ``x`` with the case's leading shape and dtype, and its mask (or None)."""
        g = torch.Generator().manual_seed(seed * 7919 + self.d * 31 + self.tokens)
        T, d = self.tokens, self.d
        if self.leading == "flat":
            x = torch.randn(T, d, generator=g).to(self.dtype).to(device)
        elif self.leading == "batched":
            # split T tokens into a (B, T', d) block, padding with extra rows the mask may drop
            B = 2 if T > 1 else 1
            Tp = -(-T // B)
            x = torch.randn(B, Tp, d, generator=g).to(self.dtype).to(device)
        else:  # strided: a transposed (d, 2T) buffer seen as (T, d) with a row step of 2
            x = torch.randn(d, 2 * T, generator=g).to(self.dtype).to(device).mT[::2]
        token_shape = x.shape[:-1]
        if self.mask == "none":
            mask = None
        elif self.mask == "all_false":
            mask = torch.zeros(token_shape, dtype=torch.bool, device=device)
        else:
            mask = (torch.rand(token_shape, generator=g) > 0.4).to(device)
        if mask is not None:
            # masked-out rows (padding) may hold anything: a backend must never read them.
            # In place, so the strided case keeps its strides.
            x.masked_fill_(~mask.unsqueeze(-1), float("nan"))
        return x, mask

    def make_q(self, device="cpu", seed=0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 17 * self.d)
        q, _ = torch.linalg.qr(torch.randn(self.d, max(self.d, self.k), generator=g, dtype=torch.float64))
        return q[:, : self.k].float().to(device)

    def make_sym(self, device="cpu", seed=0) -> torch.Tensor:
        """A float32 SPD ``(d, d)`` matrix, dense or packed per the case."""
        g = torch.Generator().manual_seed(seed + 101 * self.d)
        a = torch.randn(self.d, self.d + 3, generator=g, dtype=torch.float64)
        M = (a @ a.mT / self.d).float().to(device)
        if self.layout == "packed":
            from fisherlora.ops import pack_triu

            return pack_triu(M)
        return M


def _cover(dims_full, dims_cycled):
    """Full product over ``dims_full``; the ``dims_cycled`` values rotate so each is covered."""
    cycled = list(itertools.product(*dims_cycled))
    out = []
    for n, full in enumerate(itertools.product(*dims_full)):
        out.append(full + cycled[n % len(cycled)])
    return out


def _cases(with_k: bool) -> list:
    cases = []
    for d, dtype, layout, tokens, leading, mask in _cover((D_VALUES, DTYPES, LAYOUTS), (TOKENS, LEADING, MASKS)):
        k = max(1, d // 2 + 1) if with_k else 0
        c = OpCase(d, dtype, layout, tokens, leading, mask, k)
        cases.append(pytest.param(c, id=c.id))
    return cases


SYRK_CASES = _cases(with_k=False)
ENERGY_CASES = [p for p in _cases(with_k=True) if p.values[0].mask == "none"] + [
    p for p in _cases(with_k=True) if p.values[0].d in (64, 129) and p.values[0].mask != "none"
]
PROJECTED_CASES = [p for p in _cases(with_k=True) if p.values[0].layout == "dense"]


# --- the weight-gradient op: g (..., d_out) and a (..., d_in) over the same tokens -------------

GRADIENT_DIMS = ((1, 1), (7, 64), (129, 3), (64, 129), (300, 37))  # (d_out, d_in)
TRANSPOSE = (False, True)


@dataclass(frozen=True)
class GradCase:
    d_out: int
    d_in: int
    dtype: torch.dtype  # of g
    transpose: bool
    tokens: int
    leading: str
    mask: str
    a_dtype: torch.dtype | None = None  # of a; None: the same as g's

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        if self.a_dtype is not None:
            dt += "-a_" + str(self.a_dtype).removeprefix("torch.")
        t = "-T" if self.transpose else ""
        return f"o{self.d_out}-i{self.d_in}-{dt}{t}-T{self.tokens}-{self.leading}-mask_{self.mask}"

    def acc_shape(self) -> tuple[int, int]:
        return (self.d_in, self.d_out) if self.transpose else (self.d_out, self.d_in)

    def make_ga(self, device="cpu", seed=0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``g``, ``a`` with the case's leading shape, dtypes and strides, and the mask (or None);
        masked-out rows of both hold NaN."""
        g = OpCase(self.d_out, self.dtype, "dense", self.tokens, self.leading, "none").make_x(device, seed)[0]
        a_case = OpCase(self.d_in, self.a_dtype or self.dtype, "dense", self.tokens, self.leading, "none")
        a = a_case.make_x(device, seed + 1)[0]
        if self.leading == "batched" and a.shape[:-1] != g.shape[:-1]:
            raise AssertionError("make_x's batched split depends on tokens only")
        token_shape = g.shape[:-1]
        gen = torch.Generator().manual_seed(seed * 131 + self.d_out * 7 + self.d_in + self.tokens)
        if self.mask == "none":
            mask = None
        elif self.mask == "all_false":
            mask = torch.zeros(token_shape, dtype=torch.bool, device=device)
        else:
            mask = (torch.rand(token_shape, generator=gen) > 0.4).to(device)
        if mask is not None:  # masked-out rows may hold anything: never read (in place: strides kept)
            g.masked_fill_(~mask.unsqueeze(-1), float("nan"))
            a.masked_fill_(~mask.unsqueeze(-1), float("inf"))
        return g, a, mask


def _gradient_cases() -> list:
    cases = []
    for (d_out, d_in), dtype, transpose, tokens, leading, mask in _cover(
            (GRADIENT_DIMS, DTYPES, TRANSPOSE), (TOKENS, LEADING, MASKS)):
        c = GradCase(d_out, d_in, dtype, transpose, tokens, leading, mask)
        cases.append(pytest.param(c, id=c.id))
    # g and a in different dtypes (autocast: a layer's input in fp32, its output gradient in bf16)
    for c in (GradCase(64, 129, torch.bfloat16, False, 37, "batched", "random", torch.float32),
              GradCase(129, 64, torch.float32, True, 37, "strided", "random", torch.float16),
              GradCase(37, 300, torch.float16, False, 37, "flat", "none", torch.bfloat16)):
        cases.append(pytest.param(c, id=c.id))
    return cases


GRADIENT_CASES = _gradient_cases()


def assert_close_to_reference(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor,
                              name: str = "", factor: float = 2.0, rel_floor: float = 1e-6) -> None:
    """Check a backend's result against the float64 reference, with a measured tolerance.

    A low-precision backend may be at most ``factor`` times as far from the float64 reference as
    PyTorch's own result at the same precision (``torch_out``), plus a floor of ``rel_floor``
    times the reference's scale. The message names the mismatch count, the worst index and any
    NaN/inf.
    """
    out64 = out.detach().to(torch.float64).cpu()
    ref64 = ref64.detach().to(torch.float64).cpu()
    torch_err = (torch_out.detach().to(torch.float64).cpu() - ref64).abs().max().item() if ref64.numel() else 0.0
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    tol = factor * torch_err + rel_floor * max(scale, 1.0)
    assert out64.shape == ref64.shape, f"{name}: shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    bad_finite = ~torch.isfinite(out64)
    assert not bad_finite.any(), (
        f"{name}: {int(bad_finite.sum())} non-finite values, first at {bad_finite.nonzero()[0].tolist()}")
    err = (out64 - ref64).abs()
    if err.numel() and err.max().item() > tol:
        n_bad = int((err > tol).sum())
        worst = err.flatten().argmax().item()
        idx = torch.unravel_index(torch.tensor(worst), err.shape)
        raise AssertionError(
            f"{name}: {n_bad}/{err.numel()} elements beyond tol {tol:.3e} (torch's own error {torch_err:.3e}); "
            f"worst {err.max().item():.3e} at {tuple(int(i) for i in idx)}: got {out64.flatten()[worst].item():.6e}, "
            f"reference {ref64.flatten()[worst].item():.6e}"
        )


# --- arguments every backend must refuse, and inputs that require grad ------------------------

@dataclass(frozen=True)
class OpCall:
    """One call of a public op of :mod:`fisherlora.ops`: ``args(device)`` builds its positional
    arguments; ``error``/``match`` is what every backend must raise (``None``: it must succeed)."""

    name: str
    op: str
    args: Callable[[str], tuple]
    error: type[Exception] | None = None
    match: str = ""
    kwargs: tuple = ()  # keyword arguments as (name, value) pairs, e.g. (("transpose", True),)


def _x(*shape, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(sum(shape) + 3)
    return torch.randn(shape, generator=g).to(device).requires_grad_(requires_grad)


def _mask(*shape, device="cpu"):
    g = torch.Generator().manual_seed(11)
    return (torch.rand(shape, generator=g) > 0.4).to(device)


def _sym(d, device="cpu"):
    a = _x(d, d + 2)
    return (a @ a.mT).to(device)


def _in_graph(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a non-leaf tensor that requires grad (it has a ``grad_fn``)."""
    return torch.zeros_like(t, requires_grad=True) + t


_SHAPE_MSG = "does not match the token dims"
_BAD = [
    # a sparse (or any non-strided) tensor: one clear error, whatever the backend
    OpCall("syrk-sparse-x", "syrk_accumulate_",
           lambda dev: (torch.zeros(4, 4, device=dev), _x(6, 4, device=dev).to_sparse()),
           TypeError, r"x must be a dense tensor, got layout torch.sparse_coo"),
    OpCall("energy-sparse-M", "fisher_energy", lambda dev: (_sym(4, dev).to_sparse(), _x(4, 3, device=dev)),
           TypeError, r"M must be a dense tensor"),
    OpCall("projected-sparse-Q", "projected_sq_accumulate_",
           lambda dev: (torch.zeros(3, device=dev), _x(5, 4, device=dev), _x(4, 3, device=dev).to_sparse()),
           TypeError, r"Q must be a dense tensor"),
    # a mask with the right number of elements but not the shape x.shape[:-1]: never reshaped
    OpCall("syrk-mask-transposed", "syrk_accumulate_",
           lambda dev: (torch.zeros(4, 4, device=dev), _x(2, 3, 4, device=dev), _mask(3, 2, device=dev)),
           ValueError, r"mask of shape \(3, 2\) " + _SHAPE_MSG + r" \(2, 3\)"),
    OpCall("syrk-mask-flat", "syrk_accumulate_",
           lambda dev: (torch.zeros(4, 4, device=dev), _x(2, 3, 4, device=dev), _mask(6, device=dev)),
           ValueError, r"mask of shape \(6,\) " + _SHAPE_MSG),
    OpCall("syrk-mask-unflattened", "syrk_accumulate_",
           lambda dev: (torch.zeros(10, device=dev), _x(6, 4, device=dev), _mask(2, 3, device=dev)),
           ValueError, r"mask of shape \(2, 3\) " + _SHAPE_MSG + r" \(6,\)"),
    OpCall("syrk-mask-extra-dim", "syrk_accumulate_",
           lambda dev: (torch.zeros(4, 4, device=dev), _x(2, 3, 4, device=dev), _mask(2, 3, 1, device=dev)),
           ValueError, _SHAPE_MSG),
    OpCall("projected-mask-transposed", "projected_sq_accumulate_",
           lambda dev: (torch.zeros(2, device=dev), _x(2, 3, 4, device=dev), _x(4, 2, device=dev),
                        _mask(3, 2, device=dev)),
           ValueError, r"mask of shape \(3, 2\) " + _SHAPE_MSG),
    # d = 0 or k = 0: one error, whatever the op and the backend
    OpCall("syrk-d0-dense", "syrk_accumulate_", lambda dev: (torch.zeros(0, 0, device=dev), _x(3, 0, device=dev)),
           ValueError, r"d must be >= 1, got d = 0 \(x of shape \(3, 0\)\)"),
    OpCall("syrk-d0-packed", "syrk_accumulate_", lambda dev: (torch.zeros(0, device=dev), _x(3, 0, device=dev)),
           ValueError, "d must be >= 1"),
    OpCall("syrk-d0-no-tokens", "syrk_accumulate_", lambda dev: (torch.zeros(0, 0, device=dev), _x(0, 0, device=dev)),
           ValueError, "d must be >= 1"),
    OpCall("energy-d0-dense", "fisher_energy", lambda dev: (torch.zeros(0, 0, device=dev), _x(0, 2, device=dev)),
           ValueError, r"d must be >= 1, got d = 0 \(Q of shape \(0, 2\)\)"),
    OpCall("energy-d0-packed", "fisher_energy", lambda dev: (torch.zeros(0, device=dev), _x(0, 2, device=dev)),
           ValueError, "d must be >= 1"),
    OpCall("energy-k0", "fisher_energy", lambda dev: (_sym(4, dev), _x(4, 0, device=dev)),
           ValueError, r"k must be >= 1, got k = 0 \(Q of shape \(4, 0\)\)"),
    OpCall("projected-d0", "projected_sq_accumulate_",
           lambda dev: (torch.zeros(2, device=dev), _x(3, 0, device=dev), _x(0, 2, device=dev)),
           ValueError, "d must be >= 1"),
    OpCall("projected-k0", "projected_sq_accumulate_",
           lambda dev: (torch.zeros(0, device=dev), _x(3, 4, device=dev), _x(4, 0, device=dev)),
           ValueError, r"k must be >= 1, got k = 0 \(Q of shape \(4, 0\)\)"),
    # an accumulator that requires grad: written in place outside autograd, so refused
    OpCall("syrk-acc-requires-grad", "syrk_accumulate_",
           lambda dev: (torch.zeros(4, 4, device=dev, requires_grad=True), _x(3, 4, device=dev)),
           ValueError, "acc requires grad"),
    OpCall("syrk-packed-acc-requires-grad", "syrk_accumulate_",
           lambda dev: (torch.zeros(10, device=dev, requires_grad=True), _x(3, 4, device=dev)),
           ValueError, "acc requires grad"),
    OpCall("syrk-acc-in-a-graph", "syrk_accumulate_",
           lambda dev: (_in_graph(torch.zeros(4, 4, device=dev)), _x(3, 4, device=dev)),
           ValueError, "acc requires grad"),
    OpCall("projected-acc-requires-grad", "projected_sq_accumulate_",
           lambda dev: (torch.zeros(2, device=dev, requires_grad=True), _x(3, 4, device=dev), _x(4, 2, device=dev)),
           ValueError, "acc requires grad"),
    # the weight-gradient op: g (..., d_out), a (..., d_in), acc (d_out, d_in) or transposed
    OpCall("gradient-token-dims-differ", "gradient_accumulate_",
           lambda dev: (torch.zeros(4, 5, device=dev), _x(2, 3, 4, device=dev), _x(3, 2, 5, device=dev)),
           ValueError, r"the token dims of g \(2, 3\) and a \(3, 2\) differ"),
    OpCall("gradient-acc-not-d_out-by-d_in", "gradient_accumulate_",
           lambda dev: (torch.zeros(5, 4, device=dev), _x(3, 4, device=dev), _x(3, 5, device=dev)),
           ValueError, r"acc must be \(d_out, d_in\) = \(4, 5\) for g with d_out=4 and a with d_in=5, got \(5, 4\)"),
    OpCall("gradient-acc-not-transposed", "gradient_accumulate_",
           lambda dev: (torch.zeros(4, 5, device=dev), _x(3, 4, device=dev), _x(3, 5, device=dev)),
           ValueError, r"acc must be \(d_in, d_out\) = \(5, 4\) .*\(transpose=True\), got \(4, 5\)",
           (("transpose", True),)),
    OpCall("gradient-mask-transposed", "gradient_accumulate_",
           lambda dev: (torch.zeros(4, 5, device=dev), _x(2, 3, 4, device=dev), _x(2, 3, 5, device=dev),
                        _mask(3, 2, device=dev)),
           ValueError, r"mask of shape \(3, 2\) " + _SHAPE_MSG + r" \(2, 3\) of g"),
    OpCall("gradient-float-mask", "gradient_accumulate_",
           lambda dev: (torch.zeros(4, 5, device=dev), _x(3, 4, device=dev), _x(3, 5, device=dev),
                        torch.ones(3, device=dev)),
           TypeError, "mask must be bool or an integer 0/1 tensor"),
    OpCall("gradient-d_out0", "gradient_accumulate_",
           lambda dev: (torch.zeros(0, 5, device=dev), _x(3, 0, device=dev), _x(3, 5, device=dev)),
           ValueError, r"d_out must be >= 1, got d_out = 0 \(g of shape \(3, 0\)\)"),
    OpCall("gradient-d_in0-no-tokens", "gradient_accumulate_",
           lambda dev: (torch.zeros(4, 0, device=dev), _x(0, 4, device=dev), _x(0, 0, device=dev)),
           ValueError, r"d_in must be >= 1, got d_in = 0 \(a of shape \(0, 0\)\)"),
    OpCall("gradient-integer-a", "gradient_accumulate_",
           lambda dev: (torch.zeros(4, 5, device=dev), _x(3, 4, device=dev), torch.ones(3, 5, dtype=torch.int64,
                                                                                         device=dev)),
           TypeError, "a must be bf16/fp16/fp32/fp64, got torch.int64"),
    OpCall("gradient-sparse-g", "gradient_accumulate_",
           lambda dev: (torch.zeros(4, 5, device=dev), _x(3, 4, device=dev).to_sparse(), _x(3, 5, device=dev)),
           TypeError, r"g must be a dense tensor, got layout torch.sparse_coo"),
    OpCall("gradient-fp16-acc", "gradient_accumulate_",
           lambda dev: (torch.zeros(4, 5, dtype=torch.float16, device=dev), _x(3, 4, device=dev),
                        _x(3, 5, device=dev)),
           TypeError, "acc must be float32"),
    OpCall("gradient-strided-acc", "gradient_accumulate_",
           lambda dev: (torch.zeros(5, 4, device=dev).mT, _x(3, 4, device=dev), _x(3, 5, device=dev)),
           ValueError, "acc must be contiguous"),
    OpCall("gradient-acc-requires-grad", "gradient_accumulate_",
           lambda dev: (torch.zeros(4, 5, device=dev, requires_grad=True), _x(3, 4, device=dev),
                        _x(3, 5, device=dev)),
           ValueError, "acc requires grad"),
]
BAD_CALLS = [pytest.param(c, id=c.name) for c in _BAD]

_GRAD = [
    # inputs that require grad (a hook's hidden states, trainable directions) are read as plain values
    OpCall("syrk-x-requires-grad", "syrk_accumulate_",
           lambda dev: (torch.zeros(4, 4, device=dev), _x(2, 3, 4, device=dev, requires_grad=True),
                        _mask(2, 3, device=dev))),
    OpCall("syrk-packed-x-in-a-graph", "syrk_accumulate_",
           lambda dev: (torch.zeros(10, device=dev), _in_graph(_x(5, 4, device=dev)))),
    OpCall("energy-Q-requires-grad", "fisher_energy",
           lambda dev: (_sym(4, dev), _x(4, 3, device=dev, requires_grad=True))),
    OpCall("energy-M-requires-grad", "fisher_energy",
           lambda dev: (_sym(4, dev).requires_grad_(), _x(4, 3, device=dev))),
    OpCall("projected-x-and-Q-require-grad", "projected_sq_accumulate_",
           lambda dev: (torch.zeros(3, device=dev), _x(2, 3, 4, device=dev, requires_grad=True),
                        _x(4, 3, device=dev, requires_grad=True), _mask(2, 3, device=dev))),
]
GRAD_CALLS = [pytest.param(c, id=c.name) for c in _GRAD]
_GRADIENT_GRAD = [
    OpCall("gradient-g-and-a-require-grad", "gradient_accumulate_",
           lambda dev: (torch.zeros(4, 5, device=dev), _x(2, 3, 4, device=dev, requires_grad=True),
                        _in_graph(_x(2, 3, 5, device=dev)), _mask(2, 3, device=dev), 0.5)),
    OpCall("gradient-transposed-a-requires-grad", "gradient_accumulate_",
           lambda dev: (torch.zeros(5, 4, device=dev), _x(6, 4, device=dev), _x(6, 5, device=dev, requires_grad=True)),
           kwargs=(("transpose", True),)),
]
GRADIENT_GRAD_CALLS = [pytest.param(c, id=c.name) for c in _GRADIENT_GRAD]


def _state(t):
    dense = t.detach().to_dense() if t.layout != torch.strided else t.detach()
    return dense.clone(), t.requires_grad, t.grad_fn is not None


def assert_refused(call: OpCall, backend: str, device: str = "cpu") -> None:
    """``call`` raises its error on ``backend``, and no tensor argument was touched (values,
    ``requires_grad`` and graph membership are as before the call)."""
    from fisherlora import ops

    args = call.args(device)
    before = [_state(a) for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(call.error, match=call.match):
        getattr(ops, call.op)(*args, **dict(call.kwargs), backend=backend)
    after = [_state(a) for a in args if isinstance(a, torch.Tensor)]
    for (v0, rg0, g0), (v1, rg1, g1) in zip(before, after, strict=True):
        assert torch.equal(v0, v1) and (rg0, g0) == (rg1, g1), f"{call.name}: an argument was changed"


def assert_no_graph(call: OpCall, backend: str, device: str = "cpu") -> None:
    """``call`` gives on ``backend`` exactly what it gives with every input detached, and its
    result (the accumulator, or the returned tensor) carries no autograd graph."""
    from fisherlora import ops

    fn = getattr(ops, call.op)
    args = call.args(device)
    plain = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*args, **dict(call.kwargs), backend=backend)
    ref = fn(*plain, **dict(call.kwargs), backend=backend)
    assert not out.requires_grad and out.grad_fn is None, f"{call.name}: the result is part of a graph"
    assert torch.equal(out.detach(), ref), f"{call.name}: differs from the same call on detached inputs"
