// fisherlora._C: the compiled backend of fisherlora.ops (backend="ext").
//
// Registers the curvature ops as torch ops (namespace fisherlora_ext) with their CPU kernels; the
// CUDA kernels register themselves from cuda/curvature_cuda.cu when that part is built. The
// pybind11 module only reports how the extension was built: the ops are reached through
// torch.ops.fisherlora_ext.* (see fisherlora/ops/ext.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "curvature.h"

namespace fisherlora {
namespace {

bool is_input_dtype(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf || t == at::kFloat || t == at::kDouble;
}
bool is_acc_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

void check_mask(const std::optional<at::Tensor>& mask, const at::Tensor& x, const char* op, const char* name = "x") {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device() == x.device(), op, ": mask is on ", m.device(), " but ", name, " is on ", x.device());
  TORCH_CHECK(m.scalar_type() == at::kBool || at::isIntegralType(m.scalar_type(), /*includeBool=*/false),
              op, ": mask must be bool or an integer 0/1 tensor, got ", m.scalar_type());
  const int64_t tokens = x.size(-1) == 0 ? 0 : x.numel() / x.size(-1);
  TORCH_CHECK(m.numel() == tokens || (x.size(-1) == 0 && m.dim() == x.dim() - 1), op,
              ": mask of shape ", m.sizes(), " does not match the token dims of ", name, " ", x.sizes());
}

}  // namespace

void check_syrk_args(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  const char* op = "fisherlora_ext::syrk_accumulate_";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape (..., d), got a scalar");
  TORCH_CHECK(is_input_dtype(x.scalar_type()), op, ": x must be bf16/fp16/fp32/fp64, got ", x.scalar_type());
  TORCH_CHECK(is_acc_dtype(acc.scalar_type()), op, ": acc must be float32 (or float64), got ",
              acc.scalar_type());
  TORCH_CHECK(acc.device() == x.device(), op, ": acc is on ", acc.device(), " but x is on ", x.device());
  TORCH_CHECK(acc.is_contiguous(), op, ": acc must be contiguous");
  const int64_t d = x.size(-1);
  const bool dense = acc.dim() == 2 && acc.size(0) == d && acc.size(1) == d;
  const bool packed = acc.dim() == 1 && acc.size(0) == d * (d + 1) / 2;
  TORCH_CHECK(dense || packed, op, ": acc must be (", d, ", ", d, ") or packed (", d * (d + 1) / 2,
              ",) for x with d=", d, ", got ", acc.sizes());
  check_mask(mask, x, op);
}

void check_energy_args(const at::Tensor& M, const at::Tensor& Q) {
  const char* op = "fisherlora_ext::fisher_energy";
  TORCH_CHECK(is_acc_dtype(M.scalar_type()), op, ": M must be float32 or float64, got ", M.scalar_type());
  TORCH_CHECK(Q.dim() == 2 && is_input_dtype(Q.scalar_type()), op,
              ": Q must be a (d, k) floating tensor, got ", Q.scalar_type(), " ", Q.sizes());
  TORCH_CHECK(M.device() == Q.device(), op, ": M is on ", M.device(), " but Q is on ", Q.device());
  const int64_t d = Q.size(0);
  const bool dense = M.dim() == 2 && M.size(0) == d && M.size(1) == d;
  const bool packed = M.dim() == 1 && M.size(0) == d * (d + 1) / 2;
  TORCH_CHECK(dense || packed, op, ": M must be (", d, ", ", d, ") or packed (", d * (d + 1) / 2,
              ",), got ", M.sizes());
}

void check_projected_args(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& Q,
                          const std::optional<at::Tensor>& mask) {
  const char* op = "fisherlora_ext::projected_sq_accumulate_";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape (..., d), got a scalar");
  TORCH_CHECK(is_input_dtype(x.scalar_type()), op, ": x must be bf16/fp16/fp32/fp64, got ", x.scalar_type());
  TORCH_CHECK(is_input_dtype(Q.scalar_type()), op, ": Q must be bf16/fp16/fp32/fp64, got ", Q.scalar_type());
  TORCH_CHECK(is_acc_dtype(acc.scalar_type()), op, ": acc must be float32 (or float64), got ",
              acc.scalar_type());
  TORCH_CHECK(acc.device() == x.device(), op, ": acc is on ", acc.device(), " but x is on ", x.device());
  TORCH_CHECK(Q.device() == x.device(), op, ": Q is on ", Q.device(), " but x is on ", x.device());
  TORCH_CHECK(acc.is_contiguous(), op, ": acc must be contiguous");
  TORCH_CHECK(Q.dim() == 2 && Q.size(0) == x.size(-1), op, ": Q must be (d=", x.size(-1), ", k), got ",
              Q.sizes());
  TORCH_CHECK(acc.dim() == 1 && acc.size(0) == Q.size(1), op, ": acc must be (", Q.size(1), ",), got ",
              acc.sizes());
  check_mask(mask, x, op);
}

void check_gradient_args(const at::Tensor& acc, const at::Tensor& g, const at::Tensor& a,
                         const std::optional<at::Tensor>& mask, bool transpose) {
  const char* op = "fisherlora_ext::gradient_accumulate_";
  TORCH_CHECK(g.dim() >= 1, op, ": g must have shape (..., d_out), got a scalar");
  TORCH_CHECK(a.dim() >= 1, op, ": a must have shape (..., d_in), got a scalar");
  TORCH_CHECK(is_input_dtype(g.scalar_type()), op, ": g must be bf16/fp16/fp32/fp64, got ", g.scalar_type());
  TORCH_CHECK(is_input_dtype(a.scalar_type()), op, ": a must be bf16/fp16/fp32/fp64, got ", a.scalar_type());
  TORCH_CHECK(is_acc_dtype(acc.scalar_type()), op, ": acc must be float32 (or float64), got ",
              acc.scalar_type());
  TORCH_CHECK(a.device() == g.device(), op, ": a is on ", a.device(), " but g is on ", g.device());
  TORCH_CHECK(acc.device() == g.device(), op, ": acc is on ", acc.device(), " but g is on ", g.device());
  TORCH_CHECK(acc.is_contiguous(), op, ": acc must be contiguous");
  TORCH_CHECK(g.sizes().slice(0, g.dim() - 1) == a.sizes().slice(0, a.dim() - 1), op, ": the token dims of g ",
              g.sizes(), " and a ", a.sizes(), " differ");
  const int64_t d_out = g.size(-1), d_in = a.size(-1);
  const int64_t rows = transpose ? d_in : d_out, cols = transpose ? d_out : d_in;
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == rows && acc.size(1) == cols, op, ": acc must be (", rows, ", ",
              cols, ") for g with d_out=", d_out, " and a with d_in=", d_in, transpose ? " (transpose=True)" : "",
              ", got ", acc.sizes());
  check_mask(mask, g, op, "g");
}

}  // namespace fisherlora

TORCH_LIBRARY(fisherlora_ext, m) {
  m.def("syrk_accumulate_(Tensor(a!) acc, Tensor x, Tensor? mask, float scale) -> ()");
  m.def("fisher_energy(Tensor M, Tensor Q) -> Tensor");
  m.def("projected_sq_accumulate_(Tensor(a!) acc, Tensor x, Tensor Q, Tensor? mask) -> ()");
  m.def("gradient_accumulate_(Tensor(a!) acc, Tensor g, Tensor a, Tensor? mask, float scale, bool transpose) -> ()");
}

TORCH_LIBRARY_IMPL(fisherlora_ext, CPU, m) {
  m.impl("syrk_accumulate_", &fisherlora::cpu::syrk_accumulate_);
  m.impl("fisher_energy", &fisherlora::cpu::fisher_energy);
  m.impl("projected_sq_accumulate_", &fisherlora::cpu::projected_sq_accumulate_);
  m.impl("gradient_accumulate_", &fisherlora::cpu::gradient_accumulate_);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "fisherlora compiled curvature ops (registered as torch.ops.fisherlora_ext.*)";
  mod.def("has_cuda", []() {
#ifdef FISHERLORA_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
  mod.def("has_openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether the CPU kernels were compiled with OpenMP (at::parallel_for runs in parallel).");
}
