// Micro-kernels for AVX-512 (32 zmm registers: 24 accumulators). Compiled with -mavx512f
// -mfma; called only after the CPU reported AVX-512F.
#include "gemm_microkernel.hpp"

namespace cnnbp::detail {
MicroKernel<float> micro_kernel_avx512_f32() { return {8, 48, micro_kernel<float, 16, 8, 3>,
            tap_kernel<float, 16, 8, 3>, "avx512"}; }
MicroKernel<double> micro_kernel_avx512_f64() { return {8, 24, micro_kernel<double, 8, 8, 3>,
            tap_kernel<double, 8, 8, 3>, "avx512"}; }
DotKernel<float> dot_kernel_avx512_f32() { return {4, 4, dot_kernel<float, 16, 4, 4>}; }
DotKernel<double> dot_kernel_avx512_f64() { return {4, 4, dot_kernel<double, 8, 4, 4>}; }
GatherKernel<float> gather_kernel_avx512_f32() {
    return {6, 64, gather_a_kernel<float, 16, 6, 4>};
}
GatherKernel<double> gather_kernel_avx512_f64() {
    return {6, 32, gather_a_kernel<double, 8, 6, 4>};
}
}  // namespace cnnbp::detail
