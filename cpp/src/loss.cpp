// Losses and their gradients; each loss is a mean, summed in double.
#include "cnnbp/loss.hpp"

#include <algorithm>
#include <cmath>

namespace cnnbp {

template <typename T>
double binary_cross_entropy_forward(const T* a, const T* y, int64_t count) {
    double sum = 0;
    for (int64_t i = 0; i < count; ++i) {
        // torch clamps each log at -100 so that a = 0 or 1 gives a finite loss
        const T log_a = std::max(T(std::log(a[i])), T(-100));
        const T log_1ma = std::max(T(std::log1p(-a[i])), T(-100));
        sum += double((y[i] - T(1)) * log_1ma - y[i] * log_a);
    }
    return sum / double(count);
}

template <typename T>
void binary_cross_entropy_backward(T* da, const T* a, const T* y, int64_t count) {
    // torch's guard against a * (1 - a) = 0: a float constant 1e-12f, also for double
    const T epsilon = T(1e-12f);
    const T inv_count = T(1) / T(count);
    for (int64_t i = 0; i < count; ++i)
        da[i] = (a[i] - y[i]) / std::max((T(1) - a[i]) * a[i], epsilon) * inv_count;
}

template <typename T>
double binary_cross_entropy_with_logits_forward(const T* z, const T* y, int64_t count) {
    double sum = 0;
    for (int64_t i = 0; i < count; ++i)
        // log(1 + exp(-|z|)) never overflows; max(z, 0) - z*y restores the sign
        sum +=
            double(std::max(z[i], T(0)) - z[i] * y[i] + T(std::log1p(std::exp(-std::abs(z[i])))));
    return sum / double(count);
}

template <typename T>
void binary_cross_entropy_with_logits_backward(T* dz, const T* z, const T* y, int64_t count) {
    const T inv_count = T(1) / T(count);
    for (int64_t i = 0; i < count; ++i)
        dz[i] = (T(1) / (T(1) + std::exp(-z[i])) - y[i]) * inv_count;
}

namespace {
// sum_k exp(row[k] - top) with top the row's maximum: never overflows, and >= 1. Then
// logsumexp(row) = top + log(sum) and softmax(row)[k] = exp(row[k] - top) / sum, exact where
// logits are equal however large (softmax 1/2 for two logits of 1e4, as torch). An infinite
// or NaN logit makes the sum NaN, as in torch's log_softmax.
template <typename T>
double shifted_exp_sum(const T* row, int64_t K, double& top) {
    top = *std::max_element(row, row + K);
    double sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += std::exp(double(row[k]) - top);
    return sum;
}
}  // namespace

template <typename T>
double cross_entropy_forward(const T* logits, const int64_t* labels, int64_t N, int64_t K) {
    double sum = 0;
    for (int64_t n = 0; n < N; ++n) {
        const T* row = logits + n * K;
        double top;
        const double exp_sum = shifted_exp_sum(row, K, top);
        // logsumexp - row[label], both shifted by top: exact for the largest logit
        sum += std::log(exp_sum) - (double(row[labels[n]]) - top);
    }
    return sum / double(N);
}

template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const int64_t* labels, int64_t N,
                            int64_t K) {
    const double inv_n = 1.0 / double(N);
    for (int64_t n = 0; n < N; ++n) {
        const T* row = logits + n * K;
        T* drow = dlogits + n * K;
        double top;
        const double exp_sum = shifted_exp_sum(row, K, top);
        for (int64_t k = 0; k < K; ++k) {
            const double softmax = std::exp(double(row[k]) - top) / exp_sum;
            drow[k] = T((softmax - (k == labels[n] ? 1.0 : 0.0)) * inv_n);
        }
    }
}

#define CNNBP_INSTANTIATE(T)                                                                     \
    template double binary_cross_entropy_forward<T>(const T*, const T*, int64_t);                \
    template void binary_cross_entropy_backward<T>(T*, const T*, const T*, int64_t);             \
    template double binary_cross_entropy_with_logits_forward<T>(const T*, const T*, int64_t);    \
    template void binary_cross_entropy_with_logits_backward<T>(T*, const T*, const T*, int64_t); \
    template double cross_entropy_forward<T>(const T*, const int64_t*, int64_t, int64_t);        \
    template void cross_entropy_backward<T>(T*, const T*, const int64_t*, int64_t, int64_t);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
