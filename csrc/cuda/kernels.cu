// CUDA kernels of the curvature ops (docs/DESIGN.md §3). Needs only the CUDA toolkit (see launch.h).
//
// They are the fallback where Triton is missing and a second, independent implementation to
// check the Triton kernels against; they favour simplicity and determinism over peak speed:
// shared-memory tiled fp32/fp64 FMA (no tensor cores), every output element owned by exactly
// one thread block, cross-block sums reduced in a fixed order (no atomics), so repeated calls
// are bit-identical. Rows of x are addressed through device offsets of the kept rows only, so
// masked-out rows (padding, possibly NaN) are never read and no gathered copy of x is made.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "launch.h"

namespace fisherlora {
namespace cuda {
namespace {

template <typename acc_t, typename in_t>
__device__ __forceinline__ acc_t load_as(const in_t* p) {
  return static_cast<acc_t>(*p);
}
template <>
__device__ __forceinline__ float load_as<float, __nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <>
__device__ __forceinline__ double load_as<double, __nv_bfloat16>(const __nv_bfloat16* p) {
  return static_cast<double>(__bfloat162float(*p));
}
template <>
__device__ __forceinline__ float load_as<float, __half>(const __half* p) {
  return __half2float(*p);
}
template <>
__device__ __forceinline__ double load_as<double, __half>(const __half* p) {
  return static_cast<double>(__half2float(*p));
}

__host__ __device__ __forceinline__ int64_t packed_index(int64_t i, int64_t j, int64_t d) {
  return i * d - i * (i - 1) / 2 + (j - i);
}

// ---------------------------------------------------------------------------------------------
// syrk: one 64x64 tile (bi <= bj) of acc per block, 16x16 threads with 4x4 outputs each; the
// kept rows are streamed through shared memory 16 at a time.
constexpr int SYRK_TILE = 64;
constexpr int SYRK_K = 16;
constexpr int SYRK_THREADS = 16;

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(SYRK_THREADS * SYRK_THREADS)
syrk_kernel(const in_t* __restrict__ x, const int64_t* __restrict__ rows, int64_t n, int64_t d, int64_t cs,
            acc_t* __restrict__ acc, bool packed, acc_t scale, int64_t nb) {
  // upper-triangle tile pair of this block: row-major enumeration of (bi, bj), bi <= bj
  int64_t p = blockIdx.x, bi = 0;
  while (p >= nb - bi) {
    p -= nb - bi;
    ++bi;
  }
  const int64_t bj = bi + p;
  const int64_t i0 = bi * SYRK_TILE, j0 = bj * SYRK_TILE;

  __shared__ acc_t xi[SYRK_K][SYRK_TILE];
  __shared__ acc_t xj[SYRK_K][SYRK_TILE];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * SYRK_THREADS + tx;
  acc_t sum[4][4] = {};

  for (int64_t t0 = 0; t0 < n; t0 += SYRK_K) {
    for (int e = tid; e < SYRK_K * SYRK_TILE; e += SYRK_THREADS * SYRK_THREADS) {
      const int r = e / SYRK_TILE, c = e % SYRK_TILE;
      const bool row_ok = t0 + r < n;
      const in_t* base = row_ok ? x + rows[t0 + r] : x;
      xi[r][c] = (row_ok && i0 + c < d) ? load_as<acc_t>(base + (i0 + c) * cs) : acc_t(0);
      xj[r][c] = (row_ok && j0 + c < d) ? load_as<acc_t>(base + (j0 + c) * cs) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < SYRK_K; ++kk) {
      acc_t a[4], b[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        a[u] = xi[kk][ty + SYRK_THREADS * u];
        b[u] = xj[kk][tx + SYRK_THREADS * u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) sum[u][v] += a[u] * b[v];
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t i = i0 + ty + SYRK_THREADS * u;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t j = j0 + tx + SYRK_THREADS * v;
      if (i < d && j < d && i <= j) acc[packed ? packed_index(i, j, d) : i * d + j] += scale * sum[u][v];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// gradient: one 64x64 tile of the (d_out, d_in) acc per block (grid (tiles along d_in, tiles along
// d_out)), 16x16 threads with 4x4 outputs each; the kept tokens' rows of g and a are streamed
// through shared memory 16 at a time, each through its own offsets and column stride.
template <typename g_t, typename a_t, typename acc_t>
__global__ void __launch_bounds__(SYRK_THREADS * SYRK_THREADS)
gradient_kernel(const g_t* __restrict__ g, const int64_t* __restrict__ grows, int64_t gcs,
                const a_t* __restrict__ a, const int64_t* __restrict__ arows, int64_t acs, int64_t n, int64_t d_out,
                int64_t d_in, acc_t* __restrict__ acc, acc_t scale) {
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * SYRK_TILE, j0 = static_cast<int64_t>(blockIdx.x) * SYRK_TILE;
  __shared__ acc_t gs[SYRK_K][SYRK_TILE];
  __shared__ acc_t as[SYRK_K][SYRK_TILE];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * SYRK_THREADS + tx;
  acc_t sum[4][4] = {};

  for (int64_t t0 = 0; t0 < n; t0 += SYRK_K) {
    for (int e = tid; e < SYRK_K * SYRK_TILE; e += SYRK_THREADS * SYRK_THREADS) {
      const int r = e / SYRK_TILE, c = e % SYRK_TILE;
      const bool row_ok = t0 + r < n;
      gs[r][c] = (row_ok && i0 + c < d_out) ? load_as<acc_t>(g + grows[t0 + r] + (i0 + c) * gcs) : acc_t(0);
      as[r][c] = (row_ok && j0 + c < d_in) ? load_as<acc_t>(a + arows[t0 + r] + (j0 + c) * acs) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < SYRK_K; ++kk) {
      acc_t u_[4], v_[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        u_[u] = gs[kk][ty + SYRK_THREADS * u];
        v_[u] = as[kk][tx + SYRK_THREADS * u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) sum[u][v] += u_[u] * v_[v];
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t i = i0 + ty + SYRK_THREADS * u;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t j = j0 + tx + SYRK_THREADS * v;
      if (i < d_out && j < d_in) acc[i * d_in + j] += scale * sum[u][v];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fisher_energy: block (kb, bi) computes, for its 32 columns j and 64 rows i of M,
// Σ_i q_ij (M[i, :] q_j) into partial[bi, j]; a second kernel sums partial over bi in order.
constexpr int ENERGY_ROWS = 64;
constexpr int ENERGY_COLS = 32;
constexpr int ENERGY_L = 32;
constexpr int ENERGY_TY = 8;

template <typename m_t, typename q_t>
__global__ void __launch_bounds__(ENERGY_COLS * ENERGY_TY)
energy_kernel(const m_t* __restrict__ M, bool packed, const q_t* __restrict__ Q, int64_t d, int64_t k, int64_t qs0,
              int64_t qs1, double* __restrict__ partial) {
  __shared__ m_t ms[ENERGY_ROWS][ENERGY_L + 1];
  __shared__ m_t qsh[ENERGY_L][ENERGY_COLS];
  __shared__ double red[ENERGY_TY][ENERGY_COLS];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * ENERGY_COLS + tx;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * ENERGY_COLS + tx;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * ENERGY_ROWS;
  constexpr int R = ENERGY_ROWS / ENERGY_TY;
  m_t s[R] = {};

  for (int64_t l0 = 0; l0 < d; l0 += ENERGY_L) {
    for (int e = tid; e < ENERGY_ROWS * ENERGY_L; e += ENERGY_COLS * ENERGY_TY) {
      const int r = e / ENERGY_L, c = e % ENERGY_L;
      const int64_t i = i0 + r, l = l0 + c;
      m_t v = m_t(0);
      if (i < d && l < d) v = packed ? M[i <= l ? packed_index(i, l, d) : packed_index(l, i, d)] : M[i * d + l];
      ms[r][c] = v;
    }
    for (int e = tid; e < ENERGY_L * ENERGY_COLS; e += ENERGY_COLS * ENERGY_TY) {
      const int r = e / ENERGY_COLS, c = e % ENERGY_COLS;
      const int64_t l = l0 + r, jj = static_cast<int64_t>(blockIdx.x) * ENERGY_COLS + c;
      qsh[r][c] = (l < d && jj < k) ? load_as<m_t>(Q + l * qs0 + jj * qs1) : m_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < ENERGY_L; ++c) {
      const m_t q = qsh[c][tx];
#pragma unroll
      for (int r = 0; r < R; ++r) s[r] += ms[ty + ENERGY_TY * r][c] * q;
    }
    __syncthreads();
  }
  double part = 0.0;
  if (j < k) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i = i0 + ty + ENERGY_TY * r;
      if (i < d) part += static_cast<double>(s[r]) * static_cast<double>(load_as<m_t>(Q + i * qs0 + j * qs1));
    }
  }
  red[ty][tx] = part;
  __syncthreads();
  if (ty == 0 && j < k) {
    double total = 0.0;
    for (int r = 0; r < ENERGY_TY; ++r) total += red[r][tx];  // fixed order
    partial[static_cast<int64_t>(blockIdx.y) * k + j] = total;
  }
}

// ---------------------------------------------------------------------------------------------
// projected_sq: block (kb, g) walks token chunks g, g + G, ... of 64 kept rows, computes their
// (64, 32) projection tile over d in steps of 32 and adds its squares into partial[g, j]; a
// second kernel sums partial over g in order into acc.
constexpr int PROJ_ROWS = 64;
constexpr int PROJ_COLS = 32;
constexpr int PROJ_L = 32;
constexpr int PROJ_TY = 8;
constexpr int64_t PROJ_MAX_GROUPS = 256;

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(PROJ_COLS * PROJ_TY)
projected_kernel(const in_t* __restrict__ x, const int64_t* __restrict__ rows, int64_t n, int64_t d, int64_t cs,
                 const acc_t* __restrict__ Q, int64_t k, int64_t qs0, int64_t qs1, double* __restrict__ partial) {
  __shared__ acc_t xs[PROJ_ROWS][PROJ_L + 1];
  __shared__ acc_t qsh[PROJ_L][PROJ_COLS];
  __shared__ double red[PROJ_TY][PROJ_COLS];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * PROJ_COLS + tx;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * PROJ_COLS;
  constexpr int R = PROJ_ROWS / PROJ_TY;
  double sq = 0.0;

  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * PROJ_ROWS; t0 < n;
       t0 += static_cast<int64_t>(gridDim.y) * PROJ_ROWS) {
    acc_t s[R] = {};
    for (int64_t l0 = 0; l0 < d; l0 += PROJ_L) {
      for (int e = tid; e < PROJ_ROWS * PROJ_L; e += PROJ_COLS * PROJ_TY) {
        const int r = e / PROJ_L, c = e % PROJ_L;
        const int64_t l = l0 + c;
        xs[r][c] = (t0 + r < n && l < d) ? load_as<acc_t>(x + rows[t0 + r] + l * cs) : acc_t(0);
      }
      for (int e = tid; e < PROJ_L * PROJ_COLS; e += PROJ_COLS * PROJ_TY) {
        const int r = e / PROJ_COLS, c = e % PROJ_COLS;
        const int64_t l = l0 + r, jj = j0 + c;
        qsh[r][c] = (l < d && jj < k) ? Q[l * qs0 + jj * qs1] : acc_t(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int c = 0; c < PROJ_L; ++c) {
        const acc_t q = qsh[c][tx];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] += xs[ty + PROJ_TY * r][c] * q;
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < R; ++r) sq += static_cast<double>(s[r]) * static_cast<double>(s[r]);  // padded rows are 0
  }
  red[ty][tx] = sq;
  __syncthreads();
  if (ty == 0 && j0 + tx < k) {
    double total = 0.0;
    for (int r = 0; r < PROJ_TY; ++r) total += red[r][tx];
    partial[static_cast<int64_t>(blockIdx.y) * k + j0 + tx] = total;
  }
}

// out[j] (+)= Σ_g partial[g, j], g in order.
template <typename out_t>
__global__ void sum_partials_kernel(const double* __restrict__ partial, int64_t groups, int64_t k,
                                    out_t* __restrict__ out, bool accumulate) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  double total = 0.0;
  for (int64_t g = 0; g < groups; ++g) total += partial[g * k + j];
  out[j] = accumulate ? static_cast<out_t>(static_cast<double>(out[j]) + total) : static_cast<out_t>(total);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fisherlora CUDA kernel ") + what + " failed to launch: " +
                             cudaGetErrorString(err));
}

template <typename out_t>
void launch_sum(const double* partial, int64_t groups, int64_t k, void* out, bool accumulate, cudaStream_t stream) {
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((k + threads - 1) / threads);
  sum_partials_kernel<out_t><<<blocks, threads, 0, stream>>>(partial, groups, k, static_cast<out_t*>(out),
                                                             accumulate);
  check_launch("sum_partials");
}

// ---------------------------------------------------------------------------------------------
// Helpers of the tensor-core paths (gemm_cuda.cu): one block per row, threads over columns.
template <typename out_t>
__device__ __forceinline__ out_t store_as(float v);
template <>
__device__ __forceinline__ float store_as<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half store_as<__half>(float v) { return __float2half(v); }

template <typename in_t, typename out_t>
__global__ void gather_rows_kernel(const in_t* __restrict__ x, const int64_t* __restrict__ offsets,
                                   const bool* __restrict__ keep, int64_t d, int64_t cs, out_t* __restrict__ dst) {
  const int64_t r = blockIdx.x;
  out_t* out = dst + r * d;
  const bool kept = keep == nullptr || keep[r];
  const in_t* src = x + (kept ? offsets[r] : 0);
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
    out[c] = kept ? store_as<out_t>(load_as<float>(src + c * cs)) : store_as<out_t>(0.0f);
}

// 16-bit rows copied as they are (no round trip through float)
template <typename t16>
__global__ void copy_rows_kernel(const t16* __restrict__ x, const int64_t* __restrict__ offsets,
                                 const bool* __restrict__ keep, int64_t d, int64_t cs, t16* __restrict__ dst) {
  const int64_t r = blockIdx.x;
  t16* out = dst + r * d;
  const bool kept = keep == nullptr || keep[r];
  const t16* src = x + (kept ? offsets[r] : 0);
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) out[c] = kept ? src[c * cs] : store_as<t16>(0.0f);
}

__global__ void add_packed_rows_kernel(const float* __restrict__ block, int64_t i0, int64_t d, float scale,
                                       float* __restrict__ acc) {
  const int64_t r = blockIdx.x, i = i0 + r, width = d - i0;
  const float* src = block + r * width;
  float* dst = acc + packed_index(i, i, d) - r;  // so that dst[c] is acc[i, i0 + c]
  for (int64_t c = r + threadIdx.x; c < width; c += blockDim.x) dst[c] += scale * src[c];
}

// Call f(in_t{}) with the C++ type of an input dtype.
template <typename F>
void with_input_type(DType t, F&& f) {
  switch (t) {
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kHalf: f(__half{}); break;
    case DType::kFloat: f(float{}); break;
    case DType::kDouble: f(double{}); break;
    default: throw std::invalid_argument("fisherlora CUDA kernels: unsupported input dtype");
  }
}
template <typename F>
void with_acc_type(DType t, F&& f) {
  switch (t) {
    case DType::kFloat: f(float{}); break;
    case DType::kDouble: f(double{}); break;
    default: throw std::invalid_argument("fisherlora CUDA kernels: accumulator must be float32 or float64");
  }
}

}  // namespace

void launch_syrk(DType x_dtype, DType acc_dtype, const void* x, const int64_t* rows, int64_t n, int64_t d,
                 int64_t col_stride, void* acc, bool packed, double scale, cudaStream_t stream) {
  if (n == 0 || d == 0) return;
  const int64_t nb = (d + SYRK_TILE - 1) / SYRK_TILE;
  const unsigned blocks = static_cast<unsigned>(nb * (nb + 1) / 2);
  const dim3 threads(SYRK_THREADS, SYRK_THREADS);
  with_acc_type(acc_dtype, [&](auto acc_v) {
    using acc_t = decltype(acc_v);
    with_input_type(x_dtype, [&](auto in_v) {
      using in_t = decltype(in_v);
      syrk_kernel<in_t, acc_t><<<blocks, threads, 0, stream>>>(static_cast<const in_t*>(x), rows, n, d, col_stride,
                                                               static_cast<acc_t*>(acc), packed,
                                                               static_cast<acc_t>(scale), nb);
    });
  });
  check_launch("syrk");
}

void launch_gradient(DType g_dtype, DType a_dtype, DType acc_dtype, const void* g, const int64_t* grows,
                     int64_t g_col_stride, const void* a, const int64_t* arows, int64_t a_col_stride, int64_t n,
                     int64_t d_out, int64_t d_in, void* acc, double scale, cudaStream_t stream) {
  if (n == 0 || d_out == 0 || d_in == 0) return;
  const dim3 grid(static_cast<unsigned>((d_in + SYRK_TILE - 1) / SYRK_TILE),
                  static_cast<unsigned>((d_out + SYRK_TILE - 1) / SYRK_TILE));
  const dim3 threads(SYRK_THREADS, SYRK_THREADS);
  with_acc_type(acc_dtype, [&](auto acc_v) {
    using acc_t = decltype(acc_v);
    with_input_type(g_dtype, [&](auto g_v) {
      using g_t = decltype(g_v);
      with_input_type(a_dtype, [&](auto a_v) {
        using a_t = decltype(a_v);
        gradient_kernel<g_t, a_t, acc_t><<<grid, threads, 0, stream>>>(
            static_cast<const g_t*>(g), grows, g_col_stride, static_cast<const a_t*>(a), arows, a_col_stride, n,
            d_out, d_in, static_cast<acc_t*>(acc), static_cast<acc_t>(scale));
      });
    });
  });
  check_launch("gradient");
}

void launch_gather_rows(DType x_dtype, DType dst_dtype, const void* x, const int64_t* offsets, const bool* keep,
                        int64_t n, int64_t d, int64_t col_stride, void* dst, cudaStream_t stream) {
  if (n == 0 || d == 0) return;
  const unsigned blocks = static_cast<unsigned>(n);
  const int threads = d >= 256 ? 256 : 64;
  if (x_dtype == dst_dtype && x_dtype == DType::kBFloat16) {
    copy_rows_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(x), offsets, keep, d, col_stride, static_cast<__nv_bfloat16*>(dst));
  } else if (x_dtype == dst_dtype && x_dtype == DType::kHalf) {
    copy_rows_kernel<__half><<<blocks, threads, 0, stream>>>(static_cast<const __half*>(x), offsets, keep, d,
                                                             col_stride, static_cast<__half*>(dst));
  } else if (dst_dtype == DType::kFloat) {
    with_input_type(x_dtype, [&](auto in_v) {
      using in_t = decltype(in_v);
      if constexpr (std::is_same_v<in_t, double>) {
        throw std::invalid_argument("fisherlora CUDA kernels: gather_rows takes 16-bit or float32 rows");
      } else {
        gather_rows_kernel<in_t, float><<<blocks, threads, 0, stream>>>(static_cast<const in_t*>(x), offsets, keep,
                                                                        d, col_stride, static_cast<float*>(dst));
      }
    });
  } else {
    throw std::invalid_argument("fisherlora CUDA kernels: gather_rows converts only to the same dtype or float32");
  }
  check_launch("gather_rows");
}

void launch_add_packed_rows(const float* block, int64_t rows, int64_t i0, int64_t d, float scale, float* acc,
                            cudaStream_t stream) {
  if (rows == 0) return;
  add_packed_rows_kernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(block, i0, d, scale, acc);
  check_launch("add_packed_rows");
}

int64_t energy_partial_rows(int64_t d) { return (d + ENERGY_ROWS - 1) / ENERGY_ROWS; }

void launch_energy(DType m_dtype, DType q_dtype, const void* M, bool packed, const void* Q, int64_t d, int64_t k,
                   int64_t qs0, int64_t qs1, double* partial, void* out, cudaStream_t stream) {
  if (k == 0) return;
  const dim3 grid(static_cast<unsigned>((k + ENERGY_COLS - 1) / ENERGY_COLS),
                  static_cast<unsigned>(std::max<int64_t>(energy_partial_rows(d), 1)));
  const dim3 threads(ENERGY_COLS, ENERGY_TY);
  with_acc_type(m_dtype, [&](auto m_v) {
    using m_t = decltype(m_v);
    if (d == 0) {
      cudaMemsetAsync(out, 0, sizeof(m_t) * k, stream);
      return;
    }
    with_input_type(q_dtype, [&](auto q_v) {
      using q_t = decltype(q_v);
      energy_kernel<m_t, q_t><<<grid, threads, 0, stream>>>(static_cast<const m_t*>(M), packed,
                                                            static_cast<const q_t*>(Q), d, k, qs0, qs1, partial);
    });
    check_launch("fisher_energy");
    launch_sum<m_t>(partial, energy_partial_rows(d), k, out, /*accumulate=*/false, stream);
  });
}

int64_t projected_groups(int64_t n) {
  return std::min<int64_t>(std::max<int64_t>((n + PROJ_ROWS - 1) / PROJ_ROWS, 1), PROJ_MAX_GROUPS);
}

void launch_projected(DType x_dtype, DType acc_dtype, const void* x, const int64_t* rows, int64_t n, int64_t d,
                      int64_t col_stride, const void* Q, int64_t k, int64_t qs0, int64_t qs1, double* partial,
                      void* acc, cudaStream_t stream) {
  if (n == 0 || k == 0) return;
  const int64_t groups = projected_groups(n);
  const dim3 grid(static_cast<unsigned>((k + PROJ_COLS - 1) / PROJ_COLS), static_cast<unsigned>(groups));
  const dim3 threads(PROJ_COLS, PROJ_TY);
  with_acc_type(acc_dtype, [&](auto acc_v) {
    using acc_t = decltype(acc_v);
    with_input_type(x_dtype, [&](auto in_v) {
      using in_t = decltype(in_v);
      projected_kernel<in_t, acc_t><<<grid, threads, 0, stream>>>(static_cast<const in_t*>(x), rows, n, d,
                                                                  col_stride, static_cast<const acc_t*>(Q), k,
                                                                  qs0, qs1, partial);
    });
    check_launch("projected_sq");
    launch_sum<acc_t>(partial, groups, k, acc, /*accumulate=*/true, stream);
  });
}

}  // namespace cuda
}  // namespace fisherlora
