// cnnbp/loss.hpp -- losses, each with the gradient of its value. Every loss is the MEAN
// over the batch (torch's default reduction='mean'); gradients are overwritten and already
// include the 1/count of the mean. Sums are accumulated in double.
#pragma once

#include <cstdint>

namespace cnnbp {

// Binary cross-entropy of probabilities a in [0, 1] against targets y, `count` elements:
//   L = mean( -(y * max(log a, -100) + (1 - y) * max(log(1 - a), -100)) )
// The clamp at -100 is torch's: a = 0 with y = 1 costs 100, not infinity.
template <typename T>
double binary_cross_entropy_forward(const T* a, const T* y, int64_t count);
// da = (a - y) / max(a * (1 - a), 1e-12f) / count   (torch's formula and float epsilon)
template <typename T>
void binary_cross_entropy_backward(T* da, const T* a, const T* y, int64_t count);

// Binary cross-entropy on logits z, computed stably:
//   L = mean( max(z, 0) - z * y + log(1 + exp(-|z|)) )
template <typename T>
double binary_cross_entropy_with_logits_forward(const T* z, const T* y, int64_t count);
// dz = (sigmoid(z) - y) / count   -- the derivation's dL/dZ2 = A2 - Y
template <typename T>
void binary_cross_entropy_with_logits_backward(T* dz, const T* z, const T* y, int64_t count);

// Softmax cross-entropy of logits (N, K) against class indices labels (N,) in [0, K):
//   L = mean_n( logsumexp(logits[n]) - logits[n, labels[n]] )
template <typename T>
double cross_entropy_forward(const T* logits, const int64_t* labels, int64_t N, int64_t K);
// dlogits = (softmax(logits) - onehot(labels)) / N
template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const int64_t* labels, int64_t N,
                            int64_t K);

}  // namespace cnnbp
