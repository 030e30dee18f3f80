// Micro-kernels for AVX2 + FMA (16 ymm registers: 12 accumulators). Compiled with
// -mavx2 -mfma; called only after the CPU reported both.
#include "gemm_microkernel.hpp"

namespace cnnbp::detail {
MicroKernel<float> micro_kernel_avx2_f32() { return {6, 16, micro_kernel<float, 8, 6, 2>,
            tap_kernel<float, 8, 6, 2>, "avx2"}; }
MicroKernel<double> micro_kernel_avx2_f64() { return {6, 8, micro_kernel<double, 4, 6, 2>,
            tap_kernel<double, 4, 6, 2>, "avx2"}; }
DotKernel<float> dot_kernel_avx2_f32() { return {2, 4, dot_kernel<float, 8, 2, 4>}; }
DotKernel<double> dot_kernel_avx2_f64() { return {2, 4, dot_kernel<double, 4, 2, 4>}; }
GatherKernel<float> gather_kernel_avx2_f32() {
    return {4, 16, gather_a_kernel<float, 8, 4, 2>};
}
GatherKernel<double> gather_kernel_avx2_f64() {
    return {4, 8, gather_a_kernel<double, 4, 4, 2>};
}
}  // namespace cnnbp::detail
