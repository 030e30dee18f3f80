// Micro-kernels for any x86-64 / other CPU: the baseline instruction set only.
#include "gemm_microkernel.hpp"

namespace cnnbp::detail {
MicroKernel<float> micro_kernel_generic_f32() { return {4, 8, micro_kernel<float, 4, 4, 2>,
            tap_kernel<float, 4, 4, 2>, "generic"}; }
MicroKernel<double> micro_kernel_generic_f64() { return {4, 4, micro_kernel<double, 2, 4, 2>,
            tap_kernel<double, 2, 4, 2>, "generic"}; }
DotKernel<float> dot_kernel_generic_f32() { return {2, 2, dot_kernel<float, 4, 2, 2>}; }
DotKernel<double> dot_kernel_generic_f64() { return {2, 2, dot_kernel<double, 2, 2, 2>}; }
GatherKernel<float> gather_kernel_generic_f32() {
    return {2, 8, gather_a_kernel<float, 4, 2, 2>};
}
GatherKernel<double> gather_kernel_generic_f64() {
    return {2, 4, gather_a_kernel<double, 2, 2, 2>};
}
}  // namespace cnnbp::detail
