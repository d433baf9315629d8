"""Kernel benchmarks of the curvature ops and the weight gradient, provider by provider (pytest-benchmark).

    pytest bench/test_bench_ops.py --benchmark-only --benchmark-json=bench/out/ops.json

Providers: ``naive`` (``x[mask].float().T @ x[mask].float()``, ``((M @ Q) * Q).sum(0)``,
``(x[mask].float() @ Q.float()).square().sum(0)``, ``g[mask].float().T @ a[mask].float()``), then
``torch``, ``triton`` and ``ext`` through ``backend=``; a provider unavailable on the device is skipped. The device is
synchronised inside the timed call. ``extra_info`` holds the shape, the FLOPs counted (SYRK:
``T·d²`` with ``T`` every row the kernel walks, masked or not; the gradient: ``2·T·d_out·d_in``;
its ``d`` is the dispatch table's key, :func:`fisherlora.ops.table.gradient_width`), the achieved TFLOP/s at the median,
and the peak memory one call allocates beyond its inputs (measured once, outside the timing).

Shapes: on CUDA the Llama-3-8B ones (``d`` in {1024, 4096, 14336}, 16,384 tokens, bf16); on CPU
issue 4's (``d=2048``, 4,096 tokens, half of them masked, bf16 and fp32). ``FISHERLORA_BENCH_QUICK=1``
shrinks everything to toy sizes (the smoke test in ``tests/`` runs that).
"""

from __future__ import annotations

import pytest
import torch

from bench import common
from fisherlora import ops, testing
from fisherlora.ops import table

DEVICE = common.pick_device()
PROVIDERS = ("naive", "torch", "triton", "ext")


def _rounds() -> int:
    return 2 if common.quick() else (20 if DEVICE.type == "cuda" else 3)


# (d, tokens, dtype, mask_frac, layout) per device
if common.quick():
    SYRK_SHAPES = [(48, 64, torch.bfloat16, 0.5, "dense"), (48, 64, torch.float32, 0.0, "packed")]
elif DEVICE.type == "cuda":
    SYRK_SHAPES = [(d, 16384, torch.bfloat16, 0.0, "dense") for d in (1024, 4096, 14336)] + [
        (4096, 16384, torch.bfloat16, 0.5, "dense"),
        (4096, 16384, torch.bfloat16, 0.0, "packed"),
    ]
else:
    SYRK_SHAPES = [(2048, 4096, dt, 0.5, "dense") for dt in (torch.bfloat16, torch.float32)]

# (d, k, q_dtype, layout): k = min(d, 4096), as for the Llama-3-8B projections' SVD bases
if common.quick():
    ENERGY_SHAPES = [(48, 24, torch.float32, "dense"), (48, 24, torch.bfloat16, "packed")]
elif DEVICE.type == "cuda":
    ENERGY_SHAPES = [(d, min(d, 4096), torch.float32, "dense") for d in (1024, 4096, 14336)] + [
        (4096, 4096, torch.float32, "packed"),
    ]
else:
    ENERGY_SHAPES = [(2048, 2048, torch.float32, "dense")]

# (d, k, tokens, dtype, mask_frac): Q in the activations' dtype (U, V kept in bf16, docs/DESIGN.md §4)
if common.quick():
    PROJECTED_SHAPES = [(48, 24, 64, torch.bfloat16, 0.5)]
elif DEVICE.type == "cuda":
    PROJECTED_SHAPES = [(d, min(d, 4096), 16384, torch.bfloat16, 0.0) for d in (1024, 4096, 14336)]
else:
    PROJECTED_SHAPES = [(2048, 2048, 4096, dt, 0.5) for dt in (torch.bfloat16, torch.float32)]


# (d_out, d_in, tokens, dtype, mask_frac, transpose): the Llama-3-8B projections' weight gradients
# (q/o 4096x4096, gate/up 14336x4096, down 4096x14336); on CPU issue 4's width; transpose: Conv1D
if common.quick():
    GRADIENT_SHAPES = [(48, 40, 64, torch.bfloat16, 0.5, False), (40, 48, 64, torch.float32, 0.0, True)]
elif DEVICE.type == "cuda":
    GRADIENT_SHAPES = [(4096, 4096, 16384, torch.bfloat16, 0.0, False),
                       (14336, 4096, 16384, torch.bfloat16, 0.5, False),
                       (4096, 14336, 16384, torch.bfloat16, 0.0, False)]
else:
    GRADIENT_SHAPES = [(2048, 2048, 4096, torch.bfloat16, 0.5, False), (2048, 2048, 4096, torch.float32, 0.5, True)]


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _require(provider: str) -> None:
    if provider != "naive" and provider not in ops.available_backends(DEVICE):
        pytest.skip(f"provider {provider!r} unavailable on {DEVICE.type}")


def _run(benchmark, fn, flops: float, info: dict) -> None:
    """Time ``fn`` (synchronised inside), then record peak memory and TFLOP/s in extra_info."""
    def timed():
        fn()
        common.synchronize(DEVICE)

    timed()  # warm-up outside the statistics: compilation, autotuning, allocator growth
    peak, method = testing.peak_memory(fn, DEVICE)
    benchmark.extra_info.update(info, device=str(DEVICE), flops=flops, peak_mem_bytes=peak,
                                peak_mem_method=method)
    benchmark.pedantic(timed, rounds=_rounds(), warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None with --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_s"] = median
        benchmark.extra_info["tflops"] = flops / median / 1e12 if median > 0 else None


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SYRK_SHAPES, ids=lambda s: f"d{s[0]}-T{s[1]}-{_dt(s[2])}-mask{s[3]}-{s[4]}")
def test_syrk_accumulate(benchmark, shape, provider):
    d, tokens, dtype, mask_frac, layout = shape
    _require(provider)
    if provider == "naive" and layout == "packed":
        pytest.skip("naive forms the dense product; compare packed providers with each other")
    x, mask = common.tokens_input(tokens, d, dtype, mask_frac, DEVICE)
    acc = torch.zeros((d, d) if layout == "dense" else (ops.packed_size(d),), device=DEVICE)
    benchmark.group = f"syrk-d{d}-{_dt(dtype)}-mask{mask_frac}-{layout}"

    if provider == "naive":
        def fn():
            rows = x.reshape(-1, d) if mask is None else x.reshape(-1, d)[mask.reshape(-1)]
            xm = rows.float()
            acc.add_(xm.T @ xm)
    else:
        def fn():
            ops.syrk_accumulate_(acc, x, mask, backend=provider)

    _run(benchmark, fn, common.syrk_flops(x[..., 0].numel(), d),
         dict(op="syrk_accumulate_", provider=provider, d=d, tokens=tokens, dtype=_dt(dtype),
              mask_frac=mask_frac, layout=layout))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", ENERGY_SHAPES, ids=lambda s: f"d{s[0]}-k{s[1]}-Q{_dt(s[2])}-{s[3]}")
def test_fisher_energy(benchmark, shape, provider):
    d, k, q_dtype, layout = shape
    _require(provider)
    if provider == "naive" and layout == "packed":
        pytest.skip("naive reads a dense M")
    M = common.spd_factor(d, DEVICE, packed=layout == "packed")
    Q = common.directions(d, k, q_dtype, DEVICE)
    benchmark.group = f"energy-d{d}-k{k}-Q{_dt(q_dtype)}-{layout}"
    if provider == "naive":
        def fn():
            Qf = Q.float()
            return ((M @ Qf) * Qf).sum(0)
    else:
        def fn():
            return ops.fisher_energy(M, Q, backend=provider)
    _run(benchmark, fn, common.energy_flops(d, k),
         dict(op="fisher_energy", provider=provider, d=d, k=k, q_dtype=_dt(q_dtype), layout=layout))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", PROJECTED_SHAPES,
                         ids=lambda s: f"d{s[0]}-k{s[1]}-T{s[2]}-{_dt(s[3])}-mask{s[4]}")
def test_projected_sq_accumulate(benchmark, shape, provider):
    d, k, tokens, dtype, mask_frac = shape
    _require(provider)
    x, mask = common.tokens_input(tokens, d, dtype, mask_frac, DEVICE)
    Q = common.directions(d, k, dtype, DEVICE)
    acc = torch.zeros(k, device=DEVICE)
    benchmark.group = f"projected-d{d}-k{k}-{_dt(dtype)}-mask{mask_frac}"
    if provider == "naive":
        def fn():
            xm = x.reshape(-1, d) if mask is None else x.reshape(-1, d)[mask.reshape(-1)]
            acc.add_((xm.float() @ Q.float()).square().sum(0))
    else:
        def fn():
            ops.projected_sq_accumulate_(acc, x, Q, mask, backend=provider)
    _run(benchmark, fn, common.projected_flops(x[..., 0].numel(), d, k),
         dict(op="projected_sq_accumulate_", provider=provider, d=d, k=k, tokens=tokens, dtype=_dt(dtype),
              mask_frac=mask_frac))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", GRADIENT_SHAPES,
                         ids=lambda s: f"o{s[0]}-i{s[1]}-T{s[2]}-{_dt(s[3])}-mask{s[4]}{'-transpose' * s[5]}")
def test_gradient_accumulate(benchmark, shape, provider):
    d_out, d_in, tokens, dtype, mask_frac, transpose = shape
    _require(provider)
    if provider != "naive" and provider not in ops.available_backends(DEVICE, "gradient_accumulate_"):
        pytest.skip(f"provider {provider!r} has no gradient_accumulate_ (a stale extension?)")
    g, mask = common.tokens_input(tokens, d_out, dtype, mask_frac, DEVICE)
    a, _ = common.tokens_input(tokens, d_in, dtype, 0.0, DEVICE, seed=1)
    if mask is not None:
        a.masked_fill_(~mask.unsqueeze(-1), float("nan"))  # padding in both: never read
    acc = torch.zeros((d_in, d_out) if transpose else (d_out, d_in), device=DEVICE)
    layout = "transposed" if transpose else "dense"
    benchmark.group = f"gradient-o{d_out}-i{d_in}-{_dt(dtype)}-mask{mask_frac}-{layout}"
    if provider == "naive":
        def fn():
            gm, am = g.reshape(-1, d_out), a.reshape(-1, d_in)
            if mask is not None:
                gm, am = gm[mask.reshape(-1)], am[mask.reshape(-1)]
            gm, am = gm.float(), am.float()
            acc.add_(am.T @ gm if transpose else gm.T @ am)
    else:
        def fn():
            ops.gradient_accumulate_(acc, g, a, mask, transpose=transpose, backend=provider)
    _run(benchmark, fn, 2.0 * g[..., 0].numel() * d_out * d_in,
         dict(op="gradient_accumulate_", provider=provider, d=table.gradient_width(d_out, d_in), d_out=d_out,
              d_in=d_in, tokens=tokens, dtype=_dt(dtype), mask_frac=mask_frac, layout=layout))
