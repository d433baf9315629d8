// CUDA implementations of the fisherlora_ext ops: input checks (TORCH_CHECK), a device guard, then
// the tensor-core paths of gemm_cuda.cu where they apply (float32 accumulators), else the kept-row
// offsets and the FMA kernels of kernels.cu (through launch.h). Registered for the CUDA
// dispatch key; the op schemas are defined in bindings.cpp.
// Host code only: nvcc's device passes (one per architecture) see an empty file instead of
// parsing ATen's headers again, which halves this file's compile time.
#ifndef __CUDA_ARCH__
// Only the headers used (not ATen/ATen.h): keeps this file's nvcc compile short.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../curvature.h"
#include "gemm.h"
#include "launch.h"

namespace fisherlora {
namespace cuda {
namespace {

constexpr int64_t PROJ_Q_CHUNK = 512;  // columns of a low-precision Q converted at a time

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kHalf;
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    default: TORCH_CHECK(false, "fisherlora_ext: unsupported dtype ", t);
  }
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": expected ", name, " on a CUDA device, got ", t.device());
}

// Device int64 element offsets of the rows of x (..., d) that `mask` keeps, in flat token order:
// 8 bytes per token, never a copy of x. Masked-out rows are therefore never read. masked_select
// reads the kept count on the host (one synchronisation): only the FMA kernels use this, i.e.
// float64 accumulators; the tensor-core paths (gemm_cuda.cu) need no count.
at::Tensor kept_row_offsets(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  at::Tensor offsets = row_offsets(x);
  if (mask.has_value()) offsets = offsets.masked_select(mask->reshape({-1}).ne(0));
  return offsets.contiguous();
}

void syrk_accumulate_cuda(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                          double scale) {
  const char* op = "fisherlora_ext::syrk_accumulate_";
  check_syrk_args(acc, x, mask);
  check_cuda(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  if (syrk_gemm(acc, x, mask, scale)) return;
  const at::Tensor rows = kept_row_offsets(x, mask);
  launch_syrk(to_dtype(x.scalar_type()), to_dtype(acc.scalar_type()), x.const_data_ptr(),
              rows.const_data_ptr<int64_t>(), rows.numel(), x.size(-1), x.stride(-1), acc.data_ptr(),
              acc.dim() == 1, scale, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor fisher_energy_cuda(const at::Tensor& M, const at::Tensor& Q) {
  const char* op = "fisherlora_ext::fisher_energy";
  check_energy_args(M, Q);
  check_cuda(M, op, "M");
  const c10::cuda::CUDAGuard guard(M.device());
  const int64_t d = Q.size(0), k = Q.size(1);
  at::Tensor out = at::empty({k}, M.options());
  if (energy_gemm(M, Q, out)) return out;
  const at::Tensor Mc = M.contiguous();
  at::Tensor partial = at::empty({energy_partial_rows(d) * k}, M.options().dtype(at::kDouble));
  launch_energy(to_dtype(M.scalar_type()), to_dtype(Q.scalar_type()), Mc.const_data_ptr(), M.dim() == 1,
                Q.const_data_ptr(), d, k, Q.stride(0), Q.stride(1), partial.data_ptr<double>(), out.data_ptr(),
                c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void projected_sq_accumulate_cuda(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& Q,
                                  const std::optional<at::Tensor>& mask) {
  const char* op = "fisherlora_ext::projected_sq_accumulate_";
  check_projected_args(acc, x, Q, mask);
  check_cuda(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  if (projected_gemm(acc, x, Q, mask)) return;
  const at::Tensor rows = kept_row_offsets(x, mask);
  const int64_t n = rows.numel(), k = Q.size(1);
  if (n == 0 || k == 0) return;
  // Q in acc's dtype: as it is (any strides) when it already is, else converted 512 columns at a time
  const bool same = Q.scalar_type() == acc.scalar_type();
  const int64_t chunk = same ? k : PROJ_Q_CHUNK;
  at::Tensor partial = at::empty({projected_groups(n) * std::min(chunk, k)}, acc.options().dtype(at::kDouble));
  for (int64_t k0 = 0; k0 < k; k0 += chunk) {
    const int64_t nk = std::min(chunk, k - k0);
    const at::Tensor q = same ? Q.narrow(1, k0, nk) : Q.narrow(1, k0, nk).to(acc.scalar_type());
    launch_projected(to_dtype(x.scalar_type()), to_dtype(acc.scalar_type()), x.const_data_ptr(),
                     rows.const_data_ptr<int64_t>(), n, x.size(-1), x.stride(-1), q.const_data_ptr(), nk,
                     q.stride(0), q.stride(1), partial.data_ptr<double>(), acc.narrow(0, k0, nk).data_ptr(),
                     c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void gradient_accumulate_cuda(const at::Tensor& acc, const at::Tensor& g, const at::Tensor& a,
                              const std::optional<at::Tensor>& mask, double scale, bool transpose) {
  const char* op = "fisherlora_ext::gradient_accumulate_";
  check_gradient_args(acc, g, a, mask, transpose);
  check_cuda(g, op, "g");
  check_cuda(a, op, "a");
  const c10::cuda::CUDAGuard guard(g.device());
  // Σ_t a_t g_tᵀ (Conv1D's orientation) is the same product with the operands swapped
  const at::Tensor& left = transpose ? a : g;
  const at::Tensor& right = transpose ? g : a;
  if (gradient_gemm(acc, left, right, mask, scale)) return;
  const at::Tensor lrows = kept_row_offsets(left, mask);
  const at::Tensor rrows = kept_row_offsets(right, mask);
  launch_gradient(to_dtype(left.scalar_type()), to_dtype(right.scalar_type()), to_dtype(acc.scalar_type()),
                  left.const_data_ptr(), lrows.const_data_ptr<int64_t>(), left.stride(-1), right.const_data_ptr(),
                  rrows.const_data_ptr<int64_t>(), right.stride(-1), lrows.numel(), left.size(-1), right.size(-1),
                  acc.data_ptr(), scale, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda
}  // namespace fisherlora

TORCH_LIBRARY_IMPL(fisherlora_ext, CUDA, m) {
  m.impl("syrk_accumulate_", &fisherlora::cuda::syrk_accumulate_cuda);
  m.impl("fisher_energy", &fisherlora::cuda::fisher_energy_cuda);
  m.impl("projected_sq_accumulate_", &fisherlora::cuda::projected_sq_accumulate_cuda);
  m.impl("gradient_accumulate_", &fisherlora::cuda::gradient_accumulate_cuda);
}

#endif  // __CUDA_ARCH__
