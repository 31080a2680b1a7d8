// CUDA implementation of pyllm::linear_cross_entropy_fwd (schema in csrc/pyllm.cpp): the chunk loop of
// csrc/linear_cross_entropy.h, whose matmuls are cuBLAS calls through at::mm, with the per-row loss and
// softmax-gradient kernel of linear_cross_entropy.cu. Built only when torch is a CUDA build.
#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "kernels.h"
#include "linear_cross_entropy.h"

namespace {

void rows_cuda(at::Tensor z, const at::Tensor& labels, at::Tensor loss, const pyllm::lce::Options& o) {
  pyllm::cuda::LinearCrossEntropyRowsParams p{};
  p.z = z.data_ptr<float>();
  p.labels = labels.data_ptr<int64_t>();
  p.loss = loss.data_ptr<float>();
  p.rows = z.size(0);
  p.vocab = z.size(1);
  p.z_row_stride = z.stride(0);
  p.ignore_index = o.ignore_index;
  p.label_smoothing = static_cast<float>(o.label_smoothing);
  p.softcap = static_cast<float>(o.softcap);
  p.z_loss = static_cast<float>(o.z_loss);
  p.grad_scale = static_cast<float>(o.grad_scale);
  p.compute_grad = o.compute_grad;
  cudaError_t err = pyllm::cuda::linear_cross_entropy_rows(p, c10::cuda::getCurrentCUDAStream(z.device().index()));
  TORCH_CHECK(err == cudaSuccess, "pyllm CUDA kernel linear_cross_entropy_rows failed: ", cudaGetErrorName(err),
              " (", cudaGetErrorString(err), ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing, double softcap,
    double z_loss, bool mean, int64_t chunk_size, bool compute_grad) {
  pyllm::lce::check_inputs("linear_cross_entropy", hidden, weight, labels, bias);
  TORCH_CHECK(hidden.is_cuda() && weight.device() == hidden.device() && labels.device() == hidden.device(),
              "linear_cross_entropy: hidden, weight and labels must be on one CUDA device");
  TORCH_CHECK(hidden.scalar_type() != at::kDouble, "linear_cross_entropy: float64 is not served on CUDA");
  const c10::cuda::CUDAGuard guard(hidden.device());
  return pyllm::lce::chunked_forward(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, z_loss,
                                     mean, chunk_size, compute_grad, at::kFloat, rows_cuda,
                                     [](int64_t, int64_t) { return at::Tensor(); });  // the caching allocator reuses
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CUDA, m) { m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cuda); }
