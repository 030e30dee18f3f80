// cnnbp/activation.hpp -- elementwise activations, forward and backward. `count` elements,
// any shape. Outputs are overwritten; an output may alias its input of the same role.
#pragma once

#include <cstdint>

namespace cnnbp {

// a = max(z, 0); NaN stays NaN.
template <typename T>
void relu_forward(T* a, const T* z, int64_t count);
// dz = (z <= 0) ? 0 : da   -- inverts `a = max(z, 0)`; torch's threshold_backward.
template <typename T>
void relu_backward(T* dz, const T* da, const T* z, int64_t count);

// a = 1 / (1 + exp(-z))
template <typename T>
void sigmoid_forward(T* a, const T* z, int64_t count);
// dz = da * (1 - a) * a   -- inverts `a = 1 / (1 + exp(-z))` using the forward output a.
template <typename T>
void sigmoid_backward(T* dz, const T* da, const T* a, int64_t count);

// a = tanh(z), by std::tanh in double (float: rounded once, within half an ulp); +-1 for
// large |z|, never overflows, NaN stays NaN.
template <typename T>
void tanh_forward(T* a, const T* z, int64_t count);
// dz = da * (1 - a * a)   -- inverts `a = tanh(z)` using the forward output a, as torch's
// tanh_backward; computed as da * ((1 - a) * (1 + a)), which does not cancel near a = +-1.
template <typename T>
void tanh_backward(T* dz, const T* da, const T* a, int64_t count);

}  // namespace cnnbp
