"""From statistics to LoRA factors: Fisher energy of each singular direction, selection of the
top ``r``, their magnitudes, the factors ``B`` and ``A``, and the one residual ``W − s·BA``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from fisherlora import ops
from fisherlora.config import FisherLoraConfig, Magnitude, MemoryMode, Score
from fisherlora.gradient_init import (
    check_gradient_ranks,
    decompose_gradient_layer,
    stable_scale,
    warn_degenerate_gradients,
)
from fisherlora.layers import check_ranks, check_target_weights, layer_shape, ranks_and_scalings, weight_view
from fisherlora.snapshot import keeps_global_rng
from fisherlora.statistics import FisherStatistics
from fisherlora.svd import canonical_signs, iter_thin_svd, thin_svd

__all__ = [
    "LayerSelection",
    "LayerInit",
    "direction_energy",
    "select_directions",
    "decompose_layer",
    "adapter_magnitudes",
    "lora_factors",
    "residual_weight",
    "compute_initialization",
]


def direction_energy(U: torch.Tensor, Vh: torch.Tensor, A: torch.Tensor, G: torch.Tensor,
                     damping: float = 0.0, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fisher energy of each unit direction ``u_i v_iᵀ`` under ``F ≈ A ⊗ G``.

    ``e_i = vec(u_i v_iᵀ)ᵀ (A ⊗ G) vec(u_i v_iᵀ) = (u_iᵀ G u_i)(v_iᵀ A v_i)`` (FILet,
    arXiv 2605.01046; the Kronecker identity ``(A ⊗ G) vec(X) = vec(G X A)``), with Tikhonov
    damping ``λ`` added to each factor: ``(u_iᵀGu_i + λ)(v_iᵀAv_i + λ)``.

    Args:
        U: ``(d_out, k)`` left singular vectors. Vh: ``(k, d_in)`` right singular vectors.
        A: ``(d_in, d_in)`` activation covariance. G: ``(d_out, d_out)`` gradient covariance.
            Dense or packed, float32/float64.

    Returns:
        ``(gu, av, e)``, each ``(k,)`` in the statistics' dtype: ``diag(UᵀGU) + λ``,
        ``diag(VᵀAV) + λ`` and their product.
    """
    gu = ops.fisher_energy(G, U.to(G.dtype), backend=backend) + damping
    av = ops.fisher_energy(A, Vh.mT.to(A.dtype), backend=backend) + damping
    return gu, av, gu * av


def select_directions(score: torch.Tensor, sigma: torch.Tensor, r: int, *, lowest: bool = False) -> torch.Tensor:
    """Indices of the ``r`` largest scores (``lowest=True``: the ``r`` smallest), best first (in
    descending, or ascending, score order), ties broken by larger ``σ``.

    Raises:
        ValueError: ``r`` exceeds the number of directions.
    """
    k = score.numel()
    if r > k:
        raise ValueError(f"rank {r} exceeds the {k} singular directions of the layer")
    by_sigma = torch.argsort(sigma, descending=True, stable=True)
    order = by_sigma[torch.argsort(score[by_sigma], descending=not lowest, stable=True)]
    return order[:r]


@dataclass
class LayerSelection:
    """What was chosen in one layer, kept for the report (all tensors on the CPU, float64).

    Attributes:
        name: module name. shape: ``(d_out, d_in)``. rank: ``r``.
        indices: ``(r,)`` chosen singular indices (0 = largest σ), in score order.
        sigma: ``(k,)`` all singular values. energy: ``(k,)`` Fisher energies ``e_i``.
        score: ``(k,)`` the ranking score (``e`` or ``σ² e``).
        magnitudes: ``(r,)`` the singular values the adapter carries.

    For the gradient starts (``init`` other than ``filet``, :mod:`fisherlora.gradient_init`) the
    triplets are the (whitened) gradient's: ``indices`` are ``0..r-1`` (the right directions ``A``
    holds), ``sigma`` its singular values, ``energy`` and ``score`` their squares, ``magnitudes``
    ``ζ²``.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    indices: torch.Tensor
    sigma: torch.Tensor
    energy: torch.Tensor
    score: torch.Tensor
    magnitudes: torch.Tensor

    @property
    def captured(self) -> float:
        """Fraction of the layer's total score held by the chosen directions."""
        total = float(self.score.sum())
        return float(self.score[self.indices].sum()) / total if total > 0 else 0.0

    @property
    def energy_captured(self) -> float:
        """Fraction of the total Fisher energy ``Σ e_i`` held by the chosen directions."""
        total = float(self.energy.sum())
        return float(self.energy[self.indices].sum()) / total if total > 0 else 0.0

    @property
    def pissa_overlap(self) -> float:
        """Fraction of the chosen directions that PiSSA (top-r σ) would also choose."""
        return float((self.indices < self.rank).sum()) / self.rank

    def to_dict(self) -> dict:
        idx = self.indices
        return {
            "name": self.name,
            "shape": list(self.shape),
            "rank": self.rank,
            "indices": idx.tolist(),
            "sigma": self.sigma[idx].tolist(),
            "energy": self.energy[idx].tolist(),
            "magnitudes": self.magnitudes.tolist(),
            "score_captured": self.captured,
            "energy_captured": self.energy_captured,
            "pissa_overlap": self.pissa_overlap,
            "sigma_max": float(self.sigma[0]),
        }


def adapter_magnitudes(sigma: torch.Tensor, energy: torch.Tensor, indices: torch.Tensor,
                       magnitude: Magnitude | str) -> torch.Tensor:
    """Singular value carried by each chosen direction (docs/DESIGN.md §1 step 5).

    Args:
        sigma: ``(k,)`` descending singular values. energy: ``(k,)`` Fisher energies.
        indices: ``(r,)`` chosen indices in score order.
        magnitude: ``sigma`` (own ``σ_i``), ``top_sigma`` (``σ_1..σ_r`` in score order),
            ``unit`` (1), ``energy`` (``‖σ_I‖₂ · e_i / ‖e_I‖₂``; falls back to ``sigma`` if all
            chosen energies are zero).

    Returns:
        ``(r,)`` float64 magnitudes.
    """
    magnitude = Magnitude(magnitude)
    s = sigma.to(torch.float64)
    r = indices.numel()
    if magnitude is Magnitude.SIGMA:
        return s[indices]
    if magnitude is Magnitude.TOP_SIGMA:
        return s[:r].clone()
    if magnitude is Magnitude.UNIT:
        return torch.ones(r, dtype=torch.float64, device=s.device)
    e = energy.to(torch.float64)[indices]
    norm_e = e.norm()
    if norm_e == 0:
        return s[indices]
    return s[indices].norm() * e / norm_e


def lora_factors(U_I: torch.Tensor, Vh_I: torch.Tensor, magnitudes: torch.Tensor,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA-style factors on the chosen triplets: ``B = U_I diag(√(m/s))``, ``A = diag(√(m/s)) V_Iᵀ``.

    So that ``s · B A = U_I diag(m) V_Iᵀ`` (Meng et al. 2024, PiSSA, eq. 2-3, with the
    magnitudes ``m`` in place of the top singular values).

    Args:
        U_I: ``(d_out, r)``. Vh_I: ``(r, d_in)``. magnitudes: ``(r,)`` non-negative.
        scaling: the LoRA scaling ``s`` (``alpha/r`` or ``alpha/√r``), positive.

    Returns:
        ``B`` ``(d_out, r)`` and ``A`` ``(r, d_in)`` in float32.
    """
    root = (magnitudes.to(torch.float32) / scaling).sqrt().to(U_I.device)
    return (U_I.float() * root), (root[:, None] * Vh_I.float())


def decompose_layer(name: str, W: torch.Tensor, A: torch.Tensor, G: torch.Tensor, *, rank: int,
                    scaling: float, score: Score | str | None = None,
                    magnitude: Magnitude | str | None = None, damping: float = 0.0,
                    backend: str = "auto", projected: bool = False,
                    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    ) -> tuple[LayerSelection, torch.Tensor, torch.Tensor]:
    """SVD, Fisher energy, selection and LoRA factors of one layer.

    Args:
        name: module name (for errors and the report).
        W: ``(d_out, d_in)`` weight (:func:`fisherlora.layers.weight_view` of the layer).
        A, G: the layer's K-FAC factors, ``(d_in, d_in)`` and ``(d_out, d_out)`` (dense or
            packed); with ``projected=True`` their projections ``diag(VᵀAV)`` and
            ``diag(UᵀGU)``, ``(k,)`` each, on the singular bases ``svd``.
        rank: ``r``. scaling: ``s``. score, magnitude, damping, backend: see
            :class:`fisherlora.FisherLoraConfig` (``None``: its default).
        svd: ``(U, S, Vh)`` of ``W`` if already computed (required to interpret projected
            statistics consistently), else computed here by :func:`thin_svd`.

    Returns:
        ``(selection, B, A_lora)`` with ``B`` ``(d_out, r)`` and ``A_lora`` ``(r, d_in)``, float32 on
        ``W``'s device; the residual is :func:`residual_weight`.

    Raises:
        ValueError: ``rank > min(d_out, d_in)`` (naming the layer).
    """
    d_out, d_in = W.shape
    check_ranks({name: (d_out, d_in)}, {name: rank})
    defaults = FisherLoraConfig()
    score = Score(score if score is not None else defaults.score)
    magnitude = Magnitude(magnitude if magnitude is not None else defaults.magnitude)
    U, S, Vh = svd if svd is not None else thin_svd(W)
    U, S, Vh = U.to(W.device, torch.float32), S.to(W.device, torch.float32), Vh.to(W.device, torch.float32)
    if projected:
        e = (G.to(W.device, torch.float64) + damping) * (A.to(W.device, torch.float64) + damping)
    else:
        e = direction_energy(U, Vh, A.to(W.device), G.to(W.device), damping, backend)[2]
    e = e.to(torch.float64)
    s64 = S.to(torch.float64)
    sc = e * s64.square() if score is Score.FISHER_SIGMA else e
    idx = select_directions(sc, s64, rank, lowest=score is Score.FISHER_LOW)
    mags = adapter_magnitudes(s64, e, idx, magnitude)
    B, A_lora = lora_factors(*canonical_signs(U[:, idx], Vh[idx]), mags, scaling)
    sel = LayerSelection(name, (d_out, d_in), rank, idx.cpu(), s64.cpu(), e.cpu(), sc.cpu(), mags.cpu())
    return sel, B, A_lora


def residual_weight(W: torch.Tensor, B: torch.Tensor, A_lora: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W_res = W − s·B A``, ``(d_out, d_in)``, so that ``W_res + s·B A = W`` and the model's
    outputs are unchanged (docs/DESIGN.md §1 step 5).

    Computed in float32, or float64 for a float64 ``W`` (at least the weight's own precision; the
    caller casts the result once into the weight's dtype). Pass ``B`` and ``A`` as the adapter
    holds them, so the identity holds for the stored factors.
    """
    work = torch.promote_types(W.dtype, torch.float32)
    return W.detach().to(work) - scaling * (B.to(work) @ A_lora.to(work))


@dataclass
class LayerInit:
    """Initial LoRA factors of one layer (float32, on the weight's device); the residual is
    computed from them when it is written."""

    B: torch.Tensor
    A: torch.Tensor
    scaling: float



def rank_deficient(modules: dict[str, nn.Module], stats: FisherStatistics) -> list[tuple[str, int, int]]:
    """The layers whose ``A`` counted fewer tokens than ``d_in`` (so ``rank(A) < d_in``), as
    ``(name, counted tokens, d_in)``, in model order. It matters only without damping: with
    ``damping > 0`` the directions outside ``A``'s range are ranked by ``(uᵀGu + λ)·λ``."""
    return [(n, stats.a_count[stats.a_key[n]], layer_shape(m)[1]) for n, m in modules.items()
            if stats.a_count[stats.a_key[n]] < layer_shape(m)[1]]


def warn_rank_deficient(short: list[tuple[str, int, int]], total: int) -> None:
    """ONE warning for a whole run (docs/DESIGN.md §1 step 3): how many of the ``total`` layers
    have a rank-deficient ``A`` (:func:`rank_deficient`), the worst of them, and the advice."""
    if not short:
        return
    name, count, d_in = min(short, key=lambda t: t[1] / t[2])
    warnings.warn(
        f"the activation covariance A is rank-deficient in {len(short)} of {total} layers (worst {name!r}: "
        f"{count} counted tokens for d_in = {d_in}): directions outside A's range get zero Fisher energy and are "
        "ranked by sigma alone; calibrate on more tokens (num_samples, max_length) or set damping > 0",
        UserWarning, stacklevel=4)  # the caller of initialize_fisher_lora (through keeps_global_rng)


@keeps_global_rng
def compute_initialization(modules: dict[str, nn.Module], stats: FisherStatistics, lora_config,
                           config: FisherLoraConfig, *, bases: dict | None = None, progress: bool = True,
                           svd_seconds: dict | None = None, weights=None, warn: bool = True):
    """Decompose every layer of ``modules`` (no change to the model).

    Args:
        modules: layer name -> Linear/Conv1D. stats: their statistics (any kind).
        lora_config: the PEFT ``LoraConfig`` (ranks, scalings). config: score, magnitude, damping.
        bases: precomputed ``(U, S, Vh)`` per layer (required for projected statistics: they are
            only meaningful on the bases they were accumulated on); else computed here, batched
            one matrix at a time (:func:`fisherlora.svd.iter_thin_svd`).
        svd_seconds: if given, solver seconds per weight shape are added to it.
        warn: warn (``UserWarning``) when ``A`` is rank-deficient in some of these layers
            (:func:`warn_rank_deficient`).
        weights: layer name -> its ``(d_out, d_in)`` weight, already read (a sharded layer's gathered
            by :func:`fisherlora.spread.owned_weights`); default: each read here, in turn, by
            :func:`fisherlora.layers.weight_view`.

    Returns:
        ``(inits, selections)``: layer name -> :class:`LayerInit`, and -> :class:`LayerSelection`.

    Raises:
        ValueError: a rank larger than ``min(d_in, d_out)``, or statistics that do not match
            the layers (naming them).
    """
    check_target_weights(modules)
    plan = ranks_and_scalings(lora_config, list(modules))
    check_ranks({n: layer_shape(m) for n, m in modules.items()}, {n: r for n, (r, _) in plan.items()})
    check_gradient_ranks({n: layer_shape(m) for n, m in modules.items()}, {n: r for n, (r, _) in plan.items()},
                         config.init)
    for name, module in modules.items():
        if name not in stats.G:
            raise ValueError(f"the statistics hold no factors for layer {name!r}")
        if config.init.needs_gradient and name not in stats.grad:
            raise ValueError(f"init={config.init.value!r} needs the weight gradient, and the statistics hold none for "
                             f"layer {name!r} (collected for init='filet'); collect them again with this init")
        if tuple(stats.shapes[name]) != layer_shape(module):
            raise ValueError(f"the statistics of {name!r} are for shape {tuple(stats.shapes[name])}, "
                             f"the layer is {layer_shape(module)}")
    if config.init.needs_gradient:
        return _gradient_initialization(modules, stats, plan, config, progress)
    if warn and not config.damping:  # initialize_fisher_lora warns once for the whole run instead (warn=False)
        warn_rank_deficient(rank_deficient(modules, stats), len(modules))
    if stats.kind is MemoryMode.PROJECTED and bases is None:
        raise ValueError("projected statistics need the singular bases they were accumulated on")
    inits, selections = {}, {}
    with tqdm(total=len(modules), desc="decomposition (SVD+energy)", unit="layer", disable=not progress,
              dynamic_ncols=True) as bar:
        for name, module in modules.items():
            # one layer at a time: a quantised layer's is a float32 copy (§8); a sharded one's given, gathered (§7)
            W = weights[name] if weights is not None else weight_view(module)
            svds = [(name, bases[name])] if bases is not None else iter_thin_svd({name: W}, seconds=svd_seconds)
            for _, svd in svds:
                r, s = plan[name]
                A, G = stats.factors(name)
                sel, B, A_lora = decompose_layer(
                    name, W, A, G, rank=r, scaling=s, score=config.score,
                    magnitude=config.magnitude, damping=config.damping, backend=config.backend,
                    projected=stats.kind is MemoryMode.PROJECTED, svd=svd)
                inits[name] = LayerInit(B, A_lora, s)
                selections[name] = sel
                bar.update(1)
            del W, svds
    return {n: inits[n] for n in modules}, {n: selections[n] for n in modules}  # model order



def _gradient_initialization(modules: dict[str, nn.Module], stats: FisherStatistics, plan: dict, config,
                             progress: bool):
    """:func:`compute_initialization` for the gradient starts: no SVD of the weights, one SVD of
    each layer's (whitened) gradient (:func:`fisherlora.gradient_init.decompose_gradient_layer`)."""
    inits, selections, zero = {}, {}, []
    with tqdm(total=len(modules), desc=f"decomposition ({config.init.value})", unit="layer", disable=not progress,
              dynamic_ncols=True) as bar:
        for name, module in modules.items():
            r, s = plan[name]
            A, G = stats.factors(name)
            device = next(module.parameters()).device
            sigma, B, A_lora = decompose_gradient_layer(name, stats.grad[name], A, G, rank=r, init=config.init,
                                                        damping=config.damping, device=device)
            if not sigma[2 * r - 1] > 1e-10 * sigma[0]:  # fewer than 2r independent directions
                zero.append(name)
            sq = sigma.square()
            sel = LayerSelection(name, layer_shape(module), r, torch.arange(r), sigma, sq, sq.clone(),
                                 torch.full((r,), stable_scale(layer_shape(module)[0]) ** 2, dtype=torch.float64))
            inits[name] = LayerInit(B, A_lora, s)
            selections[name] = sel
            bar.update(1)
    warn_degenerate_gradients(zero)
    return inits, selections
