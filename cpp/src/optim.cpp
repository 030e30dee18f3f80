// Optimizer updates, elementwise: each value is updated by one thread in a fixed order of
// operations, so results do not depend on the thread count.
#include "cnnbp/optim.hpp"

#include <cmath>

#include "parallel.hpp"

namespace cnnbp {

template <typename T>
void sgd_step(T* param, const T* grad, T* momentum_buffer, bool buffer_is_new, const SgdParams& p,
              int64_t count) {
    const T lr = T(p.lr), momentum = T(p.momentum), weight_decay = T(p.weight_decay);
    const T keep = T(1.0 - p.dampening);  // (1 - dampening) in double, then rounded, as in Python
    const bool decay = p.weight_decay != 0.0, heavy = p.momentum != 0.0, nesterov = p.nesterov;
    detail::parallel_for(count, count, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            T g = grad[i];
            if (decay) g = g + weight_decay * param[i];
            if (heavy) {
                // NumPy's `buf *= momentum; buf += (1 - dampening) * g`, rounding for rounding
                const T buf = buffer_is_new ? g : momentum * momentum_buffer[i] + keep * g;
                momentum_buffer[i] = buf;
                g = nesterov ? g + momentum * buf : buf;
            }
            param[i] = param[i] - lr * g;
        }
    });
}

template <typename T>
void adam_step(T* param, const T* grad, T* first_moment, T* second_moment, int64_t step,
               const AdamParams& p, int64_t count) {
    const T keep_first = T(1.0 - p.beta1), beta2 = T(p.beta2), keep_second = T(1.0 - p.beta2);
    const T eps = T(p.eps), weight_decay = T(p.weight_decay);
    const T shrink = T(1.0 - p.lr * p.weight_decay);
    const T neg_step_size = T(-p.lr / (1.0 - std::pow(p.beta1, double(step))));
    const T correction2 = T(std::sqrt(1.0 - std::pow(p.beta2, double(step))));
    const bool decay = p.weight_decay != 0.0, decoupled = p.decoupled_weight_decay;
    detail::parallel_for(count, count, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            T g = grad[i];
            if (decay && decoupled) param[i] = param[i] * shrink;
            if (decay && !decoupled) g = g + weight_decay * param[i];
            const T m = first_moment[i] + keep_first * (g - first_moment[i]);
            const T v = second_moment[i] * beta2 + keep_second * g * g;
            first_moment[i] = m;
            second_moment[i] = v;
            param[i] = param[i] + neg_step_size * (m / (std::sqrt(v) / correction2 + eps));
        }
    });
}

template void adam_step<float>(float*, const float*, float*, float*, int64_t, const AdamParams&,
                               int64_t);
template void adam_step<double>(double*, const double*, double*, double*, int64_t,
                                const AdamParams&, int64_t);
template void sgd_step<float>(float*, const float*, float*, bool, const SgdParams&, int64_t);
template void sgd_step<double>(double*, const double*, double*, bool, const SgdParams&, int64_t);

}  // namespace cnnbp
