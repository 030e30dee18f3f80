// batch_norm2d's loops built for AVX-512F (8 doubles or 16 floats a vector instead of the
// baseline's 2 or 4). Compiled with -ffp-contract=off so that no multiply-add is fused: the
// bits are the baseline's.
#include "batch_norm2d_kernels.hpp"

#if defined(CNNBP_AVX512_KERNELS)
namespace cnnbp::detail {

BatchNorm2dKernels<float> batch_norm2d_kernels_f32_avx512() { return bn_kernels<float>(); }
BatchNorm2dKernels<double> batch_norm2d_kernels_f64_avx512() { return bn_kernels<double>(); }

}  // namespace cnnbp::detail
#endif
