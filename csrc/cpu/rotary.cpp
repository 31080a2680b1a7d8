// CPU kernel for pyllm::rotary (rotary position embeddings on q and k in one call). The op contract
// (shapes, dtypes, the pair layouts) is in csrc/pyllm.cpp.
//
// Per row x (one token, one head), with c = cos[b, n, i], s = sin[b, n, i] and the pair (x1, x2) =
// (x[i], x[i + R/2]) (rotate-half, GPT-NeoX / Llama) or (x[2i], x[2i + 1]) (interleaved, GPT-J):
//   out1 = x1 * c - x2 * s,   out2 = x2 * c + x1 * s        (conjugate: s -> -s, the backward pass)
// dims R..D-1 are copied. Math in fp32 (fp64 for fp64 tensors), one read and one write per element.
// Threads: at::parallel_for over rows (B * N * H), serial unless built with -fopenmp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

namespace pyllm {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
void rotate(const at::Tensor& x, at::Tensor& out, const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
            bool conjugate) {
  using A = acc_t<T>;
  const int64_t B = x.size(0), N = x.size(1), H = x.size(2), D = x.size(3), half = cos.size(2);
  const int64_t sb = x.stride(0), sn = x.stride(1), sh = x.stride(2);
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0);  // cos/sin broadcast over batch when Bc == 1
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const A* cp = cos.data_ptr<A>();
  const A* spp = sin.data_ptr<A>();
  const A sign = conjugate ? A(-1) : A(1);
  at::parallel_for(0, B * N * H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (N * H), n = (r / H) % N, h = r % H;
      const T* xr = xp + b * sb + n * sn + h * sh;
      T* orow = op + r * D;
      const A* c = cp + b * cb + n * half;
      const A* s = spp + b * cb + n * half;
      if (interleaved) {
        for (int64_t i = 0; i < half; ++i) {
          const A x1 = static_cast<A>(xr[2 * i]), x2 = static_cast<A>(xr[2 * i + 1]), si = sign * s[i];
          orow[2 * i] = static_cast<T>(x1 * c[i] - x2 * si);
          orow[2 * i + 1] = static_cast<T>(x2 * c[i] + x1 * si);
        }
      } else {
        for (int64_t i = 0; i < half; ++i) {
          const A x1 = static_cast<A>(xr[i]), x2 = static_cast<A>(xr[i + half]), si = sign * s[i];
          orow[i] = static_cast<T>(x1 * c[i] - x2 * si);
          orow[i + half] = static_cast<T>(x2 * c[i] + x1 * si);
        }
      }
      for (int64_t i = 2 * half; i < D; ++i) orow[i] = xr[i];
    }
  });
}

void check_input(const at::Tensor& x, const char* name, const at::Tensor& q, const at::Tensor& cos) {
  TORCH_CHECK(x.device().is_cpu(), "rotary: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "rotary: ", name, " must be (batch, seqlen, heads, head_dim), got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == q.scalar_type(), "rotary: ", name, " has dtype ", x.scalar_type(), " but q has ",
              q.scalar_type());
  TORCH_CHECK(x.size(0) == q.size(0) && x.size(1) == q.size(1) && x.size(3) == q.size(3), "rotary: ", name,
              " has shape ", x.sizes(), "; expected (", q.size(0), ", ", q.size(1), ", heads, ", q.size(3), ") like q");
  TORCH_CHECK(x.size(3) <= 1 || x.stride(3) == 1, "rotary: ", name, "'s last dim must be contiguous");
  TORCH_CHECK(2 * cos.size(2) <= x.size(3), "rotary: cos has ", cos.size(2), " frequencies, more than head_dim ",
              x.size(3), " / 2");
}

std::tuple<at::Tensor, at::Tensor> rotary_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                              const at::Tensor& sin, bool interleaved, bool conjugate) {
  check_input(q, "q", q, cos);
  check_input(k, "k", q, cos);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(cos.scalar_type() == acc && sin.scalar_type() == acc, "rotary: cos and sin must be ", acc,
              " for ", q.scalar_type(), " inputs, got ", cos.scalar_type(), " and ", sin.scalar_type());
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.is_contiguous() && sin.is_contiguous(),
              "rotary: cos and sin must be contiguous (batch or 1, seqlen, rotary_dim / 2), got ", cos.sizes(),
              " and ", sin.sizes());
  TORCH_CHECK((cos.size(0) == 1 || cos.size(0) == q.size(0)) && cos.size(1) == q.size(1), "rotary: cos has shape ",
              cos.sizes(), "; expected (1 or ", q.size(0), ", ", q.size(1), ", rotary_dim / 2)");
  at::Tensor qo = at::empty(q.sizes(), q.options()), ko = at::empty(k.sizes(), k.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rotary_cpu", [&] {
    rotate<scalar_t>(q, qo, cos, sin, interleaved, conjugate);
    rotate<scalar_t>(k, ko, cos, sin, interleaved, conjugate);
  });
  return {qo, ko};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CPU, m) { m.impl("rotary", &rotary_cpu); }

}  // namespace pyllm
