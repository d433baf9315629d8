"""The curvature ops (docs/DESIGN.md §3), with backend dispatch.

Every op validates its arguments here, once, whatever the backend, so that all backends raise
the same clear errors before any of them runs (a mask of exactly ``x.shape[:-1]``, ``d, k >= 1``,
an accumulator that does not require grad, ...); then :mod:`fisherlora.ops.dispatch` picks the
implementation, which runs outside autograd: the ops are not differentiable, arguments that
require grad are read as plain values and no result carries a graph, on every backend.
"""

from __future__ import annotations

import torch

from fisherlora.ops import dispatch
from fisherlora.ops.reference import pack_triu, packed_dim, packed_size, symmetrize_, unpack_triu

__all__ = [
    "syrk_accumulate_",
    "fisher_energy",
    "projected_sq_accumulate_",
    "gradient_accumulate_",
    "symmetrize_",
    "pack_triu",
    "unpack_triu",
    "packed_size",
    "packed_dim",
    "available_backends",
]

available_backends = dispatch.available_backends

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_ACC_DTYPES = (torch.float32, torch.float64)


def _check_mask(mask: torch.Tensor | None, x: torch.Tensor, op: str, name: str = "x") -> None:
    """A mask must have exactly the token dims ``x.shape[:-1]``: one with the same number of
    elements but another shape (transposed, flattened, an extra dim) is refused, never reshaped,
    because which row each element stands for would be a guess (the caller reshapes, knowingly)."""
    if mask is None:
        return
    if mask.device != x.device:
        raise ValueError(f"{op}: mask is on {mask.device} but {name} is on {x.device}")
    if mask.dtype != torch.bool and (mask.dtype.is_floating_point or mask.dtype.is_complex):
        raise TypeError(f"{op}: mask must be bool or an integer 0/1 tensor, got {mask.dtype}")
    if mask.shape != x.shape[:-1]:
        raise ValueError(
            f"{op}: mask of shape {tuple(mask.shape)} does not match the token dims "
            f"{tuple(x.shape[:-1])} of {name} ({name}.shape[:-1]); pass a mask of exactly that shape"
        )


def _check_at_least_one(op: str, name: str, size: int, tensor_name: str, tensor: torch.Tensor) -> None:
    if size < 1:
        raise ValueError(
            f"{op}: {name} must be >= 1, got {name} = {size} ({tensor_name} of shape {tuple(tensor.shape)})"
        )


def _check_strided(op: str, **tensors: torch.Tensor | None) -> None:
    """Every backend reads dense (strided) tensors: a sparse or other layout is refused once, here."""
    for name, t in tensors.items():
        if t is not None and t.layout != torch.strided:
            raise TypeError(f"{op}: {name} must be a dense tensor, got layout {t.layout}")


def _check_x(x: torch.Tensor, op: str, name: str = "x", d: str = "d") -> None:
    _check_strided(op, **{name: x})
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{op}: {name} must be bf16/fp16/fp32/fp64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: {name} must have shape (..., {d}), got a scalar")
    _check_at_least_one(op, d, x.shape[-1], name, x)


def _check_q(Q: torch.Tensor, d: int | None, op: str) -> None:
    """``Q`` is a ``(d, k)`` float tensor with ``d, k >= 1`` (``d`` given: it must match)."""
    _check_strided(op, Q=Q)
    if Q.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{op}: Q must be bf16/fp16/fp32/fp64, got {Q.dtype}")
    if Q.dim() != 2 or (d is not None and Q.shape[0] != d):
        raise ValueError(f"{op}: Q must be (d={'d' if d is None else d}, k), got {tuple(Q.shape)}")
    _check_at_least_one(op, "d", Q.shape[0], "Q", Q)
    _check_at_least_one(op, "k", Q.shape[1], "Q", Q)


def _check_acc(acc: torch.Tensor, x: torch.Tensor, op: str, name: str = "x") -> None:
    _check_strided(op, acc=acc)
    if acc.dtype not in _ACC_DTYPES:
        raise TypeError(f"{op}: acc must be float32 (or float64 for references), got {acc.dtype}")
    if acc.device != x.device:
        raise ValueError(f"{op}: acc is on {acc.device} but {name} is on {x.device}")
    if not acc.is_contiguous():
        raise ValueError(f"{op}: acc must be contiguous")
    if acc.requires_grad:
        raise ValueError(
            f"{op}: acc requires grad; the ops write their accumulator in place outside autograd, "
            "so pass one that does not (e.g. torch.zeros(...), or acc.detach() to write into its storage)"
        )


def _run(op: str, backend: str, device: torch.device, *args):
    """Run the validated ``op`` on its backend, outside autograd: the ops are statistics, so
    arguments that require grad are read as plain values and no result carries a graph (the
    compiled backends have no backward; the reference would otherwise build one)."""
    _, fn = dispatch.resolve(op, backend, device, args)
    with torch.no_grad():
        return fn(*args)


def syrk_accumulate_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float = 1.0, *, backend: str = "auto") -> torch.Tensor:
    """Accumulate a masked, scaled Gram matrix: ``acc += scale · x_mᵀ x_m`` in place.

    This is the K-FAC factor update (``A += aaᵀ`` for layer inputs, ``G += ggᵀ`` for output
    gradients; Martens & Grosse 2015, eq. 1; docs/DESIGN.md §1 step 1).

    Args:
        acc: float32 (float64 for references) accumulator on ``x``'s device, contiguous, not
            requiring grad, either dense ``(d, d)`` or the packed upper triangle
            ``(d(d+1)/2,)`` (layout in :mod:`fisherlora.ops.reference`). For a dense ``acc``
            only the upper triangle (diagonal included) is guaranteed after the call; call
            :func:`symmetrize_` once when accumulation is finished.
        x: ``(..., d)`` tokens as rows, ``d >= 1``, bf16/fp16/fp32 (fp64 for references), any
            strides; any number of tokens, zero included.
        mask: optional bool or 0/1 integer tensor of exactly the shape ``x.shape[:-1]`` (never
            reshaped); rows where it is false are skipped (no gathered copy of ``x`` is made by
            the fast backends) and never read: NaN/inf in masked-out rows (e.g. padding) do not
            reach ``acc``.
        scale: multiplies the update (a Python float).
        backend: ``"auto"`` (fastest available for the device), ``"torch"``, ``"triton"`` or ``"ext"``.

    Returns:
        ``acc``.

    Raises:
        TypeError: wrong dtype of ``acc``, ``x`` or ``mask``.
        ValueError: shapes or devices that do not match (a mask not of exactly
            ``x.shape[:-1]`` included), ``d = 0``, or an ``acc`` that requires grad.
        RuntimeError: an explicitly requested backend is unavailable.
    """
    op = "syrk_accumulate_"
    _check_x(x, op)
    _check_acc(acc, x, op)
    d = x.shape[-1]
    if acc.shape not in ((d, d), (packed_size(d),)):
        raise ValueError(
            f"{op}: acc must be ({d}, {d}) or packed ({packed_size(d)},) for x with d={d}, "
            f"got {tuple(acc.shape)}"
        )
    _check_mask(mask, x, op)
    _run(op, backend, x.device, acc, x, mask, float(scale))
    return acc


def fisher_energy(M: torch.Tensor, Q: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Per-column curvature ``e_j = q_jᵀ M q_j``, i.e. ``diag(Qᵀ M Q)``.

    With ``M = G`` and ``Q = U`` (left singular vectors) and ``M = A``, ``Q = V`` this gives the
    two factors of the Fisher energy ``e_i = (u_iᵀ G u_i)(v_iᵀ A v_i)`` of the direction
    ``u_i v_iᵀ`` under ``F ≈ A ⊗ G`` (docs/DESIGN.md §1 step 3).

    Args:
        M: symmetric float32/float64 matrix, dense ``(d, d)`` (both triangles read) or packed
            upper triangle ``(d(d+1)/2,)``.
        Q: ``(d, k)`` directions, ``d, k >= 1``, fp32/fp64 or bf16/fp16.
        backend: as in :func:`syrk_accumulate_`.

    Returns:
        ``(k,)`` tensor, float32 (float64 if ``M`` is float64), on ``M``'s device, without an
        autograd graph.

    Raises:
        TypeError, ValueError: wrong dtypes, shapes or devices, ``d = 0`` or ``k = 0``.
    """
    op = "fisher_energy"
    _check_strided(op, M=M)
    if M.dtype not in _ACC_DTYPES:
        raise TypeError(f"{op}: M must be float32 or float64, got {M.dtype}")
    if Q.dtype not in _INPUT_DTYPES or Q.dim() != 2:
        raise TypeError(f"{op}: Q must be a (d, k) floating tensor, got {Q.dtype} {tuple(Q.shape)}")
    _check_q(Q, None, op)
    if M.device != Q.device:
        raise ValueError(f"{op}: M is on {M.device} but Q is on {Q.device}")
    d = Q.shape[0]
    if M.shape not in ((d, d), (packed_size(d),)):
        raise ValueError(f"{op}: M must be ({d}, {d}) or packed ({packed_size(d)},), got {tuple(M.shape)}")
    return _run(op, backend, M.device, M, Q)


def projected_sq_accumulate_(acc: torch.Tensor, x: torch.Tensor, Q: torch.Tensor,
                             mask: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Accumulate squared projections: ``acc += Σ_t (Qᵀ x_t)²`` over unmasked rows, in place.

    Summed over a calibration set this is ``diag(Qᵀ (Σ_t x_t x_tᵀ) Q)`` without ever forming the
    ``(d, d)`` factor: the projected memory mode (docs/DESIGN.md §4).

    Args:
        acc: ``(k,)`` float32 (float64 for references) accumulator on ``x``'s device,
            contiguous, not requiring grad.
        x: ``(..., d)`` tokens as rows, ``d >= 1``, bf16/fp16/fp32 (fp64 for references).
        Q: ``(d, k)`` directions, ``k >= 1`` (fp32/fp64, or bf16/fp16).
        mask: optional bool or 0/1 tensor of exactly ``x.shape[:-1]``, the rows to count;
            masked-out rows are never read (NaN/inf there do not propagate).
        backend: as in :func:`syrk_accumulate_`.

    Returns:
        ``acc``.

    Raises:
        TypeError, ValueError, RuntimeError: as :func:`syrk_accumulate_` (``k = 0`` too).
    """
    op = "projected_sq_accumulate_"
    _check_x(x, op)
    _check_acc(acc, x, op)
    _check_q(Q, x.shape[-1], op)
    if Q.device != x.device:
        raise ValueError(f"{op}: Q is on {Q.device} but x is on {x.device}")
    if acc.shape != (Q.shape[1],):
        raise ValueError(f"{op}: acc must be ({Q.shape[1]},), got {tuple(acc.shape)}")
    _check_mask(mask, x, op)
    _run(op, backend, x.device, acc, x, Q, mask)
    return acc


def gradient_accumulate_(acc: torch.Tensor, g: torch.Tensor, a: torch.Tensor, mask: torch.Tensor | None = None,
                         scale: float = 1.0, *, transpose: bool = False, backend: str = "auto") -> torch.Tensor:
    """Accumulate a masked, scaled weight gradient: ``acc += scale · Σ_t g_t a_tᵀ`` in place.

    Summed over the counted tokens ``t`` of a calibration set, ``Σ_t g_t a_tᵀ = g_mᵀ a_m`` is the
    layer's weight gradient ``∇W`` (``g_t = ∂L/∂y_t`` its output gradients, ``a_t`` its inputs):
    the statistic K-FAC preconditions into the natural gradient ``G⁻¹ ∇W A⁻¹`` (Martens & Grosse
    2015, §4), gathered in the same hooks and over the same tokens as the factors ``A`` and ``G``
    of :func:`syrk_accumulate_` (docs/DESIGN.md §3).

    Args:
        acc: float32 (float64 for references) accumulator on ``g``'s device, contiguous, not
            requiring grad, of shape ``(d_out, d_in)`` (the ``nn.Linear`` weight's), or
            ``(d_in, d_out)`` with ``transpose=True``.
        g: ``(..., d_out)`` output gradients, ``d_out >= 1``, bf16/fp16/fp32 (fp64 for
            references), any strides.
        a: ``(..., d_in)`` layer inputs, ``d_in >= 1``, same token dims as ``g``
            (``a.shape[:-1] == g.shape[:-1]``), on ``g``'s device, bf16/fp16/fp32 (fp64 for
            references; it may differ from ``g``'s dtype, e.g. under autocast), any strides;
            any number of tokens, zero included.
        mask: optional bool or 0/1 integer tensor of exactly the token dims ``g.shape[:-1]``
            (never reshaped); rows where it is false are skipped in both ``g`` and ``a`` (no
            gathered copy is made by the fast backends) and never read: NaN/inf in masked-out
            rows do not reach ``acc``.
        scale: multiplies the update (a Python float).
        transpose: accumulate ``scale · Σ_t a_t g_tᵀ`` into a ``(d_in, d_out)`` ``acc`` instead,
            the layout of a GPT-2 ``Conv1D`` weight.
        backend: ``"auto"`` (fastest available for the device), ``"torch"``, ``"triton"`` or ``"ext"``.

    Returns:
        ``acc``.

    Raises:
        TypeError: wrong dtype of ``acc``, ``g``, ``a`` or ``mask``, or a non-dense tensor.
        ValueError: shapes or devices that do not match (token dims of ``g`` and ``a``, ``acc``'s
            shape, a mask not of exactly the token dims), ``d_out = 0`` or ``d_in = 0``, or an
            ``acc`` that requires grad.
        RuntimeError: an explicitly requested backend is unavailable or lacks this op.
    """
    op = "gradient_accumulate_"
    _check_x(g, op, "g", "d_out")
    _check_x(a, op, "a", "d_in")
    if a.device != g.device:
        raise ValueError(f"{op}: a is on {a.device} but g is on {g.device}")
    if a.shape[:-1] != g.shape[:-1]:
        raise ValueError(
            f"{op}: the token dims of g {tuple(g.shape[:-1])} and a {tuple(a.shape[:-1])} differ "
            f"(g of shape {tuple(g.shape)}, a of shape {tuple(a.shape)}); they must be equal"
        )
    _check_acc(acc, g, op, "g")
    d_out, d_in = g.shape[-1], a.shape[-1]
    want = (d_in, d_out) if transpose else (d_out, d_in)
    if acc.shape != want:
        names = "(d_in, d_out)" if transpose else "(d_out, d_in)"
        raise ValueError(
            f"{op}: acc must be {names} = {want} for g with d_out={d_out} and a with d_in={d_in}"
            f"{' (transpose=True)' if transpose else ''}, got {tuple(acc.shape)}"
        )
    _check_mask(mask, g, op, "g")
    _run(op, backend, g.device, acc, g, a, mask, float(scale), bool(transpose))
    return acc
