// Tensor-core paths of the CUDA ops (docs/DESIGN.md §11): the products go to cuBLAS through
// ATen's `mm` with a float32 output (`out_dtype`, i.e. cublasGemmEx / cuBLASLt with bf16 or fp16
// inputs and float32 accumulation), and only the upper triangle's block rows of a
// SYRK are computed. Host code only (see curvature_cuda.cu): nvcc's device passes skip it.
//
// Masks cost no host synchronisation: no kept-row count is ever read. A masked or strided x is
// copied a chunk of rows at a time into a bounded workspace (WORKSPACE_BYTES), masked-out rows
// written as zeros without being read (kernels.cu: gather_rows), and every product runs over the
// whole chunk; zero rows add nothing. An unmasked x whose leading dims merge into one stride is
// read in place.
//
// The weight gradient (gradient_gemm) walks aligned chunks of the same tokens of g and a, each read
// in place or gathered into its own workspace (in float32 when their dtypes differ), and adds
// G[:, i0:i0+b]ᵀ A into block rows of acc through a float32 scratch.
//
// SYRK by block rows: for rows [i0, i0 + b) the product x[:, i0:i0+b]ᵀ x[:, i0:d] is added to
// acc[i0:i0+b, i0:d]. Multiply-adds per token: Σ b(d − i0) = d²/2 + d·b/2, i.e. (1 + b/d) times
// the d(d+1)/2 of the upper triangle (b = 256 up to d = 4096, else 512: at most 1.0625 at 4096,
// 1.036 at 14336). Each block row's product goes to a float32 scratch and is then added, scaled,
// into the accumulator (dense: one add; packed: an add kernel). cuBLAS's products are deterministic for
// fixed shapes, and the chunk partition depends on shapes only, so repeated calls agree bitwise.
#ifndef __CUDA_ARCH__
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/version.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "gemm.h"
#include "launch.h"

// aten::mm.dtype and mm.dtype_out (16-bit inputs, float32 output) exist from torch 2.9 on
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define FISHERLORA_HAS_OUT_DTYPE 1
#else
#define FISHERLORA_HAS_OUT_DTYPE 0
#endif

namespace fisherlora {
namespace cuda {
namespace {

constexpr int64_t WORKSPACE_BYTES = int64_t(64) << 20;  // one chunk of gathered rows (or of x Q)
constexpr int64_t MIN_CHUNK = 64;

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kHalf;
    case at::kFloat: return DType::kFloat;
    default: return DType::kDouble;
  }
}

bool is16(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

bool gemm_input(at::ScalarType t) { return is16(t) || t == at::kFloat; }

// The row stride of x (..., d) seen as (T, d) when its leading dims merge into one stride and its
// columns are contiguous; -1 otherwise (then rows are gathered).
int64_t flat_row_stride(const at::Tensor& x) {
  if (x.stride(-1) != 1) return -1;
  int64_t stride = -1, span = 1;  // span: elements covered by the dims merged so far, in strides
  for (int64_t i = x.dim() - 2; i >= 0; --i) {
    if (x.size(i) == 1) continue;
    if (stride < 0) {
      stride = x.stride(i);
      span = x.size(i) * stride;
    } else if (x.stride(i) == span) {
      span *= x.size(i);
    } else {
      return -1;
    }
  }
  const int64_t d = x.size(-1);
  return stride < 0 ? d : (stride >= d ? stride : -1);
}

// out (float32, contiguous) = a @ b, a and b of one float dtype. mm.dtype_out rather than
// addmm.dtype_out: some torch versions require addmm's `self` in the inputs' 16-bit dtype.
void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b);
  } else {
#if FISHERLORA_HAS_OUT_DTYPE
    at::mm_out(out, a, b, at::kFloat);
#else
    TORCH_CHECK(false, "fisherlora_ext: 16-bit products with a float32 output need torch >= 2.9");
#endif
  }
}

at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b) {
#if FISHERLORA_HAS_OUT_DTYPE
  return a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
#else
  TORCH_CHECK(a.scalar_type() == at::kFloat, "fisherlora_ext: 16-bit products with a float32 output need torch >= 2.9");
  return at::mm(a, b);
#endif
}

// Rows of x (..., d) as (T, d) chunks in `dtype`: views of x when it can be read in place, else
// gathered into one reused workspace (masked-out rows as zeros). Calls f(chunk) in token order.
template <typename F>
void for_each_row_chunk(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::ScalarType dtype,
                        int64_t extra_bytes_per_row, F&& f) {
  const int64_t d = x.size(-1), T = x.numel() / d;
  const int64_t rs = (!mask.has_value() && x.scalar_type() == dtype) ? flat_row_stride(x) : -1;
  const int64_t row_bytes = (rs >= 0 ? 0 : d * static_cast<int64_t>(c10::elementSize(dtype))) + extra_bytes_per_row;
  const int64_t chunk = std::min(T, std::max(MIN_CHUNK, WORKSPACE_BYTES / std::max<int64_t>(row_bytes, 1)));
  if (rs >= 0) {
    const at::Tensor flat = x.as_strided({T, d}, {rs, 1});
    for (int64_t t0 = 0; t0 < T; t0 += chunk) f(flat.narrow(0, t0, std::min(chunk, T - t0)));
    return;
  }
  const at::Tensor offsets = row_offsets(x);
  at::Tensor keep;
  if (mask.has_value()) keep = mask->reshape({-1}).ne(0).contiguous();
  at::Tensor ws = at::empty({chunk, d}, x.options().dtype(dtype));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t n = std::min(chunk, T - t0);
    launch_gather_rows(dtype_of(x.scalar_type()), dtype_of(dtype), x.const_data_ptr(),
                       offsets.const_data_ptr<int64_t>() + t0, keep.defined() ? keep.const_data_ptr<bool>() + t0 : nullptr,
                       n, d, x.stride(-1), ws.data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    f(ws.narrow(0, 0, n));
  }
}

// How rows of x (..., d) are read as (T, d) in `dtype`: in place (row stride >= 0) when unmasked,
// already of that dtype and its leading dims merge; else gathered a chunk at a time.
int64_t in_place_row_stride(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::ScalarType dtype) {
  return (!mask.has_value() && x.scalar_type() == dtype) ? flat_row_stride(x) : -1;
}

// The same tokens of g (..., d_out) and a (..., d_in) as aligned (n, d_out), (n, d_in) chunks in
// `dtype`, each a view or gathered into its own reused workspace (masked-out rows as zeros, never
// read); calls f(G, A) in token order. Chunks are sized so that the gathered rows fit the workspace.
template <typename F>
void for_each_pair_chunk(const at::Tensor& g, const at::Tensor& a, const std::optional<at::Tensor>& mask,
                         at::ScalarType dtype, F&& f) {
  const int64_t d_out = g.size(-1), d_in = a.size(-1), T = g.numel() / d_out;
  const int64_t rg = in_place_row_stride(g, mask, dtype), ra = in_place_row_stride(a, mask, dtype);
  const int64_t es = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t row_bytes = (rg >= 0 ? 0 : d_out * es) + (ra >= 0 ? 0 : d_in * es);
  const int64_t chunk = row_bytes == 0 ? T : std::min(T, std::max(MIN_CHUNK, WORKSPACE_BYTES / row_bytes));
  at::Tensor keep, goff, aoff, gws, aws;
  if (mask.has_value()) keep = mask->reshape({-1}).ne(0).contiguous();
  if (rg < 0) {
    goff = row_offsets(g);
    gws = at::empty({chunk, d_out}, g.options().dtype(dtype));
  }
  if (ra < 0) {
    aoff = row_offsets(a);
    aws = at::empty({chunk, d_in}, a.options().dtype(dtype));
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto rows_of = [&](const at::Tensor& x, int64_t rs, const at::Tensor& off, at::Tensor& ws, int64_t t0,
                     int64_t n) -> at::Tensor {
    const int64_t d = x.size(-1);
    if (rs >= 0) return x.as_strided({T, d}, {rs, 1}).narrow(0, t0, n);
    launch_gather_rows(dtype_of(x.scalar_type()), dtype_of(dtype), x.const_data_ptr(),
                       off.const_data_ptr<int64_t>() + t0, keep.defined() ? keep.const_data_ptr<bool>() + t0 : nullptr,
                       n, d, x.stride(-1), ws.data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return ws.narrow(0, 0, n);
  };
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t n = std::min(chunk, T - t0);
    f(rows_of(g, rg, goff, gws, t0, n), rows_of(a, ra, aoff, aws, t0, n));
  }
}

}  // namespace

at::Tensor row_offsets(const at::Tensor& x) {
  const auto opts = x.options().dtype(at::kLong);
  const int64_t nd = x.dim() - 1;
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().begin() + nd);
  at::Tensor offsets = at::zeros(lead, opts);
  for (int64_t i = 0; i < nd; ++i) {
    std::vector<int64_t> shape(nd, 1);
    shape[i] = x.size(i);
    offsets = offsets.add(at::arange(x.size(i), opts).mul_(x.stride(i)).view(shape));
  }
  return offsets.reshape({-1}).contiguous();
}

bool syrk_gemm(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale) {
  if (acc.scalar_type() != at::kFloat || !gemm_input(x.scalar_type())) return false;
  if (!FISHERLORA_HAS_OUT_DTYPE && x.scalar_type() != at::kFloat) return false;
  const int64_t d = x.size(-1);
  if (d == 0 || x.numel() == 0) return true;
  const bool packed = acc.dim() == 1;
  const int64_t block = d <= 4096 ? 256 : 512;
  // one block row's product, (b, d - i0) float32 row-major, then added into acc
  at::Tensor scratch = at::empty({std::min(block, d) * d}, acc.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for_each_row_chunk(x, mask, x.scalar_type(), 0, [&](const at::Tensor& X) {
    for (int64_t i0 = 0; i0 < d; i0 += block) {
      const int64_t b = std::min(block, d - i0), w = d - i0;
      at::Tensor prod = scratch.narrow(0, 0, b * w).view({b, w});
      mm_into(prod, X.narrow(1, i0, b).t(), X.narrow(1, i0, w));  // (b, n) @ (n, w)
      if (!packed) {
        acc.narrow(0, i0, b).narrow(1, i0, w).add_(prod, scale);
      } else {
        launch_add_packed_rows(prod.const_data_ptr<float>(), b, i0, d, static_cast<float>(scale),
                               acc.data_ptr<float>(), stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return true;
}

bool energy_gemm(const at::Tensor& M, const at::Tensor& Q, at::Tensor& out) {
  if (M.dim() != 2 || M.scalar_type() != at::kFloat) return false;  // packed M: the tiled kernel
  const int64_t d = Q.size(0), k = Q.size(1);
  if (d == 0 || k == 0) {
    out.zero_();
    return true;
  }
  // two (d, kc) float32 temporaries: Q's columns converted, and M Q
  const int64_t kc = std::min(k, std::max(MIN_CHUNK, WORKSPACE_BYTES / (2 * 4 * d)));
  for (int64_t k0 = 0; k0 < k; k0 += kc) {
    const int64_t n = std::min(kc, k - k0);
    const at::Tensor q = Q.narrow(1, k0, n).to(at::kFloat);
    at::Tensor prod = at::mm(M, q);  // float32 product (TF32 only where torch allows it)
    at::Tensor dst = out.narrow(0, k0, n);
    at::sum_out(dst, prod.mul_(q), {0});
  }
  return true;
}

bool projected_gemm(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& Q,
                    const std::optional<at::Tensor>& mask) {
  if (acc.scalar_type() != at::kFloat || !gemm_input(x.scalar_type()) || !gemm_input(Q.scalar_type())) return false;
  const at::ScalarType ct = (x.scalar_type() == Q.scalar_type() && is16(x.scalar_type())) ? x.scalar_type()
                                                                                          : at::kFloat;
  if (!FISHERLORA_HAS_OUT_DTYPE && ct != at::kFloat) return false;
  const int64_t d = x.size(-1), k = Q.size(1);
  if (d == 0 || k == 0 || x.numel() == 0) return true;
  const int64_t kc = std::min<int64_t>(k, 4096);  // columns per pass: the product is (rows, kc) float32
  for (int64_t k0 = 0; k0 < k; k0 += kc) {
    const int64_t n = std::min(kc, k - k0);
    const at::Tensor q = Q.narrow(1, k0, n).to(ct);
    at::Tensor dst = acc.narrow(0, k0, n);
    for_each_row_chunk(x, mask, ct, 4 * n, [&](const at::Tensor& X) {
      at::Tensor prod = mm_f32(X, q);  // (rows, n): a chunk, never (T, k)
      dst.add_(at::sum(prod.mul_(prod), {0}));
    });
  }
  return true;
}

bool gradient_gemm(const at::Tensor& acc, const at::Tensor& g, const at::Tensor& a,
                   const std::optional<at::Tensor>& mask, double scale) {
  if (acc.scalar_type() != at::kFloat || !gemm_input(g.scalar_type()) || !gemm_input(a.scalar_type())) return false;
  const at::ScalarType ct = (g.scalar_type() == a.scalar_type() && is16(g.scalar_type())) ? g.scalar_type()
                                                                                          : at::kFloat;
  if (!FISHERLORA_HAS_OUT_DTYPE && ct != at::kFloat) return false;
  const int64_t d_out = g.size(-1), d_in = a.size(-1);
  if (d_out == 0 || d_in == 0 || g.numel() == 0) return true;
  // block rows of acc: one (b, d_in) float32 product per chunk and block, within the workspace
  const int64_t block = std::min(d_out, std::max<int64_t>(256, WORKSPACE_BYTES / (4 * d_in)));
  at::Tensor scratch = at::empty({block * d_in}, acc.options());
  for_each_pair_chunk(g, a, mask, ct, [&](const at::Tensor& G, const at::Tensor& A) {
    for (int64_t i0 = 0; i0 < d_out; i0 += block) {
      const int64_t b = std::min(block, d_out - i0);
      at::Tensor prod = scratch.narrow(0, 0, b * d_in).view({b, d_in});
      mm_into(prod, G.narrow(1, i0, b).t(), A);  // (b, n) @ (n, d_in)
      acc.narrow(0, i0, b).add_(prod, scale);
    }
  });
  return true;
}

}  // namespace cuda
}  // namespace fisherlora

#endif  // __CUDA_ARCH__
