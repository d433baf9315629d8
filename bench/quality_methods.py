"""The LoRA initialisers the quality benchmark compares, as data: one spec per method, one builder per kind.

Every method is a :class:`Spec` in :data:`METHODS`. A spec says which directions the adapter
starts in and how large it starts; five builders (``kind``) turn specs into an initial PeftModel:

- ``peft``: PEFT 0.21.2's own data-free initialisers through ``init_lora_weights`` (default
  LoRA: Kaiming-uniform A, B = 0; ``pissa``: full SVD, top-r triplets at √σ each side, residual;
  ``olora``: QR of W, residual).
- ``peft_data``: PEFT's data-driven initialisers, run as ``bench/init_methods.py`` runs them on
  the calibration batches (``eva``: SVD of layer inputs over repeated passes, ranks redistributed;
  ``corda``: IPM with one unpadded sequence per forward; ``lora_ga``: weight gradients of the
  mean loss per batch).
- ``svd``: PiSSA's formula on a chosen set of W's singular triplets with a chosen magnitude
  (``milora``: the r smallest, own σ; ``sigma:unit``: the r largest, magnitude 1), residual
  ``W − s·BA`` so the outputs are unchanged (``bench.init_methods.svd_write``, MiLoRA's writer there).
- ``fisherlora``: :func:`fisherlora.initialize_fisher_lora` with ``score`` x ``magnitude``
  (``fisherlora``: the package defaults; one calibration pass serves every variant), or, where
  ``init`` names one, a gradient start of ``FisherLoraConfig.init`` (``gradient``,
  ``natural_gradient``: docs/DESIGN.md §1 step 6); the first method that needs the weight
  gradient collects the statistics again with it, and they then serve every variant.
- ``fisher_zero``: the Fisher-chosen directions at zero magnitude, LoRA's own start: ``B = 0``,
  A's rows the chosen ``v_iᵀ`` scaled to the expected row norm of PEFT's default A
  (Kaiming-uniform ``U(−1/√d_in, 1/√d_in)``: ``E‖row‖² = 1/3``), W untouched, no residual.

A run's key (``spec.key()``) holds the spec's content, not its name, so two names for one spec
(``fisherlora`` and ``fisher:unit`` while unit is the default) share their runs.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import time

import torch


@dataclasses.dataclass(frozen=True)
class Spec:
    """One initialiser: ``kind`` (a builder) and its settings; ``note`` says how it is run."""

    kind: str
    init: object = True  # peft: init_lora_weights; peft_data: the init_methods name; fisherlora: True or an Init
    score: str | None = None  # fisherlora / fisher_zero: the ranking
    magnitude: str | None = None  # fisherlora / svd: unit, sigma, top_sigma, energy
    pick: str | None = None  # svd: "top" or "bottom" singular triplets
    allocation: str = "uniform"  # fisherlora: rank_allocation (docs/DESIGN.md §10)
    note: str = ""

    def key(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "note"}


def _fisher_default(field: str) -> str:
    import fisherlora

    return getattr(fisherlora.FisherLoraConfig(), field).value


METHODS: dict[str, Spec] = {
    "lora": Spec("peft", True, note="PEFT default (Kaiming-uniform A, B = 0)"),
    "pissa": Spec("peft", "pissa", note="PEFT pissa (full SVD, top-r at own σ, residual)"),
    "milora": Spec("svd", pick="bottom", magnitude="sigma", note="r smallest triplets at own σ, residual"),
    "olora": Spec("peft", "olora", note="PEFT olora (QR of W, residual)"),
    "eva": Spec("peft_data", "eva", note="PEFT EVA defaults (rho 2, tau 0.99) on the calibration batches"),
    "corda": Spec("peft_data", "corda", note="PEFT CorDA IPM, one unpadded calibration sequence per forward"),
    "lora_ga": Spec("peft_data", "lora_ga", note="PEFT LoRA-GA defaults, gradients of the calibration batches"),
    "fisherlora": Spec("fisherlora", score=_fisher_default("score"), magnitude=_fisher_default("magnitude"),
                       note="fisherlora defaults"),
    "fisher:unit": Spec("fisherlora", score="fisher", magnitude="unit", note="Fisher directions, magnitude 1"),
    "fisher:sigma": Spec("fisherlora", score="fisher", magnitude="sigma", note="Fisher directions, own σ"),
    "fisher:top_sigma": Spec("fisherlora", score="fisher", magnitude="top_sigma",
                             note="Fisher directions, the r largest σ of W"),
    "fisher:global": Spec("fisherlora", score="fisher", magnitude="unit", allocation="global",
                          note="fisher:unit with the same budget of rank x layers directions shared across "
                          "layers by Fisher energy (rank_allocation='global'); unit magnitudes keep ‖ΔW₀‖ equal "
                          "to fisher:unit's, so only the allocation differs"),
    "sigma:unit": Spec("svd", pick="top", magnitude="unit", note="σ-ranked (PiSSA) directions, magnitude 1"),
    "fisher:zero": Spec("fisher_zero", score="fisher",
                        note="Fisher directions in A (PEFT-default row norm), B = 0, W untouched"),
    "fisher_sigma:top_sigma": Spec("fisherlora", score="fisher_sigma", magnitude="top_sigma",
                                   note="directions with the r largest σ_i² e_i (the whole component's energy), "
                                   "the r largest σ of W"),
    "fisher_low:top_sigma": Spec("fisherlora", score="fisher_low", magnitude="top_sigma",
                                 note="directions with the r SMALLEST Fisher energies e_i, the r largest σ of W"),
    "gradient": Spec("fisherlora", "gradient",
                     note="fisherlora init='gradient': LoRA-GA's split of ∇W's singular vectors (A first r, B next r), "
                     "unit directions x d_out^(1/4)/4, residual"),
    "natural_gradient": Spec("fisherlora", "natural_gradient",
                             note="fisherlora init='natural_gradient': the same split of the Fisher-optimal "
                             "subspace of the damped K-FAC natural gradient, same scale, residual"),
}
#: the methods the standard run's 2.5-hour CPU budget is sized for
CORE = ["lora", "pissa", "milora", "fisherlora"]
#: methods that need fisherlora's generic path (issue 16) on a model that is not a causal LM
NEEDS_LOSS_FN = ("fisherlora", "fisher_zero")


class Unavailable(RuntimeError):
    """A method cannot run on this task (the reason is the message)."""


def fisherlora_takes_loss_fn() -> bool:
    import fisherlora

    return "loss_fn" in inspect.signature(fisherlora.initialize_fisher_lora).parameters


# ----------------------------------------------------------------------------- builders
def zero_magnitude_write(peft_model, directions: dict[str, torch.Tensor]) -> None:
    """``A ← directions[name] / √3`` (rows of unit norm in, PEFT-default expected row norm out),
    ``B ← 0`` for every adapted layer; the base weights are not touched."""
    from fisherlora.adapter import lora_layers

    with torch.no_grad():
        for name, module in lora_layers(peft_model):
            A = module.lora_A["default"].weight
            A.copy_(directions[name].to(A.dtype) / math.sqrt(3.0))
            module.lora_B["default"].weight.zero_()


def unit_rows(peft_model) -> dict[str, torch.Tensor]:
    """Each adapted layer's A with its rows normalised: the chosen ``v_iᵀ`` of a fisherlora adapter."""
    from fisherlora.adapter import lora_layers

    return {name: torch.nn.functional.normalize(m.lora_A["default"].weight.detach().float(), dim=1)
            for name, m in lora_layers(peft_model)}


@torch.no_grad()
def adapter_size(peft_model) -> dict:
    """Initial adapter size: root-sum-square of ``‖s·BA‖_F``, the sum of its singular values, ``‖A‖``, ``‖B‖``."""
    from fisherlora.adapter import lora_layers

    fro2, nuc, a2, b2 = 0.0, 0.0, 0.0, 0.0
    for _, m in lora_layers(peft_model):
        A, B = m.lora_A["default"].weight.float(), m.lora_B["default"].weight.float()
        if A.shape[0] == 0:
            continue
        s = torch.linalg.svdvals(m.scaling["default"] * (B @ A))
        fro2, nuc = fro2 + float((s**2).sum()), nuc + float(s.sum())
        a2, b2 = a2 + float((A**2).sum()), b2 + float((B**2).sum())
    return {"delta_fro": math.sqrt(fro2), "delta_sum_sigma": nuc, "A_fro": math.sqrt(a2), "B_fro": math.sqrt(b2)}


class Initialisers:
    """Builds each method's initial PeftModel for one task and hands out deep copies.

    Deterministic methods are built once (seed 0 where PEFT draws anything); default LoRA draws
    its random A per seed. ``task`` gives ``lora_config(init, **kw)``, ``calib`` (batches) and
    ``causal_lm`` (False: fisherlora needs issue 16's ``loss_fn`` interface).
    """

    def __init__(self, base, task, rank: int, alpha: float):
        self.base, self.task, self.rank, self.alpha = base, task, rank, alpha
        self.cache, self.stats, self.init_s = {}, None, {}

    def get(self, spec: Spec, seed: int):
        if spec.kind == "peft" and spec.init is True:  # default LoRA: random A per seed
            torch.manual_seed(seed)
            return self._build(spec)
        name = repr(spec.key())
        if name not in self.cache:
            t0 = time.perf_counter()
            torch.manual_seed(0)
            self.cache[name] = self._build(spec)
            self.init_s[name] = time.perf_counter() - t0
        return copy.deepcopy(self.cache[name])

    def init_seconds(self, spec: Spec) -> float | None:
        return self.init_s.get(repr(spec.key()))

    def _config(self, init=True, **kw):
        return self.task.lora_config(self.rank, self.alpha, init, **kw)

    def _build(self, spec: Spec):
        import peft

        model = copy.deepcopy(self.base)
        if spec.kind == "peft":
            return peft.get_peft_model(model, self._config(spec.init))
        if spec.kind == "svd":
            from bench.init_methods import svd_write

            pm = peft.get_peft_model(model, self._config(True))
            svd_write(pm, spec.pick, spec.magnitude)
            return pm
        if spec.kind == "peft_data":
            from bench.init_methods import initialize

            pm, _ = initialize(spec.init, model, self.task.calib, rank=self.rank, alpha=self.alpha,
                               lora_kwargs=self.task.lora_kwargs())
            return pm
        if spec.kind == "fisherlora":
            return self._fisherlora(model, spec.score, spec.magnitude, spec.allocation,
                                    init=spec.init if isinstance(spec.init, str) else "filet")
        if spec.kind == "fisher_zero":
            directions = unit_rows(self._fisherlora(copy.deepcopy(self.base), spec.score, "unit"))
            pm = peft.get_peft_model(model, self._config(True))
            zero_magnitude_write(pm, directions)
            return pm
        raise ValueError(f"unknown method kind {spec.kind!r}")

    def _fisherlora(self, model, score: str | None, magnitude: str | None, allocation: str = "uniform",
                    init: str = "filet"):
        import fisherlora

        fields = {k: v for k, v in (("score", score), ("magnitude", magnitude)) if v is not None}
        cfg = fisherlora.FisherLoraConfig(rank=self.rank, alpha=self.alpha, rank_allocation=allocation, init=init,
                                          **fields)
        if cfg.init.needs_gradient and self.stats is not None and not self.stats.grad:
            self.stats = None  # collected without the weight gradient: once more with it (the same A and G)
        kw = {}
        if not self.task.causal_lm:
            if not fisherlora_takes_loss_fn():
                raise Unavailable("fisherlora on a non-causal-LM head needs initialize_fisher_lora(..., "
                                  "loss_fn=None) from issue 16, which this checkout does not have yet")
            kw["loss_fn"] = None  # built-in heads (AutoModelForSequenceClassification) need none
        res = fisherlora.initialize_fisher_lora(model, self._config(True), None if self.stats else self.task.calib,
                                                cfg, statistics=self.stats, progress=False, **kw)
        self.stats = res.statistics  # one calibration pass serves every score x magnitude
        return res.model
