// linear forward and backward: input (M, IN), weight (OUT, IN), output (M, OUT).
#include "cnnbp/linear.hpp"

#include <algorithm>
#include <vector>

#include "isa.hpp"
#include "linear_kernels.hpp"
#include "parallel.hpp"

namespace cnnbp {

namespace detail {

CNNBP_LINEAR_BLOCK(linear_block_f32_baseline, float) {
    linear_block(output, input, block, bias, IN, OUT, m0, m1, o0);
}
CNNBP_LINEAR_BLOCK(linear_block_f64_baseline, double) {
    linear_block(output, input, block, bias, IN, OUT, m0, m1, o0);
}

}  // namespace detail

// Rows of the batch per work item.
constexpr int64_t kLinearRows = 16;
// The loop runs at tens of multiply-adds a nanosecond: below this many, waking a second
// thread costs more than it saves ((64, 256) by (10, 256): 7 us on one thread, slower on
// two, measured).
constexpr int64_t kMinLinearParallelWork = int64_t(1) << 20;

template <typename T>
using LinearBlock = void (*)(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t,
                             int64_t);

// The forward loop for this CPU: the AVX-512 build when it runs here (the same bits).
template <typename T>
LinearBlock<T> linear_block_for_cpu();
template <>
LinearBlock<float> linear_block_for_cpu<float>() {
#if defined(CNNBP_AVX512_KERNELS)
    if (detail::avx512_kernels_enabled()) return detail::linear_block_f32_avx512;
#endif
    return detail::linear_block_f32_baseline;
}
template <>
LinearBlock<double> linear_block_for_cpu<double>() {
#if defined(CNNBP_AVX512_KERNELS)
    if (detail::avx512_kernels_enabled()) return detail::linear_block_f64_avx512;
#endif
    return detail::linear_block_f64_baseline;
}

// output (M x OUT) = bias + input (M x IN) . weight^T, every sum in order of i (the plain
// loop's bits) with the lanes along the outputs (linear_kernels.hpp), over the weight
// transposed once per call into blocks of kLinearBlock outputs. Threads split the blocks'
// transposes, then (block, run of rows) items, so a batch of one splits too.
template <typename T>
void linear_forward(T* output, const T* input, const T* weight, const T* bias,
                    const LinearDims& d) {
    constexpr int64_t B = detail::kLinearBlock;
    const LinearBlock<T> run = linear_block_for_cpu<T>();
    const int64_t blocks = (d.OUT + B - 1) / B, row_runs = (d.M + kLinearRows - 1) / kLinearRows;
    std::vector<T> transposed(size_t(blocks * d.IN * B));  // block b: (IN x B)
    detail::parallel_for_if(blocks * d.IN * B >= kMinLinearParallelWork, blocks,
                            [&](int64_t begin, int64_t end) {
                                for (int64_t b = begin; b < end; ++b) {
                                    T* to = transposed.data() + b * d.IN * B;
                                    for (int64_t j = 0; j < B; ++j) {
                                        const int64_t o = b * B + j;
                                        if (o < d.OUT)
                                            for (int64_t i = 0; i < d.IN; ++i)
                                                to[i * B + j] = weight[o * d.IN + i];
                                        else
                                            for (int64_t i = 0; i < d.IN; ++i) to[i * B + j] = T(0);
                                    }
                                }
                            });
    detail::parallel_for_if(d.M * d.OUT * d.IN >= kMinLinearParallelWork, blocks * row_runs,
                            [&](int64_t begin, int64_t end) {
                                for (int64_t item = begin; item < end; ++item) {
                                    const int64_t b = item % blocks,
                                                  m0 = item / blocks * kLinearRows;
                                    run(output, input, transposed.data() + b * d.IN * B, bias, d.IN,
                                        d.OUT, m0, std::min(d.M, m0 + kLinearRows), b * B);
                                }
                            });
}

namespace {

// out (rows x IN), row r = sum_j g[r * g_row + j * g_col] * src (terms x IN) row j, summed
// in order of j; rows are split among threads.
template <typename T>
void sum_scaled_rows(T* out, int64_t rows, const T* g, int64_t g_row, int64_t g_col, const T* src,
                     int64_t terms, int64_t IN) {
    detail::parallel_for(rows, rows * terms * IN, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            T* o = out + r * IN;
            for (int64_t i = 0; i < IN; ++i) o[i] = T(0);
            for (int64_t j = 0; j < terms; ++j) {
                const T gj = g[r * g_row + j * g_col];
                const T* s = src + j * IN;
                for (int64_t i = 0; i < IN; ++i) o[i] += gj * s[i];
            }
        }
    });
}

}  // namespace

template <typename T>
void linear_backward(T* dinput, T* dweight, T* dbias, const T* doutput, const T* input,
                     const T* weight, const LinearDims& d) {
    // dinput = doutput . weight: row m of dinput gathers doutput[m, o] * weight[o, :]
    if (dinput) sum_scaled_rows(dinput, d.M, doutput, d.OUT, 1, weight, d.OUT, d.IN);
    // dweight = doutput^T . input: row o of dweight sums doutput[m, o] * input[m, :] over m
    if (dweight) sum_scaled_rows(dweight, d.OUT, doutput, 1, d.OUT, input, d.M, d.IN);
    if (dbias) {
        for (int64_t o = 0; o < d.OUT; ++o) dbias[o] = T(0);
        for (int64_t m = 0; m < d.M; ++m)
            for (int64_t o = 0; o < d.OUT; ++o) dbias[o] += doutput[m * d.OUT + o];
    }
}

#define CNNBP_INSTANTIATE(T)                                                              \
    template void linear_forward<T>(T*, const T*, const T*, const T*, const LinearDims&); \
    template void linear_backward<T>(T*, T*, T*, const T*, const T*, const T*, const LinearDims&);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
