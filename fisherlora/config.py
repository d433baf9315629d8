"""Configuration of a Fisher-guided LoRA initialisation (docs/DESIGN.md §1)."""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any


class FisherType(str, enum.Enum):
    """Which Fisher the K-FAC factors estimate.

    ``empirical``: gradients of the loss on the data's own labels. ``true``: labels sampled from
    the model's predictive distribution (``mc_samples`` draws per token), the Fisher information
    proper (Kunstner et al. 2019 discuss the difference).
    """

    EMPIRICAL = "empirical"
    TRUE = "true"


class Score(str, enum.Enum):
    """How singular directions are ranked. ``fisher``: the ``r`` largest ``e_i = (u_iᵀGu_i)(v_iᵀAv_i)``,
    the Fisher energy of the unit direction ``u_i v_iᵀ``; ``fisher_sigma``: the ``r`` largest
    ``σ_i² e_i``, the energy of the whole component; ``fisher_low``: the ``r`` SMALLEST ``e_i``
    (adapt where the data's curvature is least). Three readings of FILet's "Fisher energy"
    (docs/DESIGN.md §1 step 3)."""

    FISHER = "fisher"
    FISHER_SIGMA = "fisher_sigma"
    FISHER_LOW = "fisher_low"


class Init(str, enum.Enum):
    """Where the adapter starts (docs/DESIGN.md §1 step 6).

    ``filet``: the weight's singular triplets ranked by Fisher energy (FILet; ``score``,
    ``magnitude`` and ``damping`` apply). ``gradient``: LoRA-GA's split of the weight gradient
    ``∇W``'s singular vectors (``A`` from the first ``r``, ``B`` from the next ``r``).
    ``natural_gradient``: the same split of the Fisher-optimal rank-``2r`` subspace of the damped
    K-FAC natural gradient ``(G+λ_G I)⁻¹ ∇W (A+λ_A I)⁻¹``. Both gradient starts gather ``∇W`` in the
    calibration hooks (a ``d_out × d_in`` float32 statistic per layer) and subtract ``s·BA`` into
    the residual weight, so the outputs at step 0 are unchanged.
    """

    FILET = "filet"
    GRADIENT = "gradient"
    NATURAL_GRADIENT = "natural_gradient"

    @property
    def needs_gradient(self) -> bool:
        """Whether this start reads the gradient statistic ``∇W``."""
        return self is not Init.FILET


class MemoryMode(str, enum.Enum):
    """How the statistics are held (docs/DESIGN.md §4).

    ``full``: dense float32 ``A`` and ``G`` (``A`` shared by layers with the same input).
    ``packed``: their upper triangles (half the memory). ``projected``: the SVDs first, then only
    ``diag(VᵀAV)`` and ``diag(UᵀGU)`` are accumulated; ``A`` and ``G`` are never formed, and the
    decoder layers are recomputed in the backward pass (activation checkpointing: about a third
    more compute per pass for one layer's activations instead of all of them).
    ``auto``: the fastest mode whose planned peak fits the device's free memory.
    """

    AUTO = "auto"
    FULL = "full"
    PACKED = "packed"
    PROJECTED = "projected"

    @classmethod
    def held(cls) -> tuple[MemoryMode, ...]:
        """The modes statistics can be held in, fastest first (``auto`` only picks one of them)."""
        return cls.FULL, cls.PACKED, cls.PROJECTED


class Magnitude(str, enum.Enum):
    """The singular value each chosen direction carries in the adapter (docs/DESIGN.md §1 step 5).

    ``sigma``: its own ``σ_i`` (PiSSA on the chosen triplets). ``top_sigma``: the ``r`` largest
    singular values of ``W``, assigned in energy order. ``unit``: 1. ``energy``: the ``sigma``
    adapter's norm ``‖σ_I‖₂`` shared out in proportion to the Fisher energy.
    """

    SIGMA = "sigma"
    TOP_SIGMA = "top_sigma"
    UNIT = "unit"
    ENERGY = "energy"


_DTYPES = ("float32", "float64")
_BASES_DTYPES = ("float32", "model")
_BACKENDS = ("auto", "torch", "triton", "ext")
_ALLOCATIONS = ("uniform", "global")


def _help(text: str, choices: tuple[str, ...] | None = None, **kw) -> Any:
    """A dataclass field with its help text (and choices) for the generated command-line flags."""
    return field(metadata={"help": text, "choices": choices}, **kw)


@dataclass(kw_only=True)
class FisherLoraConfig:
    """Everything that decides a fisherlora initialisation besides the model and the data.

    The LoRA shape fields (``rank``, ``alpha``, ``use_rslora``, ``target_modules``) build the
    PEFT ``LoraConfig`` through :meth:`to_lora_config` when none is passed to
    :func:`fisherlora.get_peft_model`; a passed ``LoraConfig`` wins over them.

    Raises:
        ValueError: on construction, naming the offending field.
    """

    rank: int = _help("LoRA rank r per target layer", default=16)
    alpha: float = _help("lora_alpha; the adapter is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)", default=16.0)
    use_rslora: bool = _help("rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023)", default=False)
    target_modules: str | list[str] = _help(
        "module names (suffixes; comma-separated on the command line: q_proj,v_proj), a regex matched "
        "against full names, or 'all-linear' (every Linear/Conv1D except the output head)",
        default="all-linear",
    )
    num_samples: int = _help("calibration set size, in sequences", default=128)
    max_length: int = _help("tokens per sequence, longer ones are truncated", default=512)
    batch_size: int = _help("sequences per forward/backward pass", default=4)
    fisher_type: FisherType = _help("'empirical' (data labels) or 'true' (sampled labels)",
                                    default=FisherType.EMPIRICAL)
    mc_samples: int = _help("label draws per batch for fisher_type='true'", default=1)
    init: Init = _help(
        "where the adapter starts: 'filet' (the weight's singular triplets ranked by Fisher energy: score, magnitude), "
        "'gradient' (LoRA-GA's split of the weight gradient's singular vectors) or 'natural_gradient' (the same split "
        "of the Fisher-optimal subspace of the damped K-FAC natural gradient); the gradient starts gather the "
        "d_out x d_in weight gradient in the calibration hooks (full or packed memory mode, empirical Fisher)",
        default=Init.FILET)
    score: Score = _help("ranking of singular directions (init='filet'): 'fisher' (largest e_i), 'fisher_sigma' "
                         "(largest sigma_i^2 e_i) or 'fisher_low' (smallest e_i)", default=Score.FISHER)
    magnitude: Magnitude = _help(
        "size of each chosen direction in the adapter: 'unit' (1), 'sigma' (its own σ_i, PiSSA on the chosen "
        "directions), 'top_sigma' (the r largest σ of the weight, handed out in score order) or 'energy' (the "
        "'sigma' adapter's norm shared out in proportion to Fisher energy); 'top_sigma' (the default) had the "
        "lowest validation loss of 'unit', 'sigma' and 'top_sigma' in bench/quality.py --setting cpu "
        "(bench/RESULTS.md)",
        default=Magnitude.TOP_SIGMA)
    damping: float = _help(
        "added to both curvature factors of the energy: (uᵀGu + λ)(vᵀAv + λ), in the units of A and G (0: no "
        "damping); for init='natural_gradient' added to A and G before they are inverted (there 0 means "
        "automatic: 1e-2 x each factor's mean eigenvalue, docs/DESIGN.md §1 step 6)",
        default=0.0,
    )
    stats_dtype: str = _help("dtype of the accumulated statistics A, G (and the weight gradient): 'float32' or "
                             "'float64' (twice the memory, for very long calibration sets or ill-conditioned "
                             "factors)", default="float32",
                             choices=_DTYPES)
    memory_mode: MemoryMode = _help("how the statistics are held: 'full' (dense d x d A and G per layer, fastest), "
                                    "'packed' (their upper triangles, about half the memory), 'projected' (only "
                                    "each singular direction's uᵀGu and vᵀAv, on bases computed first: the least "
                                    "memory, filet only) or 'auto' (the fastest that fits; `fisherlora plan` shows "
                                    "each)",
                                    default=MemoryMode.FULL)
    layer_groups: int = _help(
        "passes over the calibration data, each collecting statistics for one contiguous group of decoder "
        "layers, so only one group's statistics (or singular bases) are held at once", default=1)
    bases_dtype: str = _help("dtype of the singular bases U, V held by the projected mode: 'float32' or "
                             "'model' (the weights' dtype, half the memory for bf16)", default="float32",
                             choices=_BASES_DTYPES)
    backend: str = _help("op backend: 'auto' (the first available of triton, ext, torch on a GPU, of ext, torch on "
                         "a CPU; the measured dispatch table where it has rows), 'torch' (the plain PyTorch "
                         "reference), 'triton' (the fused Triton kernels) or 'ext' (fisherlora's compiled C++/CUDA "
                         "extension)", default="auto", choices=_BACKENDS)
    seed: int = _help("seed for the calibration sample and for true-Fisher label draws", default=0)
    rank_allocation: str = _help(
        "'uniform' (every layer gets rank r) or 'global' (a budget of r x number of target layers shared across "
        "layers by comparable Fisher energy, written as PEFT's rank_pattern; docs/DESIGN.md §10)",
        default="uniform", choices=_ALLOCATIONS)
    min_rank: int = _help("rank_allocation='global': the smallest rank of a layer (at most its min(d_out, d_in))",
                          default=1)
    max_rank: int = _help("rank_allocation='global': the largest rank of a layer; 0 means 4 x rank (at most "
                          "min(d_out, d_in))", default=0)

    def __post_init__(self):
        enums = {"init": Init, "fisher_type": FisherType, "score": Score, "magnitude": Magnitude,
                 "memory_mode": MemoryMode}
        for name, enum_cls in enums.items():
            value = getattr(self, name)
            try:
                setattr(self, name, enum_cls(value))
            except ValueError:
                choices = ", ".join(repr(m.value) for m in enum_cls)
                raise ValueError(f"FisherLoraConfig.{name} must be one of {choices}, got {value!r}") from None
        positive_ints = ("rank", "num_samples", "max_length", "batch_size", "mc_samples", "layer_groups")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FisherLoraConfig.{name} must be a positive integer, got {value!r}")
        for name in ("alpha", "damping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"FisherLoraConfig.{name} must be a finite number, got {value!r}")
        if not self.alpha > 0:
            raise ValueError(f"FisherLoraConfig.alpha must be positive, got {self.alpha!r}")
        if not self.damping >= 0:
            raise ValueError(f"FisherLoraConfig.damping must be >= 0, got {self.damping!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"FisherLoraConfig.use_rslora must be True or False, got {self.use_rslora!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"FisherLoraConfig.seed must be an integer, got {self.seed!r}")
        if self.stats_dtype not in _DTYPES:
            raise ValueError(f"FisherLoraConfig.stats_dtype must be one of {_DTYPES}, got {self.stats_dtype!r}")
        if self.bases_dtype not in _BASES_DTYPES:
            raise ValueError(f"FisherLoraConfig.bases_dtype must be one of {_BASES_DTYPES}, got {self.bases_dtype!r}")
        if self.rank_allocation not in _ALLOCATIONS:
            raise ValueError(f"FisherLoraConfig.rank_allocation must be one of {_ALLOCATIONS}, "
                             f"got {self.rank_allocation!r}")
        for name in ("min_rank", "max_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "min_rank" else 0):
                kind = "positive" if name == "min_rank" else "non-negative"
                raise ValueError(f"FisherLoraConfig.{name} must be a {kind} integer, got {value!r}")
        if self.max_rank and not self.min_rank <= self.max_rank:
            raise ValueError(f"FisherLoraConfig.min_rank ({self.min_rank}) must not exceed max_rank ({self.max_rank})")
        if self.backend not in _BACKENDS:
            raise ValueError(f"FisherLoraConfig.backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.init.needs_gradient:
            self._check_gradient_init()
        tm = self.target_modules
        if isinstance(tm, (list, tuple)):
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise ValueError(f"FisherLoraConfig.target_modules must be non-empty names, got {tm!r}")
            self.target_modules = list(tm)
        elif not isinstance(tm, str) or not tm:
            raise ValueError(f"FisherLoraConfig.target_modules must be a string or a list of names, got {tm!r}")

    def _check_gradient_init(self) -> None:
        """The settings a gradient start cannot serve, refused with what to use instead."""
        what = f"FisherLoraConfig.init={self.init.value!r}"
        if self.memory_mode is MemoryMode.PROJECTED:
            raise ValueError(f"{what} needs the dense weight gradient (d_out x d_in per layer) and, for the natural "
                             "gradient, the dense A and G, which memory_mode='projected' never holds; use "
                             "memory_mode='full', 'packed' or 'auto' (with layer_groups to bound the memory)")
        if self.fisher_type is FisherType.TRUE:
            raise ValueError(f"{what} needs the gradient of the loss on the data's own labels, but "
                             "fisher_type='true' back-propagates labels sampled from the model (whose expected "
                             "gradient is zero); use fisher_type='empirical'")
        if self.rank_allocation != "uniform":
            raise ValueError(f"{what} gives every layer its rank from the gradient's own spectrum; "
                             "rank_allocation='global' shares ranks by the Fisher energy of the weight's "
                             "singular triplets (init='filet'); use rank_allocation='uniform'")

    def to_lora_config(self, **overrides):
        """The PEFT ``LoraConfig`` with this config's rank, alpha, rsLoRA and target modules."""
        from peft import LoraConfig

        kwargs = dict(r=self.rank, lora_alpha=self.alpha, use_rslora=self.use_rslora,
                      target_modules=self.target_modules, lora_dropout=0.0, bias="none",
                      init_lora_weights=True)
        kwargs.update(overrides)
        return LoraConfig(**kwargs)

    def to_dict(self) -> dict:
        """JSON-ready dict (enums as their values)."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, enum.Enum):
                out[k] = v.value
        return out
