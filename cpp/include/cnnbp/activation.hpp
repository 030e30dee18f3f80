// cnnbp/activation.hpp -- elementwise activations, forward and backward. `count` elements,
// any shape. Outputs are overwritten; an output may alias its input of the same role.
// softmax and log_softmax (at the end) run along one dim of the input, seen as
// (outer, K, inner) by shapes.hpp's softmax_dims; their outputs must not alias an input.
// Names, defaults and formulas are torch's (torch.nn.functional.relu, leaky_relu, gelu, silu,
// sigmoid, tanh); options are checked by shapes.hpp (leaky_relu_slope,
// parse_gelu_approximate) before a kernel runs.
#pragma once

#include <cstdint>

#include "cnnbp/shapes.hpp"

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

// a = z > 0 ? z : z * negative_slope (the slope rounded to T once); NaN stays NaN.
template <typename T>
void leaky_relu_forward(T* a, const T* z, int64_t count, double negative_slope);
// dz = z > 0 ? da : da * negative_slope   -- inverts `a = z > 0 ? z : z * negative_slope`;
// torch's leaky_relu_backward (the slope's side at z = 0).
template <typename T>
void leaky_relu_backward(T* dz, const T* da, const T* z, int64_t count, double negative_slope);

// a = z * Phi(z), Phi the standard normal CDF, as torch's gelu:
//   'none': a = z * 0.5 * (1 + erf(z / sqrt(2)))
//   'tanh': a = 0.5 * z * (1 + tanh(sqrt(2 / pi) * (z + 0.044715 * z^3)))
// computed in double (float: rounded once); NaN stays NaN.
template <typename T>
void gelu_forward(T* a, const T* z, int64_t count, GeluApproximate approximate);
// dz = da * d/dz of the forward above, from the input z, as torch's gelu_backward:
//   'none': dz = da * (Phi(z) + z * exp(-z^2 / 2) / sqrt(2 pi))
//   'tanh': with t = tanh(u), u = sqrt(2 / pi) * (z + 0.044715 z^3),
//           dz = da * (0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2 / pi) (1 + 3 * 0.044715 z^2))
template <typename T>
void gelu_backward(T* dz, const T* da, const T* z, int64_t count, GeluApproximate approximate);

// a = z * sigmoid(z) = z / (1 + exp(-z)), computed in double (float: rounded once).
template <typename T>
void silu_forward(T* a, const T* z, int64_t count);
// dz = da * s * (1 + z * (1 - s)), s = sigmoid(z)   -- inverts `a = z / (1 + exp(-z))` from
// the input z, as torch's silu_backward.
template <typename T>
void silu_backward(T* dz, const T* da, const T* z, int64_t count);

// ---- softmax, log_softmax: along the K dim of (outer, K, inner) ---------------------------
// Each of the outer * inner slices z[o, :, i] on its own, computed stably in double (float:
// rounded once) with top = the slice's maximum, which makes every exp(z - top) <= 1:
//   softmax:      a_k = exp(z_k - top) / sum_j exp(z_j - top)
//   log_softmax:  a_k = (z_k - top) - log(sum_j exp(z_j - top))
// A NaN (or +inf) in a slice makes the slice NaN, as in torch.
template <typename T>
void softmax_forward(T* a, const T* z, const SoftmaxDims& dims);
// dz = a * (da - sum_k(da * a))   -- inverts `a = exp(z - top) / sum` from the output a, as
// torch's softmax_backward_data.
template <typename T>
void softmax_backward(T* dz, const T* da, const T* a, const SoftmaxDims& dims);

template <typename T>
void log_softmax_forward(T* a, const T* z, const SoftmaxDims& dims);
// dz = da - exp(a) * sum_k(da)   -- inverts `a = (z - top) - log(sum)` from the output a, as
// torch's log_softmax_backward_data.
template <typename T>
void log_softmax_backward(T* dz, const T* da, const T* a, const SoftmaxDims& dims);

}  // namespace cnnbp
