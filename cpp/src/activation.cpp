// ReLU, leaky ReLU, GELU, SiLU, sigmoid and tanh, forward and backward, elementwise over
// `count` values; softmax and log_softmax along one dim.
//
// The loops are branch-free so that the compiler vectorizes them for the baseline
// instruction set, and run on several threads above the parallel threshold (each element
// is written by exactly one thread, so results do not depend on the thread count).
#include "cnnbp/activation.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "activation_kernels.hpp"
#include "isa.hpp"
#include "parallel.hpp"

namespace cnnbp {

template <typename T>
void relu_forward(T* a, const T* z, int64_t count) {
    // `!(z <= 0)` is `z > 0 || isnan(z)` in one compare: NaN stays NaN, -0 becomes +0.
    detail::parallel_for(count, count, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) a[i] = z[i] <= T(0) ? T(0) : z[i];
    });
}

template <typename T>
void relu_backward(T* dz, const T* da, const T* z, int64_t count) {
    detail::parallel_for(count, count, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const T g = da[i];  // loaded unconditionally, so that the select vectorizes
            dz[i] = z[i] <= T(0) ? T(0) : g;
        }
    });
}

namespace {
// The work of one float sigmoid in multiply-adds, for the parallel threshold.
constexpr int64_t kSigmoidWork = 16;
}  // namespace

namespace detail {
void sigmoid_f32_baseline(float* a, const float* z, int64_t count) { sigmoid_f32(a, z, count); }
}  // namespace detail

// float: the loop of activation_kernels.hpp, also compiled for AVX-512 (the same operations
// without contraction, so the same bits) and run that way when the CPU has it.
template <>
void sigmoid_forward<float>(float* a, const float* z, int64_t count) {
#if defined(CNNBP_AVX512_KERNELS)
    const auto run = detail::avx512_kernels_enabled() ? detail::sigmoid_f32_avx512
                                                      : detail::sigmoid_f32_baseline;
#else
    const auto run = detail::sigmoid_f32_baseline;
#endif
    detail::parallel_for(count, count * kSigmoidWork, [=](int64_t begin, int64_t end) {
        run(a + begin, z + begin, end - begin);
    });
}

// float64 keeps the library exp, a call per element: its accuracy needs more than a short
// polynomial.
template <>
void sigmoid_forward<double>(double* a, const double* z, int64_t count) {
    detail::parallel_for(count, count * kSigmoidWork, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) a[i] = 1.0 / (1.0 + std::exp(-z[i]));
    });
}

template <typename T>
void sigmoid_backward(T* dz, const T* da, const T* a, int64_t count) {
    detail::parallel_for(count, count, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) dz[i] = da[i] * (T(1) - a[i]) * a[i];
    });
}

namespace {
// The work of one tanh, a library call per element, in multiply-adds.
constexpr int64_t kTanhWork = 32;
}  // namespace

// The library tanh, a call per element: accuracy matters more here than speed. It saturates
// to +-1 (never exp overflow) and keeps NaN. float goes through the double tanh and is rounded
// once, so that it is within half an ulp (plus 1e-16 relative) of the true value; the float
// tanhf is only within a few ulps.
template <typename T>
void tanh_forward(T* a, const T* z, int64_t count) {
    detail::parallel_for(count, count * kTanhWork, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) a[i] = T(std::tanh(double(z[i])));
    });
}

// 1 - a^2 as (1 - a) * (1 + a): near a = +-1, where the gradient is small, 1 - a * a would
// lose most of its digits to cancellation (a * a is rounded first), while 1 - a (or 1 + a)
// is then exact, so the product stays within a few ulps of the true value everywhere.
template <typename T>
void tanh_backward(T* dz, const T* da, const T* a, int64_t count) {
    detail::parallel_for(count, count, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) dz[i] = da[i] * ((T(1) - a[i]) * (T(1) + a[i]));
    });
}

namespace {
// The work of one GELU or SiLU, library calls per element, in multiply-adds.
constexpr int64_t kGeluWork = 40;
constexpr int64_t kSiluWork = 24;
constexpr double kSqrt1_2 = 0.70710678118654752440;      // 1 / sqrt(2)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)
constexpr double kKappa = 0.044715;                      // the tanh form's cubic term
}  // namespace

// The slope is rounded to T once, as torch's kernel does; both sides are computed and one
// selected, so that the loop vectorizes.
template <typename T>
void leaky_relu_forward(T* a, const T* z, int64_t count, double negative_slope) {
    const T slope = T(negative_slope);
    detail::parallel_for(count, count, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const T scaled = z[i] * slope;
            a[i] = z[i] > T(0) ? z[i] : scaled;
        }
    });
}

template <typename T>
void leaky_relu_backward(T* dz, const T* da, const T* z, int64_t count, double negative_slope) {
    const T slope = T(negative_slope);
    detail::parallel_for(count, count, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const T g = da[i], scaled = da[i] * slope;
            dz[i] = z[i] > T(0) ? g : scaled;
        }
    });
}

// torch's formulas, in double: float is rounded once at the end, so that it is within about
// half an ulp of the exact value (torch's float kernels are within a few ulps).
template <typename T>
void gelu_forward(T* a, const T* z, int64_t count, GeluApproximate approximate) {
    if (approximate == GeluApproximate::Tanh) {
        detail::parallel_for(count, count * kGeluWork, [=](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
                const double x = z[i];
                const double inner = kSqrt2OverPi * (x + kKappa * (x * x * x));
                a[i] = T(0.5 * x * (1.0 + std::tanh(inner)));
            }
        });
        return;
    }
    detail::parallel_for(count, count * kGeluWork, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const double x = z[i];
            a[i] = T(x * 0.5 * (1.0 + std::erf(x * kSqrt1_2)));
        }
    });
}

template <typename T>
void gelu_backward(T* dz, const T* da, const T* z, int64_t count, GeluApproximate approximate) {
    if (approximate == GeluApproximate::Tanh) {
        // inverts `a = 0.5 * x * (1 + tanh(inner))`: the product rule on 0.5 x and 1 + tanh
        detail::parallel_for(count, count * kGeluWork, [=](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
                const double x = z[i], x_sq = x * x;
                const double t = std::tanh(kSqrt2OverPi * (x + kKappa * (x_sq * x)));
                const double left_derivative = 0.5 * (1.0 + t);
                const double right_derivative =
                    0.5 * x * (1.0 - t * t) * kSqrt2OverPi * (1.0 + 3.0 * kKappa * x_sq);
                dz[i] = T(double(da[i]) * (left_derivative + right_derivative));
            }
        });
        return;
    }
    // inverts `a = x * 0.5 * (1 + erf(x / sqrt(2)))`: d/dx [x Phi(x)] = Phi(x) + x phi(x)
    detail::parallel_for(count, count * kGeluWork, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const double x = z[i];
            const double cdf = 0.5 * (1.0 + std::erf(x * kSqrt1_2));
            const double pdf = kInvSqrt2Pi * std::exp(-0.5 * (x * x));
            dz[i] = T(double(da[i]) * (cdf + x * pdf));
        }
    });
}

// exp(-z) overflows to inf for z < -709: a = z / inf = -0, as torch's formula gives.
template <typename T>
void silu_forward(T* a, const T* z, int64_t count) {
    detail::parallel_for(count, count * kSiluWork, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const double x = z[i];
            a[i] = T(x / (1.0 + std::exp(-x)));
        }
    });
}

template <typename T>
void silu_backward(T* dz, const T* da, const T* z, int64_t count) {
    detail::parallel_for(count, count * kSiluWork, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const double x = z[i];
            const double s = 1.0 / (1.0 + std::exp(-x));
            dz[i] = T(double(da[i]) * s * (1.0 + x * (1.0 - s)));
        }
    });
}

// ---- softmax, log_softmax --------------------------------------------------------------------

namespace {
// The work of one element of softmax (an exp in double and a few passes), in multiply-adds.
constexpr int64_t kSoftmaxWork = 24;

// body(base, n, top, sum) for the slices [begin, end) of the outer * inner slices, grouped by
// outer index o: the n slices that start at element `base` = (o, 0, i0), element k of the
// j-th at base + k * inner + j, with top and sum n doubles of scratch. Within a block the
// loops run across j (contiguous for inner > 1), each slice's sums over k in the same
// order: a slice's result does not depend on how the slices are split between threads.
template <typename Body>
void for_each_slice_block(const SoftmaxDims& d, const Body& body) {
    const int64_t slices = d.outer * d.inner;
    detail::parallel_for(slices, slices * d.K * kSoftmaxWork, [&](int64_t begin, int64_t end) {
        std::vector<double> top, sum;
        for (int64_t s = begin; s < end;) {
            const int64_t o = s / d.inner, i0 = s % d.inner;
            const int64_t n = std::min(d.inner - i0, end - s);
            top.resize(size_t(n));
            sum.resize(size_t(n));
            body(o * d.K * d.inner + i0, n, top.data(), sum.data());
            s += n;
        }
    });
}

// top[j] = slice j's maximum (NaN when a value is NaN), sum[j] = sum_k exp(z_k - top[j])
template <typename T>
void shifted_exp_sums(const T* z, int64_t K, int64_t step, int64_t n, double* top, double* sum) {
    for (int64_t j = 0; j < n; ++j) top[j] = double(z[j]);
    for (int64_t k = 1; k < K; ++k)
        for (int64_t j = 0; j < n; ++j) {
            const double v = z[k * step + j];
            top[j] = v > top[j] || v != v ? v : top[j];  // NaN wins: the slice is NaN
        }
    for (int64_t j = 0; j < n; ++j) sum[j] = 0.0;
    for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < n; ++j) sum[j] += std::exp(double(z[k * step + j]) - top[j]);
}
}  // namespace

template <typename T>
void softmax_forward(T* a, const T* z, const SoftmaxDims& d) {
    for_each_slice_block(d, [&](int64_t base, int64_t n, double* top, double* sum) {
        const T* zs = z + base;
        T* as = a + base;
        shifted_exp_sums(zs, d.K, d.inner, n, top, sum);
        for (int64_t j = 0; j < n; ++j) sum[j] = 1.0 / sum[j];
        for (int64_t k = 0; k < d.K; ++k)
            for (int64_t j = 0; j < n; ++j) {
                const int64_t at = k * d.inner + j;
                as[at] = T(std::exp(double(zs[at]) - top[j]) * sum[j]);
            }
    });
}

template <typename T>
void softmax_backward(T* dz, const T* da, const T* a, const SoftmaxDims& d) {
    // dot[j] = sum_k da_k * a_k in double; the first scratch array is unused
    for_each_slice_block(d, [&](int64_t base, int64_t n, double*, double* dot) {
        const T *das = da + base, *as = a + base;
        T* dzs = dz + base;
        for (int64_t j = 0; j < n; ++j) dot[j] = 0.0;
        for (int64_t k = 0; k < d.K; ++k)
            for (int64_t j = 0; j < n; ++j)
                dot[j] += double(das[k * d.inner + j]) * double(as[k * d.inner + j]);
        for (int64_t k = 0; k < d.K; ++k)
            for (int64_t j = 0; j < n; ++j) {
                const int64_t at = k * d.inner + j;
                dzs[at] = T(double(as[at]) * (double(das[at]) - dot[j]));
            }
    });
}

template <typename T>
void log_softmax_forward(T* a, const T* z, const SoftmaxDims& d) {
    for_each_slice_block(d, [&](int64_t base, int64_t n, double* top, double* sum) {
        const T* zs = z + base;
        T* as = a + base;
        shifted_exp_sums(zs, d.K, d.inner, n, top, sum);
        for (int64_t j = 0; j < n; ++j) sum[j] = std::log(sum[j]);
        for (int64_t k = 0; k < d.K; ++k)
            for (int64_t j = 0; j < n; ++j) {
                const int64_t at = k * d.inner + j;
                as[at] = T((double(zs[at]) - top[j]) - sum[j]);
            }
    });
}

template <typename T>
void log_softmax_backward(T* dz, const T* da, const T* a, const SoftmaxDims& d) {
    // total[j] = sum_k da_k in double; the first scratch array is unused
    for_each_slice_block(d, [&](int64_t base, int64_t n, double*, double* total) {
        const T *das = da + base, *as = a + base;
        T* dzs = dz + base;
        for (int64_t j = 0; j < n; ++j) total[j] = 0.0;
        for (int64_t k = 0; k < d.K; ++k)
            for (int64_t j = 0; j < n; ++j) total[j] += double(das[k * d.inner + j]);
        for (int64_t k = 0; k < d.K; ++k)
            for (int64_t j = 0; j < n; ++j) {
                const int64_t at = k * d.inner + j;
                dzs[at] = T(double(das[at]) - std::exp(double(as[at])) * total[j]);
            }
    });
}

#define CNNBP_INSTANTIATE(T)                                                          \
    template void relu_forward<T>(T*, const T*, int64_t);                             \
    template void relu_backward<T>(T*, const T*, const T*, int64_t);                  \
    template void sigmoid_backward<T>(T*, const T*, const T*, int64_t);               \
    template void tanh_forward<T>(T*, const T*, int64_t);                             \
    template void tanh_backward<T>(T*, const T*, const T*, int64_t);                  \
    template void leaky_relu_forward<T>(T*, const T*, int64_t, double);               \
    template void leaky_relu_backward<T>(T*, const T*, const T*, int64_t, double);    \
    template void gelu_forward<T>(T*, const T*, int64_t, GeluApproximate);            \
    template void gelu_backward<T>(T*, const T*, const T*, int64_t, GeluApproximate); \
    template void silu_forward<T>(T*, const T*, int64_t);                             \
    template void silu_backward<T>(T*, const T*, const T*, int64_t);                  \
    template void softmax_forward<T>(T*, const T*, const SoftmaxDims&);               \
    template void softmax_backward<T>(T*, const T*, const T*, const SoftmaxDims&);    \
    template void log_softmax_forward<T>(T*, const T*, const SoftmaxDims&);           \
    template void log_softmax_backward<T>(T*, const T*, const T*, const SoftmaxDims&);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
