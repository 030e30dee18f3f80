// Internal: whether the AVX-512 versions of the pooling and elementwise kernels may run.
#pragma once

namespace cnnbp::detail {

// True when this build has them (x86-64, GCC or Clang), the CPU has AVX-512F, and the
// environment variable CNNBP_ISA does not cap the instruction set below it ("generic" or
// "avx2", as for the GEMM kernels, so that the portable loops can be tested on a wide
// machine). Decided once.
bool avx512_kernels_enabled();

}  // namespace cnnbp::detail
