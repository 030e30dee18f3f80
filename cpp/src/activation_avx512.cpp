// The float sigmoid loop built for AVX-512F (16 lanes instead of the baseline's 4). Compiled
// with -ffp-contract=off so that no multiply-add is fused: the bits are the baseline's.
#include "activation_kernels.hpp"

#if defined(CNNBP_AVX512_KERNELS)
namespace cnnbp::detail {

void sigmoid_f32_avx512(float* a, const float* z, int64_t count) { sigmoid_f32(a, z, count); }

}  // namespace cnnbp::detail
#endif
