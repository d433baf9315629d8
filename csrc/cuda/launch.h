// Host-side entry points of the CUDA kernels (cuda/kernels.cu).
//
// Plain C++ types only (no ATen, no CUDA vector types), so the kernels' translation unit needs
// nothing but the CUDA toolkit: it compiles, and is compile-tested, without a CUDA build of
// torch. The ATen glue (cuda/curvature_cuda.cu) checks the tensors and calls these.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fisherlora {
namespace cuda {

enum class DType : int { kBFloat16 = 0, kHalf = 1, kFloat = 2, kDouble = 3 };

// acc (dense row-major (d, d) or packed upper triangle) += scale * x_rᵀ x_r over the upper-triangle
// tiles, where x_r are the n rows at element offsets rows[0..n) of x (device int64), columns
// spaced col_stride elements apart. acc_dtype is kFloat or kDouble.
void launch_syrk(DType x_dtype, DType acc_dtype, const void* x, const int64_t* rows, int64_t n, int64_t d,
                 int64_t col_stride, void* acc, bool packed, double scale, cudaStream_t stream);

// out[j] = q_jᵀ M q_j, M (d, d) dense row-major or packed, of m_dtype (kFloat/kDouble); Q (d, k)
// with element strides (qs0, qs1). `partial` is device scratch of energy_partial_rows(d) * k doubles.
int64_t energy_partial_rows(int64_t d);
void launch_energy(DType m_dtype, DType q_dtype, const void* M, bool packed, const void* Q, int64_t d, int64_t k,
                   int64_t qs0, int64_t qs1, double* partial, void* out, cudaStream_t stream);

// acc[j] += Σ_r (q_jᵀ x_r)² over the n rows at offsets rows[0..n); Q is (d, k) in acc's dtype with
// element strides (qs0, qs1). `partial` is device scratch of projected_groups(n) * k doubles.
int64_t projected_groups(int64_t n);
void launch_projected(DType x_dtype, DType acc_dtype, const void* x, const int64_t* rows, int64_t n, int64_t d,
                      int64_t col_stride, const void* Q, int64_t k, int64_t qs0, int64_t qs1, double* partial,
                      void* acc, cudaStream_t stream);

// acc (d_out, d_in) row-major += scale * Σ_r g_r a_rᵀ over the n kept tokens, g's row r at element
// offset grows[r] of g (columns g_col_stride apart), a's at arows[r] of a (device int64 offsets of the
// same tokens). g and a may have different input dtypes; acc_dtype is kFloat or kDouble.
void launch_gradient(DType g_dtype, DType a_dtype, DType acc_dtype, const void* g, const int64_t* grows,
                     int64_t g_col_stride, const void* a, const int64_t* arows, int64_t a_col_stride, int64_t n,
                     int64_t d_out, int64_t d_in, void* acc, double scale, cudaStream_t stream);

// Helpers of the tensor-core paths (cuda/gemm_cuda.cu, docs/DESIGN.md §11).
// dst (n, d) row-major of dst_dtype: row r is x's row at element offset offsets[r] (columns
// col_stride apart), converted, or zeros where keep[r] is false (keep may be null: keep all).
// A masked-out row is never read, so padding that holds NaN cannot reach a product.
void launch_gather_rows(DType x_dtype, DType dst_dtype, const void* x, const int64_t* offsets, const bool* keep,
                        int64_t n, int64_t d, int64_t col_stride, void* dst, cudaStream_t stream);
// acc (packed upper triangle of a (d, d) float32 matrix) at rows i0 .. i0 + rows, columns from i0:
// acc[i0 + r, i0 + c] += scale * block[r, c] for c >= r; block is (rows, d - i0) float32 row-major.
void launch_add_packed_rows(const float* block, int64_t rows, int64_t i0, int64_t d, float scale, float* acc,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace fisherlora
