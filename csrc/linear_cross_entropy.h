// The chunk loop of pyllm::linear_cross_entropy_fwd, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// implementations; each supplies the per-row step (`RowStep`) that turns a chunk of logits into losses
// and, in place, into dloss/dlogits. The op contract is in csrc/pyllm.cpp.
//
// For each chunk of C tokens (C x V logits, never the N x V of the whole batch):
//   logits = hidden[c] @ weight^T (+ bias)          at::mm in the input dtype (BLAS / cuBLAS)
//   z      = float32 copy of logits (float64 for float64 inputs)
//   row step: loss per row; z <- dloss/dlogits      (softcap, label smoothing, z-loss, ignore_index)
//   dhidden[c] = dz @ weight                        in the input dtype
//   dweight   += dz^T @ hidden[c]                   accumulated in float32 (float64), cast at the end
//                                                  (the first chunk writes it: no zero fill of (V, H))
//   dbias     += dz^T @ ones                        a GEMV (a column sum of dz; faster than sum(0) on the CPU)
// The gradients are final (they already carry the 1/n of the mean), so the autograd backward only
// multiplies them by the incoming scalar gradient.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace pyllm {
namespace lce {

struct Options {
  int64_t ignore_index;
  double label_smoothing;  // epsilon in [0, 1]
  double softcap;          // 0 = none; else z = softcap * tanh(logits / softcap)
  double z_loss;           // coefficient of lse^2
  double grad_scale;       // 1 / (number of non-ignored tokens) for mean, 1 for sum
  bool compute_grad;
};

// Liger's rule: chunks of about N / ceil(V / H) tokens keep the chunk's logits near the size of hidden;
// at least kMinChunk rows, below which the matmuls lose their efficiency (measured on the CPU: 32-row chunks
// took 1.4x the time of 256-row ones at N 1024, H 256, V 8000).
constexpr int64_t kMinChunk = 256;

inline int64_t auto_chunk(int64_t N, int64_t H, int64_t V) {
  int64_t ratio = std::max<int64_t>(1, (V + H - 1) / std::max<int64_t>(H, 1));
  int64_t c = std::max<int64_t>(1, (N + ratio - 1) / ratio);
  int64_t p = 1;
  while (p < c) p <<= 1;
  return std::max<int64_t>(std::min<int64_t>(std::max(p, kMinChunk), N), 1);
}

inline void check_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                         const at::Tensor& labels, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, op, ": hidden and weight must be 2-D, got ",
              hidden.dim(), "-D and ", weight.dim(), "-D");
  TORCH_CHECK(weight.size(1) == hidden.size(1), op, ": weight has in_features ", weight.size(1),
              " but hidden has ", hidden.size(1));
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " differs from hidden dtype ", hidden.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0) && labels.scalar_type() == at::kLong, op,
              ": labels must be int64 of shape (", hidden.size(0), "), got ", labels.scalar_type(), " ",
              labels.sizes());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (",
                weight.size(0), "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " differs from hidden dtype ", hidden.scalar_type());
  }
}

// RowStep: void(at::Tensor z /* (c, V) acc dtype, contiguous */, const at::Tensor& labels /* (c,) int64 */,
//               at::Tensor loss /* (c,) acc dtype */, const Options&)
// scratch_for(rows, V) -> a contiguous (rows, V) acc-dtype tensor that every chunk's float logits are written into
// (one buffer for the whole call), or an undefined tensor: each chunk's logits are then a fresh allocation.
template <typename RowStep, typename Scratch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunked_forward(
    const at::Tensor& hidden_in, const at::Tensor& weight, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing, double softcap,
    double z_loss, bool mean, int64_t chunk_size, bool compute_grad, at::ScalarType acc, RowStep row_step,
    Scratch scratch_for) {
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto fopts = hidden.options().dtype(acc);
  const int64_t n_valid = N ? labels.ne(ignore_index).sum().item<int64_t>() : 0;
  Options o{ignore_index, label_smoothing, softcap, z_loss,
            mean ? 1.0 / static_cast<double>(std::max<int64_t>(n_valid, 1)) : 1.0, compute_grad};

  at::Tensor dhidden = compute_grad ? at::empty({N, H}, hidden.options()) : at::empty({0}, hidden.options());
  // dweight is the sum over all chunks: accumulate in acc precision (float32 for bf16/fp16 inputs). The first
  // chunk overwrites it (zeros only when there is no chunk).
  at::Tensor dweight_acc = !compute_grad ? at::empty({0}, fopts)
                           : N > 0      ? at::empty({V, H}, fopts)
                                        : at::zeros({V, H}, fopts);
  at::Tensor dbias_acc = (compute_grad && bias) ? at::zeros({V}, fopts) : at::empty({0}, fopts);
  at::Tensor loss_sum = at::zeros({}, hidden.options().dtype(at::kDouble));
  const at::Tensor wt = weight.t();
  const int64_t C = chunk_size > 0 ? std::min(chunk_size, std::max<int64_t>(N, 1)) : auto_chunk(N, H, V);
  const at::Tensor ones = (compute_grad && bias) ? at::ones({C}, fopts) : at::Tensor();
  const at::Tensor scratch = N > 0 ? scratch_for(C, V) : at::Tensor();

  for (int64_t start = 0; start < N; start += C) {
    const int64_t c = std::min(C, N - start);
    const at::Tensor h = hidden.narrow(0, start, c);                          // (c, H)
    at::Tensor z;                                                              // (c, V) acc dtype
    if (scratch.defined()) {
      z = scratch.narrow(0, 0, c);
      if (!bias && hidden.scalar_type() == acc) at::mm_out(z, h, wt);
      else z.copy_(bias ? at::addmm(*bias, h, wt) : at::mm(h, wt));          // rounded to the input dtype first
    } else {
      at::Tensor logits = bias ? at::addmm(*bias, h, wt) : at::mm(h, wt);      // (c, V) input dtype
      z = logits.scalar_type() == acc ? logits : logits.to(acc);
    }
    at::Tensor loss = at::empty({c}, fopts);
    row_step(z, labels.narrow(0, start, c), loss, o);
    loss_sum.add_(loss.sum(at::kDouble));
    if (!compute_grad) continue;
    const at::Tensor g = z.scalar_type() == hidden.scalar_type() ? z : z.to(hidden.scalar_type());
    at::Tensor dh = dhidden.narrow(0, start, c);                               // (c, H)
    at::mm_out(dh, g, weight);
    // (V, c) @ (c, H) in acc precision: bf16 products are exact in fp32, no (V, H) low-precision temporary
    const at::Tensor ha = h.scalar_type() == acc ? h : h.to(acc);
    if (start == 0) {
      at::mm_out(dweight_acc, z.t(), ha);
    } else {
      dweight_acc.addmm_(z.t(), ha);
    }
    if (bias) dbias_acc.addmv_(z.t(), ones.narrow(0, 0, c));
  }
  at::Tensor loss = (mean ? loss_sum / static_cast<double>(std::max<int64_t>(n_valid, 1)) : loss_sum).to(acc);
  at::Tensor dweight = compute_grad ? dweight_acc.to(weight.scalar_type()) : at::empty({0}, weight.options());
  at::Tensor dbias = (compute_grad && bias) ? dbias_acc.to(bias->scalar_type()) : at::empty({0}, weight.options());
  return {loss, dhidden, dweight, dbias};
}

}  // namespace lce
}  // namespace pyllm
