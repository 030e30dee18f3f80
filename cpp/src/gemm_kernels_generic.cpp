// Micro-kernels for any CPU: the baseline instruction set only (16-byte vectors).
#include "gemm_microkernel.hpp"

namespace cnnbp::detail {

namespace {
struct GenericBlocking {  // kernel_set's constants for 16 vector registers
    static constexpr int MR = 4, NV = 2, NARROW_NV = 4, DOT_MR = 2, DOT_NR = 2;
    static constexpr int GATHER_MR = 4, GATHER_NV = 2, NARROW_GATHER_MR = 4;
    static constexpr bool HALF_GATHER = false;
};
}  // namespace

KernelSet<float> kernels_generic_f32() { return kernel_set<float, 16, GenericBlocking>("generic"); }
KernelSet<double> kernels_generic_f64() {
    return kernel_set<double, 16, GenericBlocking>("generic");
}

}  // namespace cnnbp::detail
