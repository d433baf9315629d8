// The tensor-core paths of the CUDA ops (cuda/gemm_cuda.cu; docs/DESIGN.md §11), called by the
// ATen glue (cuda/curvature_cuda.cu) after its checks. Each returns false, having done nothing,
// when the arguments are not its case (a float64 accumulator, a packed M for the energy, a torch
// without out_dtype matrix products): the glue then runs the FMA kernels of kernels.cu.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fisherlora {
namespace cuda {

// Device int64 element offsets of every row of x (..., d), in flat token order (8 bytes a token).
at::Tensor row_offsets(const at::Tensor& x);

// acc (float32, dense (d, d) or packed) += scale * x_mᵀ x_m by block rows of the upper triangle:
// cuBLAS products with bf16/fp16 (tensor cores) or float32 inputs and float32 accumulation.
bool syrk_gemm(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale);

// diag(Qᵀ M Q) for a dense float32 M as column sums of Q ∘ (M Q), Q's columns in chunks.
bool energy_gemm(const at::Tensor& M, const at::Tensor& Q, at::Tensor& out);

// acc (float32) += Σ_t (Qᵀ x_t)² as row chunks of x Q (tensor cores when x and Q share a 16-bit dtype).
bool projected_gemm(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& Q,
                    const std::optional<at::Tensor>& mask);

// acc (float32, (d_out, d_in) row-major) += scale * g_mᵀ a_m as cuBLAS products over token chunks,
// in block rows of acc bounded by the workspace: tensor cores when g and a share a 16-bit dtype,
// float32 products (chunks gathered into float32) when their dtypes differ or either is float32.
bool gradient_gemm(const at::Tensor& acc, const at::Tensor& g, const at::Tensor& a,
                   const std::optional<at::Tensor>& mask, double scale);

}  // namespace cuda
}  // namespace fisherlora
