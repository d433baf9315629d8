"""The store of K-FAC statistics: normalised factors per layer, their counts, merge of layer
groups, and their safetensors file (to re-select with another rank without new passes)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fisherlora.config import MemoryMode

__all__ = ["FisherStatistics"]


@dataclass
class FisherStatistics:
    """Normalised K-FAC factors of a set of layers.

    Attributes:
        A: factor key -> activation covariance ``E[aaᵀ]`` (float32/float64): dense
            ``(d_in, d_in)`` (``kind=MemoryMode.FULL``), packed ``(d_in(d_in+1)/2,)``
            (``PACKED``), or its projection ``diag(VᵀAV)`` ``(k,)`` on the layer's right singular
            vectors (``PROJECTED``).
        G: layer name -> gradient covariance ``E[ggᵀ]``, in the same form (``diag(UᵀGU)``).
        a_key: layer name -> key of its (possibly shared) ``A``.
        a_count: factor key -> counted (token, call) pairs ``N_A``.
        g_count: layer name -> counted (token, call, draw) triples ``N_G``.
        shapes: layer name -> ``(d_out, d_in)``.
        info: free-form JSON-able metadata about the whole collection (calibration totals,
            fisher type), the same for every layer group; ``model_digest`` and ``head``: the
            whole model they were collected on (:func:`fisherlora.digest.model_digest`) and its
            head's kind, against which reuse is checked.
        kind: the :class:`~fisherlora.config.MemoryMode` they were collected in.
        fingerprints: layer name -> :func:`fisherlora.fingerprint.weight_fingerprint` of the weight
            the statistics were collected on (so they are refused on another model).
        grad: layer name -> the weight gradient ``∇W = (1/N_G) Σ_t g_t a_tᵀ``, ``(d_out, d_in)`` in
            the statistics' dtype (Conv1D layers too: the ``weight_view`` orientation), over the
            same counted tokens as ``G``: the gradient of the summed loss divided by ``N_G``
            (docs/DESIGN.md §1 step 1). Empty unless the initialisation needed it (``init`` other
            than ``filet``).
    """

    A: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    a_key: dict[str, str]
    a_count: dict[str, int]
    g_count: dict[str, int]
    shapes: dict[str, tuple[int, int]]
    info: dict = field(default_factory=dict)
    kind: MemoryMode = MemoryMode.FULL
    fingerprints: dict[str, dict] = field(default_factory=dict)
    grad: dict[str, torch.Tensor] = field(default_factory=dict)

    #: the attributes that map a layer (or a factor key) to something: merged by union
    PER_LAYER = ("A", "G", "a_key", "a_count", "g_count", "shapes", "fingerprints", "grad")

    def __post_init__(self):
        self.kind = MemoryMode(self.kind)

    @classmethod
    def merge(cls, parts: list[FisherStatistics]) -> FisherStatistics:
        """One object from the statistics of disjoint layer groups (same kind): the per-layer
        attributes are united, ``info`` is the groups' common metadata."""
        out = cls({}, {}, {}, {}, {}, {}, {}, parts[0].kind if parts else MemoryMode.FULL)
        for p in parts:
            if p.kind != out.kind:
                raise ValueError(f"cannot merge {p.kind.value} statistics into {out.kind.value} ones")
            for name in cls.PER_LAYER:
                getattr(out, name).update(getattr(p, name))
            out.info.update(p.info)
        return out

    def drop_tensors(self) -> None:
        """Free the factors, keeping names and counts (for the report)."""
        self.A.clear()
        self.G.clear()
        self.grad.clear()

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, G)`` of layer ``name``."""
        return self.A[self.a_key[name]], self.G[name]

    @property
    def layers(self) -> list[str]:
        return list(self.G)

    def save(self, path) -> None:
        """Write to a safetensors file (tensors ``A.<key>``, ``G.<name>``, ``grad.<name>``; the rest as
        metadata)."""
        from safetensors.torch import save_file

        tensors = {f"A.{k}": v.contiguous() for k, v in self.A.items()}
        tensors.update({f"G.{k}": v.contiguous() for k, v in self.G.items()})
        tensors.update({f"grad.{k}": v.contiguous() for k, v in self.grad.items()})
        meta = {"grad": list(self.grad), "a_key": self.a_key, "a_count": self.a_count, "g_count": self.g_count,
                "shapes": self.shapes, "info": self.info, "kind": self.kind.value,
                "fingerprints": self.fingerprints}
        save_file(tensors, str(path), metadata={"fisherlora": json.dumps(meta)})

    @classmethod
    def load(cls, path, device="cpu") -> FisherStatistics:
        """Read a file written by :meth:`save`; raises ``ValueError`` for another kind of file."""
        from safetensors import SafetensorError, safe_open

        if not Path(path).is_file():
            raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                raw = (f.metadata() or {}).get("fisherlora")
                if raw is None:
                    raise ValueError(f"{path} is not a fisherlora statistics file (no 'fisherlora' metadata)")
                meta = json.loads(raw)
                A = {k: f.get_tensor(f"A.{k}") for k in meta["a_count"]}
                G = {k: f.get_tensor(f"G.{k}") for k in meta["g_count"]}
                grad = {k: f.get_tensor(f"grad.{k}") for k in meta.get("grad", [])}
        except SafetensorError as exc:
            raise ValueError(f"{str(path)!r} is not a complete fisherlora statistics file: {exc}") from exc
        shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
        info = meta["info"]
        # files written before fingerprints were their own field kept them in info
        fingerprints = meta.get("fingerprints", info.pop("weight_fingerprints", {}))
        return cls(A, G, meta["a_key"], meta["a_count"], meta["g_count"], shapes, info,
                   meta.get("kind", "full"), fingerprints, grad)
