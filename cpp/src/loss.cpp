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
    for (int64_t i = 0; i < count; ++i) {
        // torch's (1 - y) z - log sigmoid(z) = (1 - y) z + log(1 + exp(-|z|)) + max(-z, 0),
        // which never overflows, is max(z, 0) - z y + log(1 + exp(-|z|)) for finite z (the
        // faster form here); at z = +-inf torch's form gives inf where this one gives nan
        T loss = std::max(z[i], T(0)) - z[i] * y[i] + T(std::log1p(std::exp(-std::abs(z[i]))));
        if (std::isinf(z[i])) loss = (T(1) - y[i]) * z[i] + std::max(-z[i], T(0));
        sum += double(loss);
    }
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

// ---- every option ------------------------------------------------------------------------

namespace {
double reduced(double sum, double count, Reduction reduction) {
    if (reduction == Reduction::Mean) return sum / count;
    return reduction == Reduction::Sum ? sum : 0.0;
}

// dL/d(loss_i): grad_output[i] for 'none', else grad (over count for the mean)
template <typename T>
struct GradOfLoss {
    const T* grad_output;
    double grad;
    GradOfLoss(const T* per_element, double g, double count, Reduction reduction)
        : grad_output(reduction == Reduction::None ? per_element : nullptr),
          grad(reduction == Reduction::Mean ? g / count : g) {}
    double operator[](int64_t i) const { return grad_output ? double(grad_output[i]) : grad; }
};
}  // namespace

template <typename T>
double binary_cross_entropy_forward(T* losses, const T* a, const T* y, const T* weight,
                                    int64_t count, Reduction reduction) {
    double sum = 0;
    for (int64_t i = 0; i < count; ++i) {
        const T log_a = std::max(T(std::log(a[i])), T(-100));
        const T log_1ma = std::max(T(std::log1p(-a[i])), T(-100));
        T loss = (y[i] - T(1)) * log_1ma - y[i] * log_a;
        if (weight) loss *= weight[i];
        if (reduction == Reduction::None) losses[i] = loss;
        sum += double(loss);
    }
    return reduced(sum, double(count), reduction);
}

template <typename T>
void binary_cross_entropy_backward(T* da, const T* a, const T* y, const T* weight, int64_t count,
                                   Reduction reduction, const T* grad_output, double grad) {
    const T epsilon = T(1e-12f);
    const GradOfLoss<T> g(grad_output, grad, double(count), reduction);
    for (int64_t i = 0; i < count; ++i) {
        T d = (a[i] - y[i]) / std::max((T(1) - a[i]) * a[i], epsilon);
        if (weight) d *= weight[i];
        da[i] = T(g[i]) * d;
    }
}

template <typename T>
double binary_cross_entropy_with_logits_forward(T* losses, const T* z, const T* y, const T* weight,
                                                const T* pos_weight, int64_t count,
                                                Reduction reduction) {
    double sum = 0;
    for (int64_t i = 0; i < count; ++i) {
        // softplus(-z) = log(1 + exp(-z)) = log(1 + exp(-|z|)) + max(-z, 0), never overflowing
        const T softplus_neg = T(std::log1p(std::exp(-std::abs(z[i])))) + std::max(-z[i], T(0));
        const T log_weight = pos_weight ? T(1) + (pos_weight[i] - T(1)) * y[i] : T(1);
        T loss = (T(1) - y[i]) * z[i] + log_weight * softplus_neg;
        if (weight) loss *= weight[i];
        if (reduction == Reduction::None) losses[i] = loss;
        sum += double(loss);
    }
    return reduced(sum, double(count), reduction);
}

template <typename T>
void binary_cross_entropy_with_logits_backward(T* dz, const T* z, const T* y, const T* weight,
                                               const T* pos_weight, int64_t count,
                                               Reduction reduction, const T* grad_output,
                                               double grad) {
    const GradOfLoss<T> g(grad_output, grad, double(count), reduction);
    for (int64_t i = 0; i < count; ++i) {
        // (1 - y) - log_weight * sigmoid(-z), written as torch does:
        // (1 + (p - 1) y) sigmoid(z) - p y
        const T sigmoid = T(1) / (T(1) + std::exp(-z[i]));
        T d = pos_weight ? (T(1) + (pos_weight[i] - T(1)) * y[i]) * sigmoid - pos_weight[i] * y[i]
                         : sigmoid - y[i];
        if (weight) d *= weight[i];
        dz[i] = T(g[i]) * d;
    }
}

namespace {
// One position (n, s) of cross-entropy: its K logits read with stride S.
template <typename T>
struct CrossEntropyRow {
    const CrossEntropyDims& d;
    const CrossEntropyParams& p;
    const int64_t* labels;
    const T* target;
    const T* weight;

    double w(int64_t c) const { return weight ? double(weight[c]) : 1.0; }
    // the mixed target t_c (see loss.hpp); label is the position's class index
    double t(int64_t c, int64_t label, const T* target_row) const {
        const double eps = p.label_smoothing, K = double(d.K);
        const double given =
            d.probabilities ? double(target_row[c * d.S]) : (c == label ? 1.0 : 0.0);
        return (1.0 - eps) * given + eps / K;
    }
    bool ignored(int64_t label) const { return !d.probabilities && label == p.ignore_index; }
    // the mean's divisor: the counted targets' weights, or N * S for probabilities
    double divisor() const {
        if (d.probabilities) return double(d.N) * double(d.S);
        double total = 0;
        for (int64_t i = 0; i < d.N * d.S; ++i)
            if (!ignored(labels[i])) total += w(labels[i]);
        return total;
    }
};
}  // namespace

template <typename T>
double cross_entropy_forward(T* losses, const T* logits, const int64_t* labels, const T* target,
                             const T* weight, const CrossEntropyDims& d,
                             const CrossEntropyParams& p) {
    const CrossEntropyRow<T> rows{d, p, labels, target, weight};
    const bool smoothing = p.label_smoothing > 0.0;
    double sum = 0;
    for (int64_t n = 0; n < d.N; ++n)
        for (int64_t s = 0; s < d.S; ++s) {
            const int64_t at = n * d.S + s, label = d.probabilities ? 0 : labels[at];
            const T* row = logits + n * d.K * d.S + s;
            const T* target_row = d.probabilities ? target + n * d.K * d.S + s : nullptr;
            double loss = 0;
            if (!rows.ignored(label)) {
                double top = row[0];
                for (int64_t c = 1; c < d.K; ++c) top = std::max(top, double(row[c * d.S]));
                double exp_sum = 0;
                for (int64_t c = 0; c < d.K; ++c) exp_sum += std::exp(double(row[c * d.S]) - top);
                const double log_sum = std::log(exp_sum);  // -log p_c = log_sum - (z_c - top)
                if (d.probabilities || smoothing) {
                    for (int64_t c = 0; c < d.K; ++c)
                        loss += rows.w(c) * rows.t(c, label, target_row) *
                                (log_sum - (double(row[c * d.S]) - top));
                } else {  // t is one-hot: the label's term alone (no 0 * inf at other classes)
                    loss = rows.w(label) * (log_sum - (double(row[label * d.S]) - top));
                }
            }
            if (p.reduction == Reduction::None) losses[at] = T(loss);
            sum += loss;
        }
    if (p.reduction != Reduction::Mean) return reduced(sum, 1.0, p.reduction);
    return sum / rows.divisor();
}

template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const int64_t* labels, const T* target,
                            const T* weight, const CrossEntropyDims& d, const CrossEntropyParams& p,
                            const T* grad_output, double grad) {
    const CrossEntropyRow<T> rows{d, p, labels, target, weight};
    const double count = p.reduction == Reduction::Mean ? rows.divisor() : 1.0;
    const GradOfLoss<T> g(grad_output, grad, count, p.reduction);
    for (int64_t n = 0; n < d.N; ++n)
        for (int64_t s = 0; s < d.S; ++s) {
            const int64_t at = n * d.S + s, label = d.probabilities ? 0 : labels[at];
            const T* row = logits + n * d.K * d.S + s;
            T* drow = dlogits + n * d.K * d.S + s;
            const T* target_row = d.probabilities ? target + n * d.K * d.S + s : nullptr;
            if (rows.ignored(label)) {
                for (int64_t c = 0; c < d.K; ++c) drow[c * d.S] = T(0);
                continue;
            }
            double top = row[0];
            for (int64_t c = 1; c < d.K; ++c) top = std::max(top, double(row[c * d.S]));
            double exp_sum = 0;
            for (int64_t c = 0; c < d.K; ++c) exp_sum += std::exp(double(row[c * d.S]) - top);
            double total = 0;  // sum_c weight_c t_c
            for (int64_t c = 0; c < d.K; ++c) total += rows.w(c) * rows.t(c, label, target_row);
            const double g_at = g[at];
            for (int64_t c = 0; c < d.K; ++c) {
                const double softmax = std::exp(double(row[c * d.S]) - top) / exp_sum;
                drow[c * d.S] =
                    T(g_at * (softmax * total - rows.w(c) * rows.t(c, label, target_row)));
            }
        }
}

namespace {
// The counted labels' weights: the mean's divisor, as cross-entropy's for class indices.
template <typename T>
double nll_loss_divisor(const int64_t* labels, const T* weight, const CrossEntropyDims& d,
                        const CrossEntropyParams& p) {
    const CrossEntropyRow<T> rows{d, p, labels, nullptr, weight};
    return rows.divisor();
}
}  // namespace

template <typename T>
double nll_loss_forward(T* losses, const T* input, const int64_t* labels, const T* weight,
                        const CrossEntropyDims& d, const CrossEntropyParams& p) {
    double sum = 0;
    for (int64_t n = 0; n < d.N; ++n)
        for (int64_t s = 0; s < d.S; ++s) {
            const int64_t at = n * d.S + s, label = labels[at];
            double loss = 0;
            if (label != p.ignore_index) {
                const double w = weight ? double(weight[label]) : 1.0;
                loss = -w * double(input[(n * d.K + label) * d.S + s]);
            }
            if (p.reduction == Reduction::None) losses[at] = T(loss);
            sum += loss;
        }
    if (p.reduction != Reduction::Mean) return reduced(sum, 1.0, p.reduction);
    return sum / nll_loss_divisor(labels, weight, d, p);
}

template <typename T>
void nll_loss_backward(T* dinput, const int64_t* labels, const T* weight, const CrossEntropyDims& d,
                       const CrossEntropyParams& p, const T* grad_output, double grad) {
    const double count =
        p.reduction == Reduction::Mean ? nll_loss_divisor(labels, weight, d, p) : 1.0;
    const GradOfLoss<T> g(grad_output, grad, count, p.reduction);
    std::fill(dinput, dinput + d.N * d.K * d.S, T(0));
    for (int64_t n = 0; n < d.N; ++n)
        for (int64_t s = 0; s < d.S; ++s) {
            const int64_t at = n * d.S + s, label = labels[at];
            if (label == p.ignore_index) continue;
            const double w = weight ? double(weight[label]) : 1.0;
            dinput[(n * d.K + label) * d.S + s] = T(-w * g[at]);
        }
}

#define CNNBP_INSTANTIATE(T)                                                                      \
    template double binary_cross_entropy_forward<T>(const T*, const T*, int64_t);                 \
    template void binary_cross_entropy_backward<T>(T*, const T*, const T*, int64_t);              \
    template double binary_cross_entropy_with_logits_forward<T>(const T*, const T*, int64_t);     \
    template void binary_cross_entropy_with_logits_backward<T>(T*, const T*, const T*, int64_t);  \
    template double cross_entropy_forward<T>(const T*, const int64_t*, int64_t, int64_t);         \
    template void cross_entropy_backward<T>(T*, const T*, const int64_t*, int64_t, int64_t);      \
    template double binary_cross_entropy_forward<T>(T*, const T*, const T*, const T*, int64_t,    \
                                                    Reduction);                                   \
    template void binary_cross_entropy_backward<T>(T*, const T*, const T*, const T*, int64_t,     \
                                                   Reduction, const T*, double);                  \
    template double binary_cross_entropy_with_logits_forward<T>(T*, const T*, const T*, const T*, \
                                                                const T*, int64_t, Reduction);    \
    template void binary_cross_entropy_with_logits_backward<T>(                                   \
        T*, const T*, const T*, const T*, const T*, int64_t, Reduction, const T*, double);        \
    template double cross_entropy_forward<T>(T*, const T*, const int64_t*, const T*, const T*,    \
                                             const CrossEntropyDims&, const CrossEntropyParams&); \
    template void cross_entropy_backward<T>(T*, const T*, const int64_t*, const T*, const T*,     \
                                            const CrossEntropyDims&, const CrossEntropyParams&,   \
                                            const T*, double);                                    \
    template double nll_loss_forward<T>(T*, const T*, const int64_t*, const T*,                   \
                                        const CrossEntropyDims&, const CrossEntropyParams&);      \
    template void nll_loss_backward<T>(T*, const int64_t*, const T*, const CrossEntropyDims&,     \
                                       const CrossEntropyParams&, const T*, double);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
