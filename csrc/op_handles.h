// Typed dispatcher handles of the pyllm ops called from C++ (autograd.cpp, small_calls.cpp): a call through
// the handle goes through the dispatcher as a Python torch.ops call does (autograd, profiling, dispatch
// modes), without boxing the arguments. Signatures as in the schemas of csrc/pyllm.cpp.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace pyllm {
namespace ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using LayerNormFwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                                 const OptTensor&, double, bool);
using LayerNormBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                        const Tensor&, const Tensor&, const OptTensor&, bool, bool);
using AttentionFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool,
                                                double);
using AttentionBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                        const Tensor&, const Tensor&, const OptTensor&, bool, double,
                                                        bool);

using Rotary = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, bool);
using LinearDecode = Tensor(const Tensor&, const Tensor&, const OptTensor&);
using GeluTanhFwd = Tensor(const Tensor&);

inline constexpr char kLayerNormFwd[] = "pyllm::layer_norm_fwd";
inline constexpr char kLayerNormBwd[] = "pyllm::layer_norm_bwd";
inline constexpr char kAttentionFwd[] = "pyllm::attention_fwd";
inline constexpr char kAttentionBwd[] = "pyllm::attention_bwd";
inline constexpr char kRotary[] = "pyllm::rotary";
inline constexpr char kLinearDecode[] = "pyllm::linear_decode";
inline constexpr char kGeluTanhFwd[] = "pyllm::gelu_tanh_fwd";

// The handle of op `Name` (looked up once, on first use).
template <typename Sig, const char* Name>
const c10::TypedOperatorHandle<Sig>& handle() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").typed<Sig>();
  return op;
}

inline const auto& layer_norm_fwd() { return handle<LayerNormFwd, kLayerNormFwd>(); }
inline const auto& layer_norm_bwd() { return handle<LayerNormBwd, kLayerNormBwd>(); }
inline const auto& attention_fwd() { return handle<AttentionFwd, kAttentionFwd>(); }
inline const auto& attention_bwd() { return handle<AttentionBwd, kAttentionBwd>(); }
inline const auto& rotary() { return handle<Rotary, kRotary>(); }
inline const auto& linear_decode() { return handle<LinearDecode, kLinearDecode>(); }
inline const auto& gelu_tanh_fwd() { return handle<GeluTanhFwd, kGeluTanhFwd>(); }

}  // namespace ops
}  // namespace pyllm
