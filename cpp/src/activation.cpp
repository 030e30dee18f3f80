// ReLU and sigmoid, forward and backward, elementwise over `count` values.
#include "cnnbp/activation.hpp"

#include <cmath>

#include "parallel.hpp"

namespace cnnbp {

template <typename T>
void relu_forward(T* a, const T* z, int64_t count) {
    CNNBP_PARALLEL_FOR_IF(count)
    for (int64_t i = 0; i < count; ++i) a[i] = z[i] > T(0) || std::isnan(z[i]) ? z[i] : T(0);
}

template <typename T>
void relu_backward(T* dz, const T* da, const T* z, int64_t count) {
    CNNBP_PARALLEL_FOR_IF(count)
    for (int64_t i = 0; i < count; ++i) dz[i] = z[i] <= T(0) ? T(0) : da[i];
}

template <typename T>
void sigmoid_forward(T* a, const T* z, int64_t count) {
    CNNBP_PARALLEL_FOR_IF(count * 16)
    for (int64_t i = 0; i < count; ++i) a[i] = T(1) / (T(1) + std::exp(-z[i]));
}

template <typename T>
void sigmoid_backward(T* dz, const T* da, const T* a, int64_t count) {
    CNNBP_PARALLEL_FOR_IF(count)
    for (int64_t i = 0; i < count; ++i) dz[i] = da[i] * (T(1) - a[i]) * a[i];
}

#define CNNBP_INSTANTIATE(T)                                                  \
    template void relu_forward<T>(T*, const T*, int64_t);                    \
    template void relu_backward<T>(T*, const T*, const T*, int64_t);         \
    template void sigmoid_forward<T>(T*, const T*, int64_t);                 \
    template void sigmoid_backward<T>(T*, const T*, const T*, int64_t);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
