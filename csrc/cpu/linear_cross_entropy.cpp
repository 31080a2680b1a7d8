// CPU kernel of pyllm::linear_cross_entropy_fwd: the chunk loop of csrc/linear_cross_entropy.h (at::mm on
// chunks of tokens) with the per-row loss and softmax gradient below, one row per task, SIMD through
// at::vec::Vectorized. Per row of V logits z (softcapped: z = cap * tanh(z / cap)), label y, smoothing e:
//   lse  = log sum_j exp(z_j)
//   loss = lse - (1 - e) z_y - e mean_j z_j + z_loss lse^2                (0 when y == ignore_index)
//   dz_j = s * (softmax_j (1 + 2 z_loss lse) - e / V - (1 - e) [j == y])  (s = 1/n_valid for mean)
//   with a softcap, dlogits_j = dz_j (1 - tanh_j^2).
// The widest at::vec implementation this compilation targets (without it Vectorized<float> is the generic
// scalar fallback and exp/tanh run one element at a time); before any ATen include.
#include "vec_capability.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "linear_cross_entropy.h"

namespace pyllm {
namespace {

using at::vec::Vectorized;

// One row: returns its loss; with o.compute_grad, overwrites z with dloss/dlogits. bias (V,) or nullptr: added
// to z first, while the row is in cache (z then holds hidden @ weight^T without it).
template <typename T>
T row_loss_grad(T* z, const T* bias, int64_t V, int64_t y, const lce::Options& o) {
  using Vec = Vectorized<T>;
  const T cap = static_cast<T>(o.softcap), eps = static_cast<T>(o.label_smoothing);
  if (y == o.ignore_index) {
    if (o.compute_grad) std::fill(z, z + V, T(0));
    return T(0);
  }
  TORCH_CHECK(y >= 0 && y < V, "linear_cross_entropy: label ", y, " is out of range [0, ", V, ")");
  if (bias != nullptr) at::vec::map2([](Vec x, Vec b) { return x + b; }, z, z, bias, V);
  if (cap > 0) {
    at::vec::map([cap](Vec x) { return (x / Vec(cap)).tanh() * Vec(cap); }, z, z, V);
  }
  const T m = at::vec::reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, z, V);
  const T zy = z[y];
  const T sum_z = eps > 0 ? at::vec::reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, z, V) : T(0);
  // Without a softcap and with the gradient wanted, the exponentials are kept in z (one exp per logit, not two):
  // the gradient pass is then a multiply-add over the row, which is in L1.
  const bool keep_exp = o.compute_grad && !(cap > 0);
  T s;
  if (keep_exp) {
    Vec acc(T(0));
    int64_t j = 0;
    for (; j + Vec::size() <= V; j += Vec::size()) {
      const Vec e = (Vec::loadu(z + j) - Vec(m)).exp();
      e.store(z + j);
      acc = acc + e;
    }
    s = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc);
    for (; j < V; ++j) {
      z[j] = std::exp(z[j] - m);
      s += z[j];
    }
  } else {
    s = at::vec::map_reduce_all<T>([m](Vec x) { return (x - Vec(m)).exp(); }, [](Vec& a, Vec& b) { return a + b; },
                                   z, V);
  }
  const T lse = m + std::log(s);
  T loss = lse - (T(1) - eps) * zy + static_cast<T>(o.z_loss) * lse * lse;
  if (eps > 0) loss -= eps * sum_z / static_cast<T>(V);
  if (!o.compute_grad) return loss;
  const T scale = static_cast<T>(o.grad_scale);
  const T pmul = scale * (T(1) + T(2) * static_cast<T>(o.z_loss) * lse), shift = scale * eps / static_cast<T>(V);
  if (keep_exp) {  // z holds exp(z - m): softmax = z / s
    const T f = pmul / s;
    at::vec::map([=](Vec e) { return e * Vec(f) - Vec(shift); }, z, z, V);
    z[y] -= scale * (T(1) - eps);
    return loss;
  }
  // softcapped (z holds the capped logits): d(cap tanh(x / cap))/dx = 1 - (z / cap)^2
  at::vec::map([=](Vec x) {
    Vec t = x / Vec(cap);
    return ((x - Vec(lse)).exp() * Vec(pmul) - Vec(shift)) * (Vec(T(1)) - t * t);
  }, z, z, V);
  const T t = zy / cap;
  z[y] -= scale * (T(1) - eps) * (T(1) - t * t);
  return loss;
}

template <typename T>
void rows_cpu(at::Tensor z, const at::Tensor& labels, at::Tensor loss, const lce::Options& o, const T* bias) {
  const int64_t c = z.size(0), V = z.size(1);
  T* zp = z.data_ptr<T>();
  T* lp = loss.data_ptr<T>();
  const int64_t* yp = labels.data_ptr<int64_t>();
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) lp[r] = row_loss_grad<T>(zp + r * V, bias, V, yp[r], o);
  });
}

// The CPU's default chunk: Liger's rule (lce::auto_chunk), raised to as many rows as fit kChunkBytes of
// float32 logits (small vocabularies: few, larger matmuls). 16 MiB: at N 2048, H 256, V 8192 (2 threads, Emerald
// Rapids, 2026-12-01) a call's three products took 87-88 ms in 512-row chunks, 95-97 ms in 256-row ones and 92-103
// ms in 768- and 1024-row ones (the chunk's logits no longer stay in the cache between the products).
constexpr int64_t kChunkBytes = int64_t(16) << 20;

int64_t cpu_chunk(int64_t N, int64_t H, int64_t V) {
  int64_t fit = 1;
  while (2 * fit * V * int64_t(sizeof(float)) <= kChunkBytes) fit <<= 1;
  return std::max<int64_t>(std::min(std::max(fit, lce::auto_chunk(N, H, V)), N), 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing, double softcap,
    double z_loss, bool mean, int64_t chunk_size, bool compute_grad) {
  lce::check_inputs("linear_cross_entropy", hidden, weight, labels, bias);
  const bool fp64 = hidden.scalar_type() == at::kDouble;
  const auto acc = fp64 ? at::kDouble : at::kFloat;
  if (chunk_size <= 0) chunk_size = cpu_chunk(hidden.size(0), hidden.size(1), weight.size(0));
  // fp32 / fp64: the bias is added by the row step (logits = at::mm, not at::addmm, whose first pass copies the
  // bias into all (chunk, V) logits) and dbias, the column sum of dlogits, is accumulated here. fp16 / bf16
  // keep at::addmm: their logits are rounded to the input dtype with the bias in, as F.linear rounds them.
  const bool fold = bias.has_value() && hidden.scalar_type() == acc;
  const at::Tensor b = fold ? bias->contiguous() : at::Tensor();
  at::Tensor dbias_acc, ones;
  if (fold && compute_grad) {
    dbias_acc = at::zeros({weight.size(0)}, hidden.options());
    ones = at::ones({std::min(chunk_size, std::max<int64_t>(hidden.size(0), 1))}, hidden.options());
  }
  auto step = [&](at::Tensor z, const at::Tensor& y, at::Tensor loss, const lce::Options& o) {
    if (fp64) {
      rows_cpu<double>(z, y, loss, o, fold ? b.data_ptr<double>() : nullptr);
    } else {
      rows_cpu<float>(z, y, loss, o, fold ? b.data_ptr<float>() : nullptr);
    }
    if (dbias_acc.defined()) dbias_acc.addmv_(z.t(), ones.narrow(0, 0, z.size(0)));
  };
  // One logits buffer for all of a call's chunks, allocated once per call: a fresh multi-megabyte block is not
  // free (glibc hands large freed blocks back to the OS, and every page of a new one faults in zeroed), and the
  // chunks used to allocate one each. Not kept between calls: at N 2048, H 256, V 8192 keeping it per thread saved
  // ~1 of 94 ms, and memory a call leaves behind is memory the caller did not ask for.
  const auto scratch = [&](int64_t rows, int64_t V) { return at::empty({rows, V}, hidden.options().dtype(acc)); };
  if (!fold) {
    return lce::chunked_forward(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, z_loss, mean,
                                chunk_size, compute_grad, acc, step, scratch);
  }
  auto out = lce::chunked_forward(hidden, weight, labels, std::nullopt, ignore_index, label_smoothing, softcap,
                                  z_loss, mean, chunk_size, compute_grad, acc, step, scratch);
  if (dbias_acc.defined()) std::get<3>(out) = dbias_acc;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CPU, m) { m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cpu); }

}  // namespace pyllm
