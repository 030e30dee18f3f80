// conv2d forward and backward: direct loops over the valid window ranges.
// N batch, C in-channels, K out-channels, H/W input, P/Q output, R/S filter.
#include "cnnbp/conv2d.hpp"

#include <algorithm>

#include "parallel.hpp"

namespace cnnbp {

using detail::valid_range;

template <typename T>
void conv2d_forward(T* output, const T* input, const T* weight, const T* bias,
                    const Conv2dDims& d) {
    const auto& p = d.params;
    const int64_t work = d.N * d.K * d.P * d.Q * d.C * d.R * d.S;
    CNNBP_PARALLEL_FOR_IF(work)
    for (int64_t nk = 0; nk < d.N * d.K; ++nk) {
        const int64_t n = nk / d.K, k = nk % d.K;
        T* out = output + nk * d.P * d.Q;  // (P, Q) plane of output[n, k]
        std::fill(out, out + d.P * d.Q, bias ? bias[k] : T(0));
        for (int64_t c = 0; c < d.C; ++c) {
            const T* in = input + (n * d.C + c) * d.H * d.W;  // (H, W) plane of input[n, c]
            const T* wkc = weight + (k * d.C + c) * d.R * d.S;
            for (int64_t r = 0; r < d.R; ++r) {
                int64_t p_lo, p_hi;
                valid_range(d.P, d.H, p.stride_h, p.pad_h, r, p_lo, p_hi);
                for (int64_t s = 0; s < d.S; ++s) {
                    int64_t q_lo, q_hi;
                    valid_range(d.Q, d.W, p.stride_w, p.pad_w, s, q_lo, q_hi);
                        const int64_t col = s - p.pad_w;  // input column of output column 0
                    const T w = wkc[r * d.S + s];
                    for (int64_t op = p_lo; op < p_hi; ++op) {
                        const T* in_row = in + (op * p.stride_h - p.pad_h + r) * d.W;
                        T* out_row = out + op * d.Q;
                        for (int64_t oq = q_lo; oq < q_hi; ++oq)
                            out_row[oq] += w * in_row[oq * p.stride_w + col];
                    }
                }
            }
        }
    }
}

template <typename T>
void conv2d_backward(T* dinput, T* dweight, T* dbias, const T* doutput, const T* input,
                     const T* weight, const Conv2dDims& d) {
    const auto& p = d.params;
    const int64_t work = d.N * d.K * d.P * d.Q * d.C * d.R * d.S;
    const int64_t PQ = d.P * d.Q;

    // Inverts `out_row[oq] += w * in_row[oq * stride_w]`: each input cell gathers
    // w * doutput from every window that read it (a full convolution with the rotated filter).
    if (dinput) {
        CNNBP_PARALLEL_FOR_IF(work)
        for (int64_t nc = 0; nc < d.N * d.C; ++nc) {
            const int64_t n = nc / d.C, c = nc % d.C;
            T* din = dinput + nc * d.H * d.W;  // (H, W) plane of dinput[n, c]
            std::fill(din, din + d.H * d.W, T(0));
            for (int64_t k = 0; k < d.K; ++k) {
                const T* dout = doutput + (n * d.K + k) * PQ;
                const T* wkc = weight + (k * d.C + c) * d.R * d.S;
                for (int64_t r = 0; r < d.R; ++r) {
                    int64_t p_lo, p_hi;
                    valid_range(d.P, d.H, p.stride_h, p.pad_h, r, p_lo, p_hi);
                    for (int64_t s = 0; s < d.S; ++s) {
                        int64_t q_lo, q_hi;
                        valid_range(d.Q, d.W, p.stride_w, p.pad_w, s, q_lo, q_hi);
                        const int64_t col = s - p.pad_w;  // input column of output column 0
                        const T w = wkc[r * d.S + s];
                        for (int64_t op = p_lo; op < p_hi; ++op) {
                            T* din_row = din + (op * p.stride_h - p.pad_h + r) * d.W;
                            const T* dout_row = dout + op * d.Q;
                            for (int64_t oq = q_lo; oq < q_hi; ++oq)
                                din_row[oq * p.stride_w + col] += w * dout_row[oq];
                        }
                    }
                }
            }
        }
    }

    // dweight[k,c,r,s] = sum_{n,p,q} doutput[n,k,p,q] * input[n,c,p*sh-ph+r,q*sw-pw+s]:
    // the valid cross-correlation of the input with doutput, one (k, c) per thread.
    if (dweight) {
        CNNBP_PARALLEL_FOR_IF(work)
        for (int64_t kc = 0; kc < d.K * d.C; ++kc) {
            const int64_t k = kc / d.C, c = kc % d.C;
            T* dw = dweight + kc * d.R * d.S;
            for (int64_t r = 0; r < d.R; ++r) {
                int64_t p_lo, p_hi;
                valid_range(d.P, d.H, p.stride_h, p.pad_h, r, p_lo, p_hi);
                for (int64_t s = 0; s < d.S; ++s) {
                    int64_t q_lo, q_hi;
                    valid_range(d.Q, d.W, p.stride_w, p.pad_w, s, q_lo, q_hi);
                        const int64_t col = s - p.pad_w;  // input column of output column 0
                    T sum = 0;
                    for (int64_t n = 0; n < d.N; ++n) {
                        const T* in = input + (n * d.C + c) * d.H * d.W;
                        const T* dout = doutput + (n * d.K + k) * PQ;
                        for (int64_t op = p_lo; op < p_hi; ++op) {
                            const T* in_row = in + (op * p.stride_h - p.pad_h + r) * d.W;
                            const T* dout_row = dout + op * d.Q;
                            for (int64_t oq = q_lo; oq < q_hi; ++oq)
                                sum += dout_row[oq] * in_row[oq * p.stride_w + col];
                        }
                    }
                    dw[r * d.S + s] = sum;
                }
            }
        }
    }

    // Inverts `fill(out, bias[k])`: every output cell of channel k received bias[k].
    if (dbias) {
        for (int64_t k = 0; k < d.K; ++k) {
            T sum = 0;
            for (int64_t n = 0; n < d.N; ++n) {
                const T* dout = doutput + (n * d.K + k) * PQ;
                for (int64_t i = 0; i < PQ; ++i) sum += dout[i];
            }
            dbias[k] = sum;
        }
    }
}

#define CNNBP_INSTANTIATE(T)                                                                 \
    template void conv2d_forward<T>(T*, const T*, const T*, const T*, const Conv2dDims&);   \
    template void conv2d_backward<T>(T*, T*, T*, const T*, const T*, const T*,              \
                                     const Conv2dDims&);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
