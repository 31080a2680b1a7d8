// CPU kernels for pyllm::gelu_tanh_fwd / pyllm::gelu_tanh_bwd: GELU's tanh approximation (GPT-2's gelu_new,
// torch's approximate="tanh"), elementwise over contiguous tensors. The op contract is in csrc/pyllm.cpp.
//
// y = 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3), evaluated as y = x s with
//   s = sigmoid(2u) = 1 / (1 + exp(-2u))        (0.5 (1 + tanh u) is exactly sigmoid(2u))
// one exp and one division per element instead of a tanh (ATen's tanh form costs ~5x its erf form on the CPU;
// the exact erf form is left to torch, whose kernel for it is fast), and no cancellation in 1 + tanh(u) for
// negative x. Gradient: dy/dx = s + x s (1 - s) 2 sqrt(2 / pi) (1 + 3 0.044715 x^2).
// Math in fp32 (fp64 for fp64) with at::vec; fp16/bf16 are widened and narrowed chunk by chunk (round to
// nearest even). Threads: at::parallel_for over chunks; calls under ~16K elements stay on one thread.
#include "vec_capability.h"  // before ATen: the widest at::vec this build targets

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <type_traits>

namespace pyllm {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kChunk = 2048;   // elements widened at a time (fp16 / bf16)
constexpr int64_t kGrain = 16384;  // elements per parallel task, at least

constexpr double kSqrt2OverPi = 0.7978845608028654, kCoeff = 0.044715;

template <typename A>
struct GeluTanh {
  using V = at::vec::Vectorized<A>;
  // s = sigmoid(2u) = 1 / (1 + exp(-2u)), 2u = x (2 sqrt(2 / pi) + 2 sqrt(2 / pi) 0.044715 x^2)
  static V sigmoid_2u(V x, V x2) {
    const V two_u = x * (V(A(2 * kSqrt2OverPi)) + V(A(2 * kSqrt2OverPi * kCoeff)) * x2);
    return V(A(1)) / (V(A(1)) + (V(A(0)) - two_u).exp());
  }
  static V fwd(V x) { return x * sigmoid_2u(x, x * x); }
  static V bwd(V x, V g) {  // g dy/dx
    const V x2 = x * x, s = sigmoid_2u(x, x2);
    const V d2u = V(A(2 * kSqrt2OverPi)) + V(A(6 * kSqrt2OverPi * kCoeff)) * x2;
    return g * (s + x * s * (V(A(1)) - s) * d2u);
  }
};

// out[i] = f(x[i], g[i]) (g = x when g is nullptr), computed in A: fp32 / fp64 directly, fp16 / bf16 through
// widened chunks.
template <typename T, typename F>
void elementwise(const T* x, const T* g, T* out, int64_t n, F&& f) {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, A>) {
      if (g == nullptr)
        at::vec::map([&](V a) { return f(a, a); }, out + begin, x + begin, end - begin);
      else
        at::vec::map2([&](V a, V b) { return f(a, b); }, out + begin, x + begin, g + begin, end - begin);
    } else {
      A xb[kChunk], gb[kChunk];
      for (int64_t i = begin; i < end; i += kChunk) {
        const int64_t m = std::min(kChunk, end - i);
        at::vec::convert(x + i, xb, m);
        if (g == nullptr) {
          at::vec::map([&](V a) { return f(a, a); }, xb, xb, m);
        } else {
          at::vec::convert(g + i, gb, m);
          at::vec::map2([&](V a, V b) { return f(a, b); }, xb, xb, gb, m);
        }
        at::vec::convert(xb, out + i, m);
      }
    }
  });
}

void check_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", dt);
}

at::Tensor gelu_tanh_fwd_cpu(const at::Tensor& x) {
  check_input(x, "gelu_tanh_fwd", "x");
  at::Tensor y = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_tanh_fwd_cpu", [&] {
    using V = at::vec::Vectorized<acc_t<scalar_t>>;
    elementwise<scalar_t>(x.const_data_ptr<scalar_t>(), nullptr, y.mutable_data_ptr<scalar_t>(), x.numel(),
                          [](V a, V) { return GeluTanh<acc_t<scalar_t>>::fwd(a); });
  });
  return y;
}

at::Tensor gelu_tanh_bwd_cpu(const at::Tensor& dy, const at::Tensor& x) {
  check_input(x, "gelu_tanh_bwd", "x");
  check_input(dy, "gelu_tanh_bwd", "dy");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "gelu_tanh_bwd: dy must have x's shape ",
              x.sizes(), " and dtype ", x.scalar_type(), ", got ", dy.sizes(), " ", dy.scalar_type());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_tanh_bwd_cpu", [&] {
    using V = at::vec::Vectorized<acc_t<scalar_t>>;
    elementwise<scalar_t>(x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                          dx.mutable_data_ptr<scalar_t>(), x.numel(),
                          [](V a, V g) { return GeluTanh<acc_t<scalar_t>>::bwd(a, g); });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CPU, m) {
  m.impl("gelu_tanh_fwd", &gelu_tanh_fwd_cpu);
  m.impl("gelu_tanh_bwd", &gelu_tanh_bwd_cpu);
}

}  // namespace pyllm
