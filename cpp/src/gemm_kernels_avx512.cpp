// Micro-kernels for AVX-512 (32 zmm registers). Compiled with -mavx512f -mfma; used only
// after the CPU reported AVX-512F.
#include "gemm_microkernel.hpp"

namespace cnnbp::detail {

namespace {
struct Avx512Blocking {  // kernel_set's constants for 32 vector registers
    static constexpr int MR = 8, NV = 3, NARROW_NV = 8, DOT_MR = 4, DOT_NR = 4;
    static constexpr int GATHER_MR = 6, GATHER_NV = 4, NARROW_GATHER_MR = 12;
    static constexpr bool HALF_GATHER = true;
};
}  // namespace

KernelSet<float> kernels_avx512_f32() { return kernel_set<float, 64, Avx512Blocking>("avx512"); }
KernelSet<double> kernels_avx512_f64() { return kernel_set<double, 64, Avx512Blocking>("avx512"); }

}  // namespace cnnbp::detail
