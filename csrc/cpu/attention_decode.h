// Flash-decoding on the CPU (issue 15): the attention forward for few query rows and many keys.
// attention.cpp's attention_fwd asks attention_decode_fwd first; it serves the call when it can (see
// csrc/cpu/attention_decode.cpp for when) and returns false otherwise, leaving the call to the blocked kernel.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace pyllm::cpu {

// q (B, Nq, Hq, D), k/v (B, Nk, Hkv, D), key_padding_mask (B, Nk) bool or none, already validated by the
// caller (csrc/pyllm.cpp's contract). On true, `result` holds (out, lse) exactly as attention_fwd defines them.
bool attention_decode_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& key_padding_mask, bool causal, double softmax_scale,
                          std::tuple<at::Tensor, at::Tensor>& result);

}  // namespace pyllm::cpu
