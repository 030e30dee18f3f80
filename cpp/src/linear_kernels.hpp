// Internal: linear's forward loop, included by linear.cpp (baseline instruction set) and by
// linear_avx512.cpp (compiled with -mavx512f -ffp-contract=off). Everything here has internal
// linkage and uses no standard-library templates, so that no function compiled for AVX-512
// can be shared with, and picked by the linker for, the baseline code.
#pragma once

#include <cstdint>
#include <cstring>

namespace cnnbp::detail {

// Outputs [o0, o0 + kLinearBlock) of rows [m0, m1) (those below OUT written):
//   output[m, o] = bias[o] + x[m, 0] * w[o, 0] + x[m, 1] * w[o, 1] + ...
// summed in order of i, each product rounded before its addition, as the plain loop does;
// the lanes run along o, over the block's weights transposed: `block` (IN x kLinearBlock),
// block[i, j] = w[o0 + j, i], zero past OUT. The baseline build, and the AVX-512 build (only
// in builds that define CNNBP_AVX512_KERNELS, to be called only when
// avx512_kernels_enabled()).
constexpr int64_t kLinearBlock = 16;
#define CNNBP_LINEAR_BLOCK(name, T)                                                              \
    void name(T* output, const T* input, const T* block, const T* bias, int64_t IN, int64_t OUT, \
              int64_t m0, int64_t m1, int64_t o0)
CNNBP_LINEAR_BLOCK(linear_block_f32_baseline, float);
CNNBP_LINEAR_BLOCK(linear_block_f64_baseline, double);
CNNBP_LINEAR_BLOCK(linear_block_f32_avx512, float);
CNNBP_LINEAR_BLOCK(linear_block_f64_avx512, double);

namespace {

template <typename T>
inline void linear_block(T* __restrict output, const T* __restrict input, const T* __restrict block,
                         const T* bias, int64_t IN, int64_t OUT, int64_t m0, int64_t m1,
                         int64_t o0) {
    constexpr int64_t B = kLinearBlock, kRows = 4;
    const int64_t outputs = OUT - o0 < B ? OUT - o0 : B;
    // a block of outputs as one vector (GCC's vector extension: one register of AVX-512 floats,
    // four of the baseline's), so that the sums stay in registers
    typedef T V __attribute__((vector_size(B * sizeof(T))));
    T start_values[B];
    for (int64_t o = 0; o < B; ++o) start_values[o] = bias && o < outputs ? bias[o0 + o] : T(0);
    V start;
    std::memcpy(&start, start_values, sizeof start);
    for (int64_t m = m0; m < m1; m += kRows) {
        const int64_t rows = m1 - m < kRows ? m1 - m : kRows;
        V acc[kRows];
        for (int64_t r = 0; r < kRows; ++r) acc[r] = start;
        // rows past m1 re-read the last row; their sums are not written
        const T* x[kRows];
        for (int64_t r = 0; r < kRows; ++r) x[r] = input + (m + (r < rows ? r : rows - 1)) * IN;
        for (int64_t i = 0; i < IN; ++i) {
            V w;
            std::memcpy(&w, block + i * B, sizeof w);
            for (int64_t r = 0; r < kRows; ++r) acc[r] += x[r][i] * w;
        }
        for (int64_t r = 0; r < rows; ++r) {
            T sums[B];
            std::memcpy(sums, &acc[r], sizeof sums);
            for (int64_t o = 0; o < outputs; ++o) output[(m + r) * OUT + o0 + o] = sums[o];
        }
    }
}

}  // namespace
}  // namespace cnnbp::detail
