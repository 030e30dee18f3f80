// Micro-kernels for AVX2 + FMA (16 ymm registers). Compiled with -mavx2 -mfma; used only
// after the CPU reported both.
#include "gemm_microkernel.hpp"

namespace cnnbp::detail {

namespace {
struct Avx2Blocking {  // kernel_set's constants for 16 vector registers
    static constexpr int MR = 6, NV = 2, NARROW_NV = 8, DOT_MR = 2, DOT_NR = 4;
    static constexpr int GATHER_MR = 4, GATHER_NV = 2, NARROW_GATHER_MR = 8;
    static constexpr bool HALF_GATHER = true;
};
}  // namespace

KernelSet<float> kernels_avx2_f32() { return kernel_set<float, 32, Avx2Blocking>("avx2"); }
KernelSet<double> kernels_avx2_f64() { return kernel_set<double, 32, Avx2Blocking>("avx2"); }

}  // namespace cnnbp::detail
