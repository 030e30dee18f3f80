// linear forward and backward: input (M, IN), weight (OUT, IN), output (M, OUT).
#include "cnnbp/linear.hpp"

#include "parallel.hpp"

namespace cnnbp {

// Threads split the (m, o) outputs, not only the rows: one row (a batch of one) too.
template <typename T>
void linear_forward(T* output, const T* input, const T* weight, const T* bias,
                    const LinearDims& d) {
    detail::parallel_for(d.M * d.OUT, d.M * d.OUT * d.IN, [&](int64_t begin, int64_t end) {
        for (int64_t mo = begin; mo < end; ++mo) {
            const int64_t m = mo / d.OUT, o = mo % d.OUT;
            const T* x = input + m * d.IN;
            const T* w = weight + o * d.IN;
            T sum = bias ? bias[o] : T(0);
            for (int64_t i = 0; i < d.IN; ++i) sum += x[i] * w[i];
            output[mo] = sum;
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
