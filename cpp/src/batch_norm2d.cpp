// batch_norm2d, forward and backward. N batch, C channels, H/W height/width, M = N * H * W.
//
// Every channel is independent: the channels are shared among threads and each channel's
// statistics and outputs are computed by one thread in one fixed order, so results do not
// depend on the thread count. The loops over a channel's values are in
// batch_norm2d_kernels.hpp, built for the baseline instruction set and for AVX-512 (the same
// bits), chosen at run time; the per-channel scalars (square roots, running statistics) are
// computed here. The statistics are sums in double, one pass over the data per statistic (the
// mean, then the squared deviations from it: exact where a one-pass sum of squares would
// cancel).
#include "cnnbp/batch_norm2d.hpp"

#include <cmath>

#include "batch_norm2d_kernels.hpp"
#include "isa.hpp"
#include "parallel.hpp"

namespace cnnbp {

namespace detail {
BatchNorm2dKernels<float> batch_norm2d_kernels_f32_baseline() { return bn_kernels<float>(); }
BatchNorm2dKernels<double> batch_norm2d_kernels_f64_baseline() { return bn_kernels<double>(); }
}  // namespace detail

namespace {

// The loops for T on the widest instruction set the CPU (and CNNBP_ISA) allows.
template <typename T>
detail::BatchNorm2dKernels<T> kernels();
template <>
detail::BatchNorm2dKernels<float> kernels<float>() {
#if defined(CNNBP_AVX512_KERNELS)
    if (detail::avx512_kernels_enabled()) return detail::batch_norm2d_kernels_f32_avx512();
#endif
    return detail::batch_norm2d_kernels_f32_baseline();
}
template <>
detail::BatchNorm2dKernels<double> kernels<double>() {
#if defined(CNNBP_AVX512_KERNELS)
    if (detail::avx512_kernels_enabled()) return detail::batch_norm2d_kernels_f64_avx512();
#endif
    return detail::batch_norm2d_kernels_f64_baseline();
}

// 1 / sqrt(running_var + eps), in double
template <typename T>
double running_invstd(const T* running_var, int64_t c, double eps) {
    return 1.0 / std::sqrt(double(running_var[c]) + eps);
}

// invstd * weight, rounded once to T: the affine map's slope
template <typename T>
T affine_scale(double invstd, const T* weight, int64_t c) {
    return T(invstd * (weight ? double(weight[c]) : 1.0));
}

}  // namespace

template <typename T>
void batch_norm2d_eval_affine(T* center, T* scale, T* shift, const T* weight, const T* bias,
                              const T* running_mean, const T* running_var, int64_t C, double eps) {
    for (int64_t c = 0; c < C; ++c) {
        center[c] = running_mean[c];
        scale[c] = affine_scale(running_invstd(running_var, c, eps), weight, c);
        shift[c] = bias ? bias[c] : T(0);
    }
}

template <typename T>
void batch_norm2d_forward(T* output, T* save_mean, T* save_invstd, const T* input, const T* weight,
                          const T* bias, T* running_mean, T* running_var, const BatchNorm2dDims& d,
                          const BatchNorm2dParams& params) {
    const int64_t M = d.N * d.H * d.W, HW = d.H * d.W, stride = d.C * HW;
    const detail::BatchNorm2dKernels<T> k = kernels<T>();
    detail::parallel_for(d.C, 3 * M * d.C, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
            const T* x = input + c * HW;
            double mean, invstd;
            if (params.training) {
                double var = 0;
                mean = 0;
                if (M > 0) {
                    // mean = sum(x) / M; var = sum((x - mean)^2) / M, biased
                    mean = k.sum(x, d.N, HW, stride) / double(M);
                    var = k.sum_sq_dev(x, d.N, HW, stride, mean) / double(M);
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
                invstd = running_invstd(running_var, c, params.eps);
            }
            // y = (x - mean) * invstd * weight + bias
            k.affine(output + c * HW, x, d.N, HW, stride, T(mean), affine_scale(invstd, weight, c),
                     bias ? bias[c] : T(0));
        }
    });
}

template <typename T>
void batch_norm2d_backward(T* dinput, T* dweight, T* dbias, const T* doutput, const T* input,
                           const T* weight, const T* mean, const T* invstd,
                           const BatchNorm2dDims& d, bool training) {
    const int64_t M = d.N * d.H * d.W, HW = d.H * d.W, stride = d.C * HW;
    const detail::BatchNorm2dKernels<T> k = kernels<T>();
    detail::parallel_for(d.C, 2 * M * d.C, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
            const T *x = input + c * HW, *dy = doutput + c * HW;
            T* dx = dinput + c * HW;
            const double mu = double(mean[c]), is = double(invstd[c]);
            const double w = weight ? double(weight[c]) : 1.0;
            // dbias = sum(dy); dweight = sum(dy * (x - mean)) * invstd: both in one pass
            double sums[2];
            k.sums_dy(sums, dy, x, d.N, HW, stride, mu);
            const double sum_dy = sums[0], sum_dy_xmu = sums[1];
            if (dbias) dbias[c] = T(sum_dy);
            if (dweight) dweight[c] = T(sum_dy_xmu * is);
            const T a = T(w * is);
            if (!training) {  // mean and invstd are constants: dx = dy * weight * invstd
                k.scale(dx, dy, d.N, HW, stride, a);
                continue;
            }
            if (M == 0) continue;
            // dx = weight * invstd * (dy - sum(dy) / M - (x - mean) * invstd^2 * sum(dy *
            // (x - mean)) / M): the mean and the variance depend on every x of the channel
            const T g = T(sum_dy / double(M)), kk = T(is * is * sum_dy_xmu / double(M));
            k.dx_training(dx, dy, x, d.N, HW, stride, a, g, T(mu), kk);
        }
    });
}

#define CNNBP_INSTANTIATE(T)                                                                      \
    template void batch_norm2d_forward<T>(T*, T*, T*, const T*, const T*, const T*, T*, T*,       \
                                          const BatchNorm2dDims&, const BatchNorm2dParams&);      \
    template void batch_norm2d_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*,    \
                                           const T*, const BatchNorm2dDims&, bool);               \
    template void batch_norm2d_eval_affine<T>(T*, T*, T*, const T*, const T*, const T*, const T*, \
                                              int64_t, double);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
