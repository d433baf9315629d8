"""Which exact SVD path to use for many weight matrices: time and accuracy side by side.

Paths, each on ``n`` matrices of one shape (float32 in, float64 as the accuracy reference):

- ``loop``: ``torch.linalg.svd`` one matrix at a time;
- ``batched``: one ``torch.linalg.svd`` call on the stacked ``(n, d_out, d_in)`` batch
  (``iter_thin_svd(method="svd")``);
- ``gram_eigh``: ``eigh`` of the Gram matrix ``WᵀW`` (or ``WWᵀ``), ``σ = √λ``, the other side
  recovered as ``W v / σ``; ``gram_eigh64``: the same in float64, what
  :func:`fisherlora.svd.iter_thin_svd` uses on CPUs and GPUs (chosen by this script);
- on CUDA also ``gesvd`` and ``gesvdj``: the batched call with cuSOLVER's QR or Jacobi driver
  named (``batched`` leaves the choice to torch).

Accuracy: the largest relative error of the singular values, and of the *smallest* singular
directions (``1 − |⟨u_i, u_i^ref⟩|`` over the 16 smallest), which Fisher energy may select: the
Gram path squares the condition number, so it loses exactly those. The float64 reference SVD is
taken on the CPU, which at Llama-3-8B shapes costs minutes, so on CUDA (``--no-reference``, the
default there) the accuracy columns are the residual ``‖W − U diag(σ) Vᵀ‖ / ‖W‖`` and the loss of
orthogonality ``max |UᵀU − I|`` instead, which any converged solver keeps near float32 rounding.
Each row is written to the JSON as soon as it is measured, so a run stopped at its time limit
keeps what it finished.

    python -m bench.svd_paths [--quick] [--device cuda] [--out bench/out/svd]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench import common
from fisherlora.svd import svd_gram_eigh

CPU_SHAPES = [(576, 576, 8), (192, 576, 8), (1536, 576, 8), (576, 1536, 8)]  # SmolLM2-135M projections
GPU_SHAPES = [(4096, 4096, 2), (1024, 4096, 4), (14336, 4096, 2), (4096, 14336, 2)]  # Llama-3-8B
QUICK_SHAPES = [(48, 32, 4), (32, 48, 4)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop(W):
    outs = [torch.linalg.svd(w, full_matrices=False) for w in W]
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs])


def batched(W):
    return torch.linalg.svd(W, full_matrices=False)


def gram_eigh(W):
    """The Gram path in float32: shows what squaring the condition number costs."""
    return svd_gram_eigh(W, dtype=torch.float32)


def gram_eigh64(W):
    """fisherlora's Gram path (float64), :func:`fisherlora.svd.svd_gram_eigh`."""
    return svd_gram_eigh(W)


PATHS = {"loop": loop, "batched": batched, "gram_eigh": gram_eigh, "gram_eigh64": gram_eigh64}
CUDA_PATHS = {
    "batched": batched,
    "gesvd": lambda W: torch.linalg.svd(W, full_matrices=False, driver="gesvd"),
    "gesvdj": lambda W: torch.linalg.svd(W, full_matrices=False, driver="gesvdj"),
    "gram_eigh": gram_eigh,
    "gram_eigh64": gram_eigh64,
}


def measure(shape, device, repeats=3, seed=0, reference=True, on_row=None):
    d_out, d_in, n = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    # weights with a realistic spread of singular values (a decaying spectrum down to ~1e-4)
    k = min(d_out, d_in)
    # built on the device (float64 QR of 14336×4096 takes seconds on a CPU)
    U0, _ = torch.linalg.qr(torch.randn(n, d_out, k, generator=g, dtype=torch.float64).to(device))
    V0, _ = torch.linalg.qr(torch.randn(n, d_in, k, generator=g, dtype=torch.float64).to(device))
    S0 = torch.logspace(0, -4, k, dtype=torch.float64, device=device)
    W = ((U0 * S0) @ V0.mT).float()
    del U0, V0
    if reference:
        ref_U, ref_S, _ = torch.linalg.svd(W.double().cpu(), full_matrices=False)
    rows = []
    for name, fn in (CUDA_PATHS if device.type == "cuda" else PATHS).items():
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            U, S, Vh = fn(W)
            _sync(device)
            times.append(time.perf_counter() - t0)
        recon = (U * S.unsqueeze(-2).to(U.dtype)) @ Vh
        resid = (torch.linalg.matrix_norm(recon.double() - W.double()) / torch.linalg.matrix_norm(W.double())).max()
        eye = torch.eye(k, device=U.device, dtype=torch.float64)
        orth = (U.double().mT @ U.double() - eye).abs().max()
        row = {"shape": f"{d_out}x{d_in}", "n": n, "path": name, "median_s": sorted(times)[len(times) // 2],
               "residual": resid.item(), "orthogonality_loss": orth.item(),
               "sigma_rel_err": None, "smallest_dirs_err": None}
        if reference:
            U, S = U.double().cpu(), S.double().cpu()
            row["sigma_rel_err"] = ((S - ref_S).abs().max() / ref_S.max()).item()
            small = slice(k - min(16, k), k)
            row["smallest_dirs_err"] = (1 - (U[..., small] * ref_U[..., small]).sum(-2).abs()).max().item()
        del U, S, Vh, recon
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", default=common.quick(),
                   help=f"toy shapes (seconds; also when {common.QUICK_ENV}=1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/out/svd")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per path (default 3; 2 on CUDA)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                   help="float64 CPU reference SVD for the accuracy columns (default: on, except on CUDA)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    reference = device.type != "cuda" if args.reference is None else args.reference
    repeats = args.repeats or (1 if args.quick else (2 if device.type == "cuda" else 3))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    def save(row):
        print(json.dumps(row), flush=True)
        (out / "svd_paths.json").write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                                                        "rows": rows + [row]}, indent=1))

    if device.type == "cuda":  # cuSOLVER handle and workspace creation stay out of the timings
        for fn in CUDA_PATHS.values():
            fn(torch.randn(64, 64, device=device))
    for shape in shapes:
        rows += measure(shape, device, repeats=repeats, reference=reference, on_row=save)

    def fmt(x):
        return "n/a" if x is None else f"{x:.1e}"

    header = ["shape", "n", "path", "median s", "× batched", "residual", "orthogonality loss", "σ rel. err",
              "smallest-direction err"]
    table = []
    for r in rows:
        base = next(x for x in rows if x["shape"] == r["shape"] and x["path"] == "batched")["median_s"]
        table.append([r["shape"], r["n"], r["path"], f"{r['median_s']:.4f}", f"{r['median_s'] / base:.2f}",
                      fmt(r["residual"]), fmt(r["orthogonality_loss"]), fmt(r["sigma_rel_err"]),
                      fmt(r["smallest_dirs_err"])])
    print(common.write_markdown_table(out / "svd_paths.md", header, table), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
