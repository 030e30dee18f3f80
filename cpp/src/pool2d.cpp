// max_pool2d forward and backward. N batch, C channels, H/W input, P/Q output.
#include "cnnbp/pool2d.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "parallel.hpp"

namespace cnnbp {

template <typename T>
void max_pool2d_forward(T* output, int64_t* indices, const T* input, const Pool2dDims& d) {
    const auto& p = d.params;
    const int64_t PQ = d.P * d.Q;
    const int64_t work = d.N * d.C * PQ * p.kernel_h * p.kernel_w;
    CNNBP_PARALLEL_FOR_IF(work)
    for (int64_t nc = 0; nc < d.N * d.C; ++nc) {
        const T* in = input + nc * d.H * d.W;  // (H, W) plane of input[n, c]
        T* out = output + nc * PQ;
        int64_t* idx = indices + nc * PQ;
        for (int64_t op = 0; op < d.P; ++op) {
            // window rows [h0, h1) clipped to the plane: padding is -inf and never wins
            const int64_t h_start = op * p.stride_h - p.pad_h;
            const int64_t h0 = std::max<int64_t>(h_start, 0);
            const int64_t h1 = std::min(h_start + p.kernel_h, d.H);
            for (int64_t oq = 0; oq < d.Q; ++oq) {
                const int64_t w_start = oq * p.stride_w - p.pad_w;
                const int64_t w0 = std::max<int64_t>(w_start, 0);
                const int64_t w1 = std::min(w_start + p.kernel_w, d.W);
                int64_t best_index = h0 * d.W + w0;
                T best = -std::numeric_limits<T>::infinity();
                for (int64_t h = h0; h < h1; ++h)
                    for (int64_t w = w0; w < w1; ++w) {
                        const T value = in[h * d.W + w];
                        // strict > keeps the first of equal values; NaN always wins
                        if (value > best || std::isnan(value)) {
                            best = value;
                            best_index = h * d.W + w;
                        }
                    }
                out[op * d.Q + oq] = best;
                idx[op * d.Q + oq] = best_index;
            }
        }
    }
}

template <typename T>
void max_pool2d_backward(T* dinput, const T* doutput, const int64_t* indices,
                         const Pool2dDims& d) {
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W;
    CNNBP_PARALLEL_FOR_IF(d.N * d.C * (PQ + HW))
    for (int64_t nc = 0; nc < d.N * d.C; ++nc) {
        T* din = dinput + nc * HW;
        std::fill(din, din + HW, T(0));
        // Inverts `out = in[best_index]`: the gradient goes to the chosen cell only.
        for (int64_t i = 0; i < PQ; ++i) din[indices[nc * PQ + i]] += doutput[nc * PQ + i];
    }
}

#define CNNBP_INSTANTIATE(T)                                                              \
    template void max_pool2d_forward<T>(T*, int64_t*, const T*, const Pool2dDims&);      \
    template void max_pool2d_backward<T>(T*, const T*, const int64_t*, const Pool2dDims&);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
