// CPU kernels of the curvature ops (docs/DESIGN.md §3).
//
// Common scheme: the rows of x that the mask keeps are described by their element offsets (one
// int64 per kept token; masked-out rows are never read, so NaN padding cannot leak). Work is cut
// into tiles; each tile's rows are gathered, converted to the accumulator dtype (fp32, or fp64
// for reference comparisons) on load, into a small per-thread buffer, and multiplied through
// ATen's BLAS (at::addmm_/at::mm on tiles). No (T, d) copy of x, no (d, k) or (T, k)
// intermediate. Every output element is owned by one task whose partition depends only on the
// problem shape, never on the thread count, so results are deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../curvature.h"

namespace fisherlora {
namespace cpu {
namespace {

// Tile sizes. SYRK_TILE: columns of one (i, j) tile of the (d, d) result; TOKEN_TILE: kept rows
// per gathered panel. 256 x 256 fp32 panels (256 KiB) keep one tile pair's working set in L2.
constexpr int64_t SYRK_TILE = 256;
constexpr int64_t TOKEN_TILE = 256;
constexpr int64_t ENERGY_ROW_TILE = 256;   // rows of M per step
constexpr int64_t ENERGY_COL_TILE = 64;    // columns of Q per task
constexpr int64_t PROJ_TOKEN_TILE = 128;   // kept rows per step of projected_sq
constexpr int64_t PROJ_COL_CHUNK = 512;    // columns of Q converted at a time when Q's dtype differs
constexpr int64_t PROJ_GROUPS = 64;        // fixed token groups (deterministic partial sums)
constexpr int64_t GRAD_COLS = 192;          // columns of the (d_out, d_in) gradient per task, about
constexpr int64_t GRAD_MIN_TASKS = 8;       // tiles of the gradient, at least (rows split to reach it)
constexpr int64_t GRAD_PANEL_BYTES = 32 << 20;  // gathered g and a rows of one token chunk, at most
constexpr int64_t GRAD_MIN_CHUNK = 256;     // kept tokens per chunk, at least (wide layers)
// Row panels of a diagonal SYRK tile: panel a (columns [a*P, a*P + P)) is multiplied only with
// the columns from a*P on, so the strictly lower half is skipped except inside the P x P blocks
// on the diagonal. Multiply-adds per kept token of an n-wide diagonal tile:
//   sum_a p_a * (n - a*P), p_a = min(P, n - a*P)   (n = 256, P = 32: 36,864 = 1.12 x n(n+1)/2,
//   where the full tile product costs n^2 = 65,536 = 1.99 x). See docs/DESIGN.md §11.
constexpr int64_t SYRK_DIAG_PANEL = 32;

// Element offsets (relative to x.data_ptr) of the rows of x (..., d) that `mask` keeps, in flat
// token order. Arbitrary strides of the leading dims are handled without copying x.
std::vector<int64_t> kept_row_offsets(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  const int64_t nd = x.dim() - 1;
  int64_t tokens = 1;
  for (int64_t i = 0; i < nd; ++i) tokens *= x.size(i);
  std::vector<int64_t> offsets;
  if (tokens == 0) return offsets;

  at::Tensor keep;
  const bool* keep_ptr = nullptr;
  if (mask.has_value()) {
    keep = (mask->scalar_type() == at::kBool ? *mask : mask->ne(0)).reshape({-1}).contiguous();
    keep_ptr = keep.data_ptr<bool>();
  }
  offsets.reserve(keep_ptr ? static_cast<size_t>(std::count(keep_ptr, keep_ptr + tokens, true))
                           : static_cast<size_t>(tokens));
  std::vector<int64_t> index(std::max<int64_t>(nd, 1), 0);
  int64_t offset = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    if (!keep_ptr || keep_ptr[t]) offsets.push_back(offset);
    // odometer step over the leading dims, last dim fastest
    for (int64_t dim = nd - 1; dim >= 0; --dim) {
      if (++index[dim] < x.size(dim)) {
        offset += x.stride(dim);
        break;
      }
      offset -= (x.size(dim) - 1) * x.stride(dim);
      index[dim] = 0;
    }
  }
  return offsets;
}

// Gather rows `rows[0..n)` (element offsets into `base`), columns [col0, col0 + ncols) with
// column stride `cs`, converting to acc_t, into `dst` (row-major, leading dimension `ld`).
template <typename in_t, typename acc_t>
inline void load_panel(const in_t* base, const int64_t* rows, int64_t n, int64_t col0, int64_t ncols,
                       int64_t cs, acc_t* dst, int64_t ld) {
  for (int64_t r = 0; r < n; ++r) {
    const in_t* src = base + rows[r] + col0 * cs;
    acc_t* out = dst + r * ld;
    if (cs == 1) {
      for (int64_t c = 0; c < ncols; ++c) out[c] = static_cast<acc_t>(src[c]);
    } else {
      for (int64_t c = 0; c < ncols; ++c) out[c] = static_cast<acc_t>(src[c * cs]);
    }
  }
}

template <typename in_t, typename acc_t>
void syrk_kernel(const at::Tensor& acc, const at::Tensor& x, const std::vector<int64_t>& rows, double scale) {
  const int64_t d = x.size(-1);
  const int64_t n = static_cast<int64_t>(rows.size());
  const int64_t cs = x.stride(-1);
  const bool packed = acc.dim() == 1;
  const in_t* xp = x.const_data_ptr<in_t>();
  acc_t* ap = acc.data_ptr<acc_t>();
  const acc_t s = static_cast<acc_t>(scale);

  const int64_t nb = (d + SYRK_TILE - 1) / SYRK_TILE;
  std::vector<std::pair<int64_t, int64_t>> pairs;  // upper-triangle tile pairs, bi <= bj
  for (int64_t bi = 0; bi < nb; ++bi)
    for (int64_t bj = bi; bj < nb; ++bj) pairs.emplace_back(bi, bj);
  const auto opts = acc.options();
  const int64_t tb = std::min(TOKEN_TILE, n);

  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t p0, int64_t p1) {
    at::Tensor bufi = at::empty({tb, SYRK_TILE}, opts);
    at::Tensor bufj = at::empty({tb, SYRK_TILE}, opts);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t i0 = pairs[p].first * SYRK_TILE, j0 = pairs[p].second * SYRK_TILE;
      const int64_t ni = std::min(SYRK_TILE, d - i0), nj = std::min(SYRK_TILE, d - j0);
      const bool diag = i0 == j0;
      at::Tensor tile = at::zeros({ni, nj}, opts);
      for (int64_t t0 = 0; t0 < n; t0 += tb) {
        const int64_t nt = std::min(tb, n - t0);
        load_panel<in_t, acc_t>(xp, rows.data() + t0, nt, i0, ni, cs, bufi.data_ptr<acc_t>(), SYRK_TILE);
        at::Tensor xi = bufi.narrow(0, 0, nt).narrow(1, 0, ni);
        if (diag) {
          // upper row panels only: (p, nt) @ (nt, ni - a0) into rows a0.., columns a0.. of tile
          for (int64_t a0 = 0; a0 < ni; a0 += SYRK_DIAG_PANEL) {
            const int64_t na = std::min(SYRK_DIAG_PANEL, ni - a0);
            tile.narrow(0, a0, na).narrow(1, a0, ni - a0).addmm_(xi.narrow(1, a0, na).t(), xi.narrow(1, a0, ni - a0));
          }
          continue;
        }
        load_panel<in_t, acc_t>(xp, rows.data() + t0, nt, j0, nj, cs, bufj.data_ptr<acc_t>(), SYRK_TILE);
        tile.addmm_(xi.t(), bufj.narrow(0, 0, nt).narrow(1, 0, nj));  // (ni, nt) @ (nt, nj) through BLAS
      }
      const acc_t* tp = tile.const_data_ptr<acc_t>();
      for (int64_t r = 0; r < ni; ++r) {
        const int64_t i = i0 + r;
        const int64_t c0 = diag ? r : 0;  // upper triangle only, diagonal included
        acc_t* dst = packed ? ap + packed_index(i, j0 + c0, d) : ap + i * d + j0 + c0;
        const acc_t* src = tp + r * nj + c0;
        for (int64_t c = 0; c < nj - c0; ++c) dst[c] += s * src[c];
      }
    }
  });
}

// Load the (ni, nj) tile of a packed symmetric matrix at rows i0.., columns j0.. (j0 >= i0) into
// `dst` (leading dimension ld); a diagonal tile (i0 == j0) is filled in full by mirroring.
template <typename acc_t>
void load_packed_tile(const acc_t* P, int64_t d, int64_t i0, int64_t ni, int64_t j0, int64_t nj, acc_t* dst,
                      int64_t ld) {
  const bool diag = i0 == j0;
  for (int64_t r = 0; r < ni; ++r) {
    const int64_t i = i0 + r;
    const int64_t c0 = diag ? r : 0;
    const acc_t* src = P + packed_index(i, j0 + c0, d);
    std::copy(src, src + (nj - c0), dst + r * ld + c0);
    if (diag)
      for (int64_t c = c0 + 1; c < nj; ++c) dst[c * ld + r] = dst[r * ld + c];
  }
}

template <typename acc_t>
void energy_kernel(const at::Tensor& M, const at::Tensor& Q, at::Tensor& out) {
  const int64_t d = Q.size(0), k = Q.size(1);
  const bool packed = M.dim() == 1;
  const auto opts = M.options();
  const int64_t nkb = (k + ENERGY_COL_TILE - 1) / ENERGY_COL_TILE;
  const int64_t nrb = (d + ENERGY_ROW_TILE - 1) / ENERGY_ROW_TILE;
  const acc_t* mp = M.const_data_ptr<acc_t>();
  acc_t* op = out.data_ptr<acc_t>();

  at::parallel_for(0, nkb, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor tilebuf;
    if (packed) tilebuf = at::empty({ENERGY_ROW_TILE, ENERGY_ROW_TILE}, opts);
    std::vector<double> e(ENERGY_COL_TILE);
    for (int64_t kb = b0; kb < b1; ++kb) {
      const int64_t k0 = kb * ENERGY_COL_TILE, nk = std::min(ENERGY_COL_TILE, k - k0);
      // this task's columns of Q, converted once: (d, nk), never (d, k)
      at::Tensor q = Q.narrow(1, k0, nk).to(M.scalar_type()).contiguous();
      const acc_t* qp = q.const_data_ptr<acc_t>();
      std::fill(e.begin(), e.end(), 0.0);
      // accumulate e_j += sum_{r in rows i0..} q[r, j] * (M[rows, cols] @ q[cols, j])
      auto add_rows = [&](const at::Tensor& prod, int64_t r0, double factor) {
        const acc_t* pp = prod.const_data_ptr<acc_t>();
        for (int64_t r = 0; r < prod.size(0); ++r)
          for (int64_t j = 0; j < nk; ++j)
            e[j] += factor * static_cast<double>(pp[r * nk + j]) * static_cast<double>(qp[(r0 + r) * nk + j]);
      };
      for (int64_t bi = 0; bi < nrb; ++bi) {
        const int64_t i0 = bi * ENERGY_ROW_TILE, ni = std::min(ENERGY_ROW_TILE, d - i0);
        if (!packed) {
          // a row panel of dense M (a view, both triangles read) times all of q
          add_rows(at::mm(M.narrow(0, i0, ni), q), i0, 1.0);
          continue;
        }
        // packed: upper tiles only; an off-diagonal tile counts for itself and its mirror
        for (int64_t bj = bi; bj < nrb; ++bj) {
          const int64_t j0 = bj * ENERGY_ROW_TILE, nj = std::min(ENERGY_ROW_TILE, d - j0);
          load_packed_tile<acc_t>(mp, d, i0, ni, j0, nj, tilebuf.data_ptr<acc_t>(), ENERGY_ROW_TILE);
          at::Tensor tile = tilebuf.narrow(0, 0, ni).narrow(1, 0, nj);
          add_rows(at::mm(tile, q.narrow(0, j0, nj)), i0, bj == bi ? 1.0 : 2.0);
        }
      }
      for (int64_t j = 0; j < nk; ++j) op[k0 + j] = static_cast<acc_t>(e[j]);
    }
  });
}

template <typename in_t, typename acc_t>
void projected_kernel(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& Q,
                      const std::vector<int64_t>& rows) {
  const int64_t d = x.size(-1), k = Q.size(1);
  const int64_t n = static_cast<int64_t>(rows.size());
  const int64_t cs = x.stride(-1);
  const in_t* xp = x.const_data_ptr<in_t>();
  acc_t* ap = acc.data_ptr<acc_t>();
  const auto opts = acc.options();
  const int64_t ntb = (n + PROJ_TOKEN_TILE - 1) / PROJ_TOKEN_TILE;
  const int64_t groups = std::min(ntb, PROJ_GROUPS);  // depends on n only: deterministic sums
  const bool same_dtype = Q.scalar_type() == acc.scalar_type();
  const int64_t chunk = same_dtype ? k : PROJ_COL_CHUNK;

  for (int64_t k0 = 0; k0 < k; k0 += chunk) {
    const int64_t nk = std::min(chunk, k - k0);
    // Q's columns in the accumulator dtype: a view when it already is, else a (d, <=512) copy
    at::Tensor q = same_dtype ? Q.narrow(1, k0, nk) : Q.narrow(1, k0, nk).to(acc.scalar_type());
    std::vector<double> partial(static_cast<size_t>(groups * nk), 0.0);
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      at::Tensor xbuf = at::empty({PROJ_TOKEN_TILE, d}, opts);
      at::Tensor prod = at::empty({PROJ_TOKEN_TILE, nk}, opts);
      for (int64_t g = g0; g < g1; ++g) {
        double* part = partial.data() + g * nk;
        for (int64_t b = g * ntb / groups; b < (g + 1) * ntb / groups; ++b) {
          const int64_t t0 = b * PROJ_TOKEN_TILE, nt = std::min(PROJ_TOKEN_TILE, n - t0);
          load_panel<in_t, acc_t>(xp, rows.data() + t0, nt, 0, d, cs, xbuf.data_ptr<acc_t>(), d);
          at::Tensor p = prod.narrow(0, 0, nt);
          at::mm_out(p, xbuf.narrow(0, 0, nt), q);  // (nt, nk): a tile, never (T, k)
          const acc_t* pp = p.const_data_ptr<acc_t>();
          for (int64_t r = 0; r < nt; ++r)
            for (int64_t j = 0; j < nk; ++j) {
              const double v = static_cast<double>(pp[r * nk + j]);
              part[j] += v * v;
            }
        }
      }
    });
    for (int64_t j = 0; j < nk; ++j) {
      double sum = 0.0;
      for (int64_t g = 0; g < groups; ++g) sum += partial[g * nk + j];
      ap[k0 + j] += static_cast<acc_t>(sum);
    }
  }
}

// load_panel for an input whose dtype is known at run time only (g and a may differ)
template <typename acc_t>
void load_rows(const at::Tensor& x, const int64_t* rows, int64_t n, int64_t col0, int64_t ncols, acc_t* dst,
               int64_t ld) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gradient_load_rows", [&] {
    load_panel<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), rows, n, col0, ncols, x.stride(-1), dst, ld);
  });
}

// [0, d) in `parts` near-equal blocks, multiples of 16 wide (fewer where d is small): (start, width) pairs.
std::vector<std::pair<int64_t, int64_t>> near_equal_blocks(int64_t d, int64_t parts) {
  const int64_t w = ((d + parts - 1) / parts + 15) / 16 * 16;
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t i = 0; i < d; i += w) out.emplace_back(i, std::min(w, d - i));
  return out;
}

// acc (d_out, d_in) += scale * g_rᵀ a_r, one chunk of kept tokens at a time: the chunk's rows of g
// and of a (offsets grows, arows: the same tokens) are gathered and converted on load into two
// float panels (threads split the rows); then every task owns one tile of acc and adds
// scale * panel_gᵀ panel_a to it with one BLAS product as deep as the chunk. Tiles are column
// blocks about GRAD_COLS wide, their rows split further only until there are GRAD_MIN_TASKS of
// them (narrow tiles and shallow products run BLAS below its rate). The panels hold at most
// GRAD_PANEL_BYTES (at least GRAD_MIN_CHUNK rows). The tiling depends on the shape only, so
// results do not depend on the thread count.
template <typename acc_t>
void gradient_kernel(const at::Tensor& acc, const at::Tensor& g, const at::Tensor& a,
                     const std::vector<int64_t>& grows, const std::vector<int64_t>& arows, double scale) {
  const int64_t d_out = g.size(-1), d_in = a.size(-1);
  const int64_t n = static_cast<int64_t>(grows.size());
  const int64_t row_bytes = (d_out + d_in) * static_cast<int64_t>(sizeof(acc_t));
  const int64_t chunk = std::min(n, std::max(GRAD_MIN_CHUNK, GRAD_PANEL_BYTES / row_bytes));
  const auto opts = acc.options();
  at::Tensor pg = at::empty({chunk, d_out}, opts);
  at::Tensor pa = at::empty({chunk, d_in}, opts);
  const auto cols = near_equal_blocks(d_in, (d_in + GRAD_COLS - 1) / GRAD_COLS);
  const int64_t ncols = static_cast<int64_t>(cols.size());
  const auto rows = near_equal_blocks(d_out, std::min((GRAD_MIN_TASKS + ncols - 1) / ncols, (d_out + 15) / 16));
  const int64_t ntiles = ncols * static_cast<int64_t>(rows.size());

  for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    const int64_t nt = std::min(chunk, n - t0);
    at::parallel_for(0, nt, TOKEN_TILE, [&](int64_t r0, int64_t r1) {
      load_rows<acc_t>(g, grows.data() + t0 + r0, r1 - r0, 0, d_out, pg.data_ptr<acc_t>() + r0 * d_out, d_out);
      load_rows<acc_t>(a, arows.data() + t0 + r0, r1 - r0, 0, d_in, pa.data_ptr<acc_t>() + r0 * d_in, d_in);
    });
    const at::Tensor g_rows = pg.narrow(0, 0, nt), a_rows = pa.narrow(0, 0, nt);
    at::parallel_for(0, ntiles, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const auto [i0, ni] = rows[p / ncols];
        const auto [j0, nj] = cols[p % ncols];
        at::Tensor tile = acc.narrow(0, i0, ni).narrow(1, j0, nj);  // a strided view: BLAS writes in place
        tile.addmm_(g_rows.narrow(1, i0, ni).t(), a_rows.narrow(1, j0, nj), /*beta=*/1, /*alpha=*/scale);
      }
    });
  }
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ", t.device());
}

}  // namespace

void syrk_accumulate_(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                      double scale) {
  check_syrk_args(acc, x, mask);
  check_cpu(x, "fisherlora_ext::syrk_accumulate_", "x");
  const std::vector<int64_t> rows = kept_row_offsets(x, mask);
  if (rows.empty() || x.size(-1) == 0) return;
  AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "syrk_accumulate_cpu_acc", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "syrk_accumulate_cpu", [&] {
      syrk_kernel<scalar_t, acc_t>(acc, x, rows, scale);
    });
  });
}

at::Tensor fisher_energy(const at::Tensor& M, const at::Tensor& Q) {
  check_energy_args(M, Q);
  check_cpu(M, "fisherlora_ext::fisher_energy", "M");
  at::Tensor out = at::zeros({Q.size(1)}, M.options());
  if (Q.size(0) == 0 || Q.size(1) == 0) return out;
  const at::Tensor Mc = M.dim() == 1 ? M.contiguous() : M;  // dense M: row panels are views
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "fisher_energy_cpu", [&] { energy_kernel<scalar_t>(Mc, Q, out); });
  return out;
}

void projected_sq_accumulate_(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& Q,
                              const std::optional<at::Tensor>& mask) {
  check_projected_args(acc, x, Q, mask);
  check_cpu(x, "fisherlora_ext::projected_sq_accumulate_", "x");
  const std::vector<int64_t> rows = kept_row_offsets(x, mask);
  if (rows.empty() || Q.size(1) == 0) return;
  AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "projected_sq_cpu_acc", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "projected_sq_cpu", [&] {
      projected_kernel<scalar_t, acc_t>(acc, x, Q, rows);
    });
  });
}

void gradient_accumulate_(const at::Tensor& acc, const at::Tensor& g, const at::Tensor& a,
                          const std::optional<at::Tensor>& mask, double scale, bool transpose) {
  check_gradient_args(acc, g, a, mask, transpose);
  check_cpu(g, "fisherlora_ext::gradient_accumulate_", "g");
  check_cpu(a, "fisherlora_ext::gradient_accumulate_", "a");
  // Σ_t a_t g_tᵀ (Conv1D's orientation) is the same product with the operands swapped
  const at::Tensor& left = transpose ? a : g;
  const at::Tensor& right = transpose ? g : a;
  const std::vector<int64_t> lrows = kept_row_offsets(left, mask);
  if (lrows.empty()) return;
  const std::vector<int64_t> rrows = kept_row_offsets(right, mask);
  AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "gradient_accumulate_cpu", [&] {
    gradient_kernel<scalar_t>(acc, left, right, lrows, rrows, scale);
  });
}

}  // namespace cpu
}  // namespace fisherlora
