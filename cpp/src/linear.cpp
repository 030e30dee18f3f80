// linear forward and backward: input (M, IN), weight (OUT, IN), output (M, OUT).
#include "cnnbp/linear.hpp"

#include "parallel.hpp"

namespace cnnbp {

template <typename T>
void linear_forward(T* output, const T* input, const T* weight, const T* bias,
                    const LinearDims& d) {
    detail::parallel_for(d.M, d.M * d.OUT * d.IN, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
            const T* x = input + m * d.IN;
            for (int64_t o = 0; o < d.OUT; ++o) {
                const T* w = weight + o * d.IN;
                T sum = bias ? bias[o] : T(0);
                for (int64_t i = 0; i < d.IN; ++i) sum += x[i] * w[i];
                output[m * d.OUT + o] = sum;
            }
        }
    });
}

template <typename T>
void linear_backward(T* dinput, T* dweight, T* dbias, const T* doutput, const T* input,
                     const T* weight, const LinearDims& d) {
    const int64_t work = d.M * d.OUT * d.IN;
    // dinput = doutput . weight: row m of dinput gathers doutput[m, o] * weight[o, :]
    if (dinput) {
        detail::parallel_for(d.M, work, [&](int64_t begin, int64_t end) {
            for (int64_t m = begin; m < end; ++m) {
                T* dx = dinput + m * d.IN;
                for (int64_t i = 0; i < d.IN; ++i) dx[i] = T(0);
                for (int64_t o = 0; o < d.OUT; ++o) {
                    const T g = doutput[m * d.OUT + o];
                    const T* w = weight + o * d.IN;
                    for (int64_t i = 0; i < d.IN; ++i) dx[i] += g * w[i];
                }
            }
        });
    }
    // dweight = doutput^T . input: row o of dweight sums doutput[m, o] * input[m, :] over m
    if (dweight) {
        detail::parallel_for(d.OUT, work, [&](int64_t begin, int64_t end) {
            for (int64_t o = begin; o < end; ++o) {
                T* dw = dweight + o * d.IN;
                for (int64_t i = 0; i < d.IN; ++i) dw[i] = T(0);
                for (int64_t m = 0; m < d.M; ++m) {
                    const T g = doutput[m * d.OUT + o];
                    const T* x = input + m * d.IN;
                    for (int64_t i = 0; i < d.IN; ++i) dw[i] += g * x[i];
                }
            }
        });
    }
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
