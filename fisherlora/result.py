"""The result of an initialisation: the PEFT model with its selections, statistics and timings,
its JSON report, and the output directory it saves.

On disk an initialisation is a standard PEFT adapter directory plus a few files of ours::

    out/
      adapter_config.json, adapter_model.safetensors   the initial adapter (B0, A0), PEFT format
      README.md              the model card (fisherlora.card: how it was made, how to load, train, convert)
      fisherlora.json        what the residual needs: config, scalings, base-weight fingerprints
      report.json, report.md, energy.png
      statistics.safetensors (optional) the K-FAC factors, to re-run selection without new passes
      residual/              (optional) the residual base model W_res, for plain-PEFT users
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from fisherlora import __version__, sharded
from fisherlora.adapter import LINEAGE_TAG, initial_adapter_id, residual_refusal_for, save_residual_model
from fisherlora.card import finish_adapter_config, model_card
from fisherlora.config import FisherLoraConfig
from fisherlora.decompose import LayerSelection
from fisherlora.distributed import on_rank0
from fisherlora.outdir import MARKER_FILE, atomic_output_dir
from fisherlora.statistics import FisherStatistics

__all__ = ["FisherLoraResult"]


@dataclass
class FisherLoraResult:
    """An initialised model and everything needed to save and report it."""

    model: object  # peft.PeftModel
    statistics: FisherStatistics
    selections: dict[str, LayerSelection]
    config: FisherLoraConfig
    fingerprints: dict[str, dict]
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    extra: dict = field(default_factory=dict)
    lora_config: object = None  # the peft.LoraConfig applied
    process_group: object = field(default=None, repr=False)  # a fisherlora.distributed.Dist: rank 0 saves

    def applied_config(self) -> dict:
        """What was done, JSON-ready: :attr:`config` with the LoRA shape of the ``LoraConfig``
        actually applied (rank, alpha, rsLoRA, targets, patterns), the memory mode and layer
        groups actually run (``auto`` resolved), and the calibration set actually seen (sequences,
        the largest batch, the longest sequence in tokens) in place of the config's data fields."""
        out = self.config.to_dict()
        lc = self.lora_config
        if lc is not None:
            targets = lc.target_modules
            out.update(rank=lc.r, alpha=lc.lora_alpha, use_rslora=lc.use_rslora,
                       target_modules=targets if isinstance(targets, str) else sorted(targets))
            if lc.rank_pattern or lc.alpha_pattern:
                out.update(rank_pattern=dict(lc.rank_pattern), alpha_pattern=dict(lc.alpha_pattern))
        for key in ("memory_mode", "layer_groups"):
            if key in self.extra:
                out[key] = self.extra[key]
        cal = self.statistics.info.get("calibration", {})
        if cal.get("sequences"):
            out.update(num_samples=cal["sequences"], batch_size=cal.get("max_batch_size", out["batch_size"]),
                       max_length=cal.get("max_sequence_length", out["max_length"]))
        return out

    def names(self) -> dict:
        """``model``, ``data`` and ``dtype`` of the run, with no path of this machine
        (:func:`fisherlora.card.portable_name`): the model as the command was given it, else the
        base's ``name_or_path``; the data as given (``None`` for batches passed from Python); the
        base weights' dtype."""
        from fisherlora.card import portable_name
        from fisherlora.models import loaded_from

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        dtype = self.extra.get("dtype") or str(next(base.parameters()).dtype).removeprefix("torch.")
        source = self.extra.get("model") or loaded_from(base) or getattr(base, "name_or_path", None)
        return {"model": portable_name(source),
                "data": portable_name(self.extra.get("data")), "dtype": dtype}

    def report(self) -> dict:
        """JSON-ready report: config, totals, timings, memory and one entry per layer."""
        layers = [s.to_dict() for s in self.selections.values()]
        for entry in layers:
            key = self.statistics.a_key[entry["name"]]
            sel = self.selections[entry["name"]]
            total = float(sel.energy.sum())
            entry.update(a_factor=key, tokens_A=self.statistics.a_count[key],
                         tokens_G=self.statistics.g_count[entry["name"]],
                         # the yardsticks of energy_captured: PiSSA's top-r σ, and a random choice (r/k)
                         pissa_energy_captured=float(sel.energy[: sel.rank].sum()) / total if total > 0 else 0.0,
                         random_share=sel.rank / len(sel.sigma))
        n = max(len(layers), 1)
        return {
            "fisherlora_version": __version__,
            "config": self.applied_config(),
            "num_layers": len(layers),
            "mean_energy_captured": sum(e["energy_captured"] for e in layers) / n,
            "mean_score_captured": sum(e["score_captured"] for e in layers) / n,
            "mean_pissa_overlap": sum(e["pissa_overlap"] for e in layers) / n,
            "mean_pissa_energy_captured": sum(e["pissa_energy_captured"] for e in layers) / n,
            "mean_random_share": sum(e["random_share"] for e in layers) / n,
            "calibration": self.statistics.info.get("calibration", {}),
            "timings_s": self.timings,
            "peak_memory_mb": self.peak_memory_mb,
            **self.extra,
            **self.names(),
            "layers": layers,
        }

    def save(self, out_dir, *, overwrite: bool = False, save_statistics: bool = False,
             residual: bool = False, tokenizer=None) -> Path:
        """Write the adapter directory (module docstring), atomically
        (:func:`fisherlora.outdir.atomic_output_dir`).

        Everything is written to a new sibling directory renamed into place at the end, so a
        failure leaves nothing behind; the files get the umask's permissions. ``out_dir`` may be
        a symbolic link to a directory (the output goes there).

        Returns:
            ``Path(out_dir)``.

        Raises:
            FileExistsError: ``out_dir`` exists and is not empty, without ``overwrite``; with
                ``overwrite``, it was not written by fisherlora; it is a file, holds the working
                directory, or is a symbolic link to nothing (checked before anything is written).
            ValueError: ``residual=True`` for a bitsandbytes-quantised or an FSDP2-sharded model
                (:func:`fisherlora.adapter.residual_refusal`), before anything is written.
            :class:`fisherlora.distributed.RankFailedError`: in a distributed run, on every rank,
                when rank 0 (the only one that writes) failed.
        """
        adapter_state = None
        refusal = residual_refusal_for(self.model) if residual else None
        if refusal:
            raise ValueError(refusal)
        if sharded.model_is_sharded(self.model):  # FSDP2: the factors gathered on every rank (§7)
            adapter_state = sharded.full_state_dict({k: v for k, v in self.model.state_dict().items() if "lora_" in k})
        write = partial(self._write, out_dir, overwrite=overwrite, save_statistics=save_statistics, residual=residual,
                        tokenizer=tokenizer, adapter_state=adapter_state)
        if self.process_group is not None:  # rank 0 writes, the others wait and share its outcome (§7)
            return on_rank0(self.process_group, f"saving {str(out_dir)!r} on rank 0", write)
        return write()

    def _write(self, out_dir, *, overwrite, save_statistics, residual, tokenizer, adapter_state=None) -> Path:
        from fisherlora.report import write_report

        if save_statistics and not self.statistics.G:
            raise ValueError("the statistics were freed (keep_statistics=False): nothing to save")
        t0 = time.perf_counter()
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            # the adapter only: PEFT's default would also save a targeted output head's BASE weight
            # (save_embedding_layers="auto"), which then overwrites the base when loaded
            self.model.save_pretrained(tmp, save_embedding_layers=False, state_dict=adapter_state)
            names = self.names()
            finish_adapter_config(tmp, names["model"])
            meta = {"fisherlora_version": __version__, "config": self.applied_config(),
                    "base_model": names["model"], "data": names["data"], "dtype": names["dtype"],
                    "layers": {n: {"a_factor": self.statistics.a_key[n]} for n in self.selections},
                    "base_weight_fingerprints": self.fingerprints}
            (tmp / MARKER_FILE).write_text(json.dumps(meta, indent=1))
            if save_statistics:
                self.statistics.save(tmp / "statistics.safetensors")
            if residual:
                save_residual_model(self.model, tmp / "residual", tokenizer=tokenizer)
            self.timings["save"] = time.perf_counter() - t0
            report = self.report()
            write_report(report, self.selections, tmp)
            # fisherlora's model card in place of PEFT's (which names the base by its local path)
            (tmp / "README.md").write_text(model_card(report, names["model"], names["data"], names["dtype"],
                                                      tags=(LINEAGE_TAG + initial_adapter_id(tmp),)))
        return Path(out_dir)
