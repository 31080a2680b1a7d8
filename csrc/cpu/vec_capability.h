// Include before any ATen header: selects the widest at::vec implementation this compilation targets.
// torch's own kernels get CPU_CAPABILITY from their build flags; an extension must ask for it itself, or
// at::vec::Vectorized is the generic scalar fallback.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif
