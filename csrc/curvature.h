// Shared declarations of the fisherlora._C curvature ops (docs/DESIGN.md §3).
//
// The ops are registered as torch ops in the `fisherlora_ext` namespace (bindings.cpp):
//   fisherlora_ext::syrk_accumulate_(Tensor(a!) acc, Tensor x, Tensor? mask, float scale) -> ()
//   fisherlora_ext::fisher_energy(Tensor M, Tensor Q) -> Tensor
//   fisherlora_ext::projected_sq_accumulate_(Tensor(a!) acc, Tensor x, Tensor Q, Tensor? mask) -> ()
//   fisherlora_ext::gradient_accumulate_(Tensor(a!) acc, Tensor g, Tensor a, Tensor? mask, float scale,
//                                        bool transpose) -> ()
// with a CPU kernel (cpu/curvature_cpu.cpp) and, when built with CUDA, a CUDA kernel
// (cuda/curvature_cuda.cu). Both check their inputs with TORCH_CHECK, so calling the ops through
// torch.ops directly (without fisherlora.ops' validation) gives clear errors, never a crash.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fisherlora {

// Packed upper triangle, row-major: element (i, j), i <= j, at i*d - i*(i-1)/2 + (j - i).
inline int64_t packed_index(int64_t i, int64_t j, int64_t d) {
  return i * d - i * (i - 1) / 2 + (j - i);
}

// Argument checks shared by the CPU and CUDA kernels (device-agnostic parts).
void check_syrk_args(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& mask);
void check_energy_args(const at::Tensor& M, const at::Tensor& Q);
void check_projected_args(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& Q,
                          const std::optional<at::Tensor>& mask);
void check_gradient_args(const at::Tensor& acc, const at::Tensor& g, const at::Tensor& a,
                         const std::optional<at::Tensor>& mask, bool transpose);

namespace cpu {
void syrk_accumulate_(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                      double scale);
at::Tensor fisher_energy(const at::Tensor& M, const at::Tensor& Q);
void projected_sq_accumulate_(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& Q,
                              const std::optional<at::Tensor>& mask);
void gradient_accumulate_(const at::Tensor& acc, const at::Tensor& g, const at::Tensor& a,
                          const std::optional<at::Tensor>& mask, double scale, bool transpose);
}  // namespace cpu

}  // namespace fisherlora
