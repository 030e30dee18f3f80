// batch_norm2d, forward and backward. N batch, C channels, H/W height/width, M = N * H * W.
//
// Every channel is independent: the channels are shared among threads and each channel's
// statistics and outputs are computed by one thread in one fixed order, so results do not
// depend on the thread count. A channel's values are N planes of H * W contiguous values
// (plane n at (n * C + c) * H * W); the statistics are sums in double over 8 running lanes
// per plane, one pass over the data per statistic (the mean, then the squared deviations
// from it: exact where a one-pass sum of squares would cancel).
#include "cnnbp/batch_norm2d.hpp"

#include <cmath>

#include "parallel.hpp"

namespace cnnbp {
namespace {

// sum(f(i)) for i in [0, n) in double, over 8 lanes (lane k takes i = k, k + 8, ...) added
// in a fixed order at the end: independent chains the compiler vectorizes.
template <typename F>
double lane_sum(int64_t n, const F& f) {
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) lane[k] += f(i + k);
    for (int k = 0; i < n; ++i, ++k) lane[k] += f(i);
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
           ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// sum over channel c's values of f(plane, i), plane by plane (n in order)
template <typename T, typename F>
double channel_sum(const BatchNorm2dDims& d, int64_t c, const F& f) {
    const int64_t HW = d.H * d.W;
    double sum = 0;
    for (int64_t n = 0; n < d.N; ++n) {
        const int64_t offset = (n * d.C + c) * HW;
        sum += lane_sum(HW, [&](int64_t i) { return f(offset + i); });
    }
    return sum;
}

// Two sums at once over channel c's values: f(i, a, b) adds to the two sums, over 8 lanes
// each as lane_sum, plane by plane; sum_a and sum_b get the totals.
template <typename F>
void channel_sums(const BatchNorm2dDims& d, int64_t c, const F& f, double& sum_a, double& sum_b) {
    const int64_t HW = d.H * d.W;
    sum_a = sum_b = 0;
    for (int64_t n = 0; n < d.N; ++n) {
        const int64_t offset = (n * d.C + c) * HW;
        double a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= HW; i += 8)
            for (int k = 0; k < 8; ++k) f(offset + i + k, a[k], b[k]);
        for (int k = 0; i < HW; ++i, ++k) f(offset + i, a[k], b[k]);
        sum_a += ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        sum_b += ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));
    }
}

// out[i] = g(i) for channel c's values
template <typename G>
void channel_map(const BatchNorm2dDims& d, int64_t c, const G& g) {
    const int64_t HW = d.H * d.W;
    for (int64_t n = 0; n < d.N; ++n) {
        const int64_t offset = (n * d.C + c) * HW;
        for (int64_t i = offset; i < offset + HW; ++i) g(i);
    }
}

}  // namespace

template <typename T>
void batch_norm2d_forward(T* output, T* save_mean, T* save_invstd, const T* input, const T* weight,
                          const T* bias, T* running_mean, T* running_var, const BatchNorm2dDims& d,
                          const BatchNorm2dParams& params) {
    const int64_t M = d.N * d.H * d.W;
    detail::parallel_for(d.C, 3 * M * d.C, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
            double mean, invstd;
            if (params.training) {
                double var = 0;
                mean = 0;
                if (M > 0) {
                    // mean = sum(x) / M
                    mean = channel_sum<T>(d, c, [&](int64_t i) { return double(input[i]); }) /
                           double(M);
                    // var = sum((x - mean)^2) / M, biased
                    var = channel_sum<T>(d, c,
                                         [&](int64_t i) {
                                             const double v = double(input[i]) - mean;
                                             return v * v;
                                         }) /
                          double(M);
                    if (running_mean) {
                        const double m = params.momentum,
                                     unbiased = var * double(M) / double(M - 1);
                        running_mean[c] = T((1 - m) * double(running_mean[c]) + m * mean);
                        running_var[c] = T((1 - m) * double(running_var[c]) + m * unbiased);
                    }
                }
                invstd = 1.0 / std::sqrt(var + params.eps);
                save_mean[c] = T(mean);
                save_invstd[c] = T(invstd);
            } else {
                mean = double(running_mean[c]);
                invstd = 1.0 / std::sqrt(double(running_var[c]) + params.eps);
            }
            // y = (x - mean) * invstd * weight + bias
            const T m = T(mean), scale = T(invstd * (weight ? double(weight[c]) : 1.0)),
                    shift = bias ? bias[c] : T(0);
            channel_map(d, c, [&](int64_t i) { output[i] = (input[i] - m) * scale + shift; });
        }
    });
}

template <typename T>
void batch_norm2d_backward(T* dinput, T* dweight, T* dbias, const T* doutput, const T* input,
                           const T* weight, const T* mean, const T* invstd,
                           const BatchNorm2dDims& d, bool training) {
    const int64_t M = d.N * d.H * d.W;
    detail::parallel_for(d.C, 2 * M * d.C, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
            const double mu = double(mean[c]), is = double(invstd[c]);
            const double w = weight ? double(weight[c]) : 1.0;
            // dbias = sum(dy); dweight = sum(dy * (x - mean)) * invstd: both in one pass
            double sum_dy = 0, sum_dy_xmu = 0;
            channel_sums(
                d, c,
                [&](int64_t i, double& a, double& b) {
                    const double dy = double(doutput[i]);
                    a += dy;
                    b += dy * (double(input[i]) - mu);
                },
                sum_dy, sum_dy_xmu);
            if (dbias) dbias[c] = T(sum_dy);
            if (dweight) dweight[c] = T(sum_dy_xmu * is);
            const T a = T(w * is);
            if (!training) {  // mean and invstd are constants: dx = dy * weight * invstd
                channel_map(d, c, [&](int64_t i) { dinput[i] = doutput[i] * a; });
                continue;
            }
            if (M == 0) continue;
            // dx = weight * invstd * (dy - sum(dy) / M - (x - mean) * invstd^2 * sum(dy *
            // (x - mean)) / M): the mean and the variance depend on every x of the channel
            const T g = T(sum_dy / double(M)), k = T(is * is * sum_dy_xmu / double(M)), m = T(mu);
            channel_map(d, c,
                        [&](int64_t i) { dinput[i] = a * (doutput[i] - g - (input[i] - m) * k); });
        }
    });
}

#define CNNBP_INSTANTIATE(T)                                                                   \
    template void batch_norm2d_forward<T>(T*, T*, T*, const T*, const T*, const T*, T*, T*,    \
                                          const BatchNorm2dDims&, const BatchNorm2dParams&);   \
    template void batch_norm2d_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*, \
                                           const T*, const BatchNorm2dDims&, bool);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
