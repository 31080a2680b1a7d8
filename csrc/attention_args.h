// The feature arguments of pyllm::attention_ext_fwd/bwd (schema and contract in csrc/pyllm.cpp), gathered
// once from the op's arguments by each backend's binding (csrc/cpu/attention.cpp, csrc/cuda/bindings.cpp)
// before it converts them to what its kernels read. The op layer has validated the values.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace pyllm {

struct AttentionFeatureArgs {
  int64_t window_left = -1, window_right = -1;  // FlashAttention's window; -1 = unbounded
  double softcap = 0;                            // 0 = none
  std::optional<at::Tensor> alibi, bias;         // slopes (Hq,) or (B, Hq); additive bias broadcast to (B, Hq, Nq, Nk)
  double dropout_p = 0;
  int64_t seed = 0, offset = 0, drop_lq = 0, drop_lk = 0;  // Philox key and the dropout index space's lengths
};

}  // namespace pyllm
