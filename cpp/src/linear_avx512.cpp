// linear's forward loop built for AVX-512F (16 lanes instead of the baseline's 4). Compiled
// with -ffp-contract=off so that no multiply-add is fused: the bits are the baseline's.
#include "linear_kernels.hpp"

#if defined(CNNBP_AVX512_KERNELS)
namespace cnnbp::detail {

CNNBP_LINEAR_BLOCK(linear_block_f32_avx512, float) {
    linear_block(output, input, block, bias, IN, OUT, m0, m1, o0);
}
CNNBP_LINEAR_BLOCK(linear_block_f64_avx512, double) {
    linear_block(output, input, block, bias, IN, OUT, m0, m1, o0);
}

}  // namespace cnnbp::detail
#endif
