// Internal: which instruction set the kernels may use, decided once for the process.
#pragma once

namespace cnnbp::detail {

enum class Isa { generic = 0, avx2 = 1, avx512 = 2 };

// The widest set the CPU supports (AVX-512F; AVX2 with FMA; else the baseline), capped by
// the environment variable CNNBP_ISA ("generic", "avx2" or "avx512"; anything else is no
// cap) so the narrower kernels can be tested on a wide machine. Always generic off x86-64.
Isa cpu_isa();

// True when this build has the AVX-512 pooling and elementwise kernels and cpu_isa()
// allows them.
bool avx512_kernels_enabled();

}  // namespace cnnbp::detail
