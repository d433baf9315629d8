"""``fisherlora init``: read the data and the model, run the initialisation, write the output directory."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

from fisherlora.commands.report import print_summary
from fisherlora.flags import config_from_args

__all__ = ["SUMMARY_PHASE", "run"]

#: the last phase of ``init``: the output directory is written by then
SUMMARY_PHASE = "printing the summary"


def run(args) -> int:
    import torch

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    from fisherlora import data as fdata
    from fisherlora import distributed
    from fisherlora.adapter import residual_refusal
    from fisherlora.card import portable_name
    from fisherlora.initialize import initialize_fisher_lora
    from fisherlora.memory import peak_memory_mb
    from fisherlora.outdir import check_output_dir
    from fisherlora.phases import phase
    from fisherlora.quant import bitsandbytes_config
    from fisherlora.statistics import FisherStatistics

    # everything that can be checked without the model is checked before loading it
    config = config_from_args(args)
    out_dir = check_output_dir(args.output, overwrite=args.overwrite)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}: this torch has no CUDA device")
    device = distributed.join_from_env(device)  # under torchrun / accelerate launch (docs/DESIGN.md §7)
    from fisherlora.ops import available_backends

    if config.backend != "auto" and config.backend not in available_backends(device):
        raise ValueError(f"--backend {config.backend!r} is not available on {device.type} here; "
                         f"available: {available_backends(device)}")
    auto_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = auto_dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    bnb_config = bitsandbytes_config(args, dtype)  # a GGUF model refused here, before any work (§8)
    if args.save_residual and bnb_config is not None:
        raise ValueError(residual_refusal(quantised=f"--load-in-{8 if bnb_config.load_in_8bit else 4}bit"))
    timings = {}
    t0 = time.perf_counter()
    stats, records, batches, n_seq = None, None, None, None
    with phase("reading the calibration data" if not args.statistics else "reading the statistics"):
        if args.statistics:
            stats = FisherStatistics.load(args.statistics, device=device)
        else:
            records = fdata.load_records(args.data, num_samples=config.num_samples, seed=config.seed,
                                         prompt_field=args.prompt_field, response_field=args.response_field,
                                         text_field=args.text_field)
    timings["data"] = time.perf_counter() - t0
    with phase("checking the targets on the model's config"):
        targets = _check_targets_on_config(args.model, config)
        if stats is not None:
            _check_statistics_cover(stats, targets, args.statistics)
    t0 = time.perf_counter()
    # --quiet also hides the bars that libraries draw with tqdm directly (GGUF de-quantisation);
    # errors still raise
    with phase(f"loading the model ({str(dtype).removeprefix('torch.')} on {device})"), \
            contextlib.redirect_stderr(io.StringIO()) if args.quiet else contextlib.nullcontext():
        model, tok = fdata.load_model_and_tokenizer(args.model, dtype=dtype, device=device,
                                                    quantization_config=bnb_config)
    timings["load model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if records is not None:
        with phase("tokenising the calibration data"):
            cal = fdata.tokenize_records(records, tok, max_length=config.max_length, prompt_field=args.prompt_field,
                                         response_field=args.response_field, text_field=args.text_field)
            # a list: each layer group makes its own pass over the same batches
            # under N ranks a batch of N·batch_size sequences gives each rank batch_size (docs/DESIGN.md §7)
            per_batch = config.batch_size * distributed.world()
            batches, n_seq = list(fdata.calibration_batches(cal, tok, per_batch)), len(cal)
    timings["data"] += time.perf_counter() - t0
    with phase(f"the initialisation (memory_mode={config.memory_mode.value})"):
        result = initialize_fisher_lora(model, None, batches, config, statistics=stats, num_batches=n_seq,
                                        progress=not args.quiet and distributed.is_rank0())
    result.timings = {**timings, **result.timings}
    # the calibration data, also when re-selecting from saved statistics (they record it)
    data = stats.info.get("data") if stats is not None else portable_name(args.data)
    result.statistics.info["data"] = data
    result.extra.update({"model": str(args.model), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                         "data": data or f"{Path(args.statistics).name} (calibration data not recorded)"})
    result.peak_memory_mb = peak_memory_mb(device)
    with phase(f"writing the output directory {str(out_dir)!r}"):
        result.save(out_dir, overwrite=args.overwrite, save_statistics=args.save_statistics,
                    residual=args.save_residual, tokenizer=tok)
    with phase(SUMMARY_PHASE):
        if distributed.is_rank0():
            print_summary(result.report(), out_dir)
    return 0


def _check_statistics_cover(stats, targets: list[str] | None, path: str) -> None:
    """Refuse, before the model is loaded, statistics that hold no factors for some of the targets
    (found on the model's config), naming what the file holds and the flags that select it.

    Raises:
        ValueError: targets without factors in ``stats``.
    """
    if targets is None:  # no meta model: the initialisation checks the layers it gets
        return
    missing = [n for n in targets if n not in stats.G]
    if not missing:
        return
    held = sorted({n.rsplit(".", 1)[-1] for n in stats.layers})
    raise ValueError(f"--statistics {path}: the file holds factors for {len(stats.layers)} layers ({','.join(held)}; "
                     f"memory mode {stats.kind.value}) and none for {len(missing)} of the {len(targets)} targets, "
                     f"e.g. {missing[0]!r}; select within it with --target-modules {','.join(held)}, or collect new "
                     "statistics for these targets (without --statistics)")


def _check_targets_on_config(model: str, config) -> list[str] | None:
    """Refuse bad targets and ranks before the weights are loaded: the target discovery and the
    rank check that the initialisation runs, on the model built from its config on the meta device
    (:func:`fisherlora.models.meta_model_from_config`: no weights, about a second). A model whose
    config cannot be built that way is left to the load, which reports its own error.

    Returns:
        the names of the target layers, or ``None`` when the config cannot be built that way.

    Raises:
        ValueError: the targets match nothing (or a non-linear layer), or a rank exceeds a layer's.
    """
    from fisherlora.layers import check_ranks, find_target_modules, layer_shape, ranks_and_scalings
    from fisherlora.models import meta_model_from_config

    try:
        meta = meta_model_from_config(model)
    except Exception:  # a missing path, a config transformers cannot build without its code: the load says
        return None
    lora_config = config.to_lora_config()
    modules = find_target_modules(meta, lora_config)
    check_ranks({n: layer_shape(m) for n, m in modules.items()},
                {n: r for n, (r, _) in ranks_and_scalings(lora_config, list(modules)).items()})
    return list(modules)


