// cnnbp/loss.hpp -- losses, each with the gradient of its value. The short signatures are
// torch's defaults (reduction='mean', no weights) on the fast path; the long ones take every
// option of torch's losses (shapes.hpp's Reduction and CrossEntropyParams). Gradients are
// overwritten and already include the 1/count of the mean. Sums are accumulated in double.
//
// Options of the long signatures: `losses` receives the per-element losses for
// Reduction::None (the forward then returns 0; nullptr otherwise). A backward is given
// dL/d(loss): `grad_output`, one value per element of the loss, for Reduction::None, else
// the number `grad` (1 when the loss is the objective).
#pragma once

#include <cstdint>

#include "cnnbp/shapes.hpp"

namespace cnnbp {

// Binary cross-entropy of probabilities a in [0, 1] against targets y, `count` elements:
//   L = mean( -(y * max(log a, -100) + (1 - y) * max(log(1 - a), -100)) )
// The clamp at -100 is torch's: a = 0 with y = 1 costs 100, not infinity.
template <typename T>
double binary_cross_entropy_forward(const T* a, const T* y, int64_t count);
// da = (a - y) / max(a * (1 - a), 1e-12f) / count   (torch's formula and float epsilon)
template <typename T>
void binary_cross_entropy_backward(T* da, const T* a, const T* y, int64_t count);

// Binary cross-entropy on logits z, computed stably (torch's (1 - y) z - log sigmoid(z)):
//   L = mean( (1 - y) z + log(1 + exp(-|z|)) + max(-z, 0) )
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

// ---- every option ------------------------------------------------------------------------
// weight (and pos_weight): nullptr or `count` values, the caller's expanded to the input's
// shape (shapes.hpp's expand_to).

// l_i = -weight_i * (y_i * max(log a_i, -100) + (1 - y_i) * max(log(1 - a_i), -100))
template <typename T>
double binary_cross_entropy_forward(T* losses, const T* a, const T* y, const T* weight,
                                    int64_t count, Reduction reduction);
// da_i = g_i * weight_i * (a_i - y_i) / max(a_i * (1 - a_i), 1e-12f)
template <typename T>
void binary_cross_entropy_backward(T* da, const T* a, const T* y, const T* weight, int64_t count,
                                   Reduction reduction, const T* grad_output, double grad);

// torch's stable form with pos_weight p (the weight of the positive term):
//   l_i = weight_i * ((1 - y) z + (1 + (p - 1) y) * (log(1 + exp(-|z|)) + max(-z, 0)))
template <typename T>
double binary_cross_entropy_with_logits_forward(T* losses, const T* z, const T* y, const T* weight,
                                                const T* pos_weight, int64_t count,
                                                Reduction reduction);
// dz_i = g_i * weight_i * ((1 + (p - 1) y) * sigmoid(z) - p y)
template <typename T>
void binary_cross_entropy_with_logits_backward(T* dz, const T* z, const T* y, const T* weight,
                                               const T* pos_weight, int64_t count,
                                               Reduction reduction, const T* grad_output,
                                               double grad);

// Cross-entropy of logits (N, K, S) (S = d1 * d2 * ..., 1 without them) against class
// indices `labels` (N, S) or, when dims.probabilities, class probabilities `target` (N, K, S).
// With log p = log_softmax over K, eps = label_smoothing and t the target mixed with the
// uniform distribution, t_c = (1 - eps) [c == label] + eps / K (or (1 - eps) target_c + eps / K):
//   l_(n,s) = sum_c weight_c * t_c * (-log p_c)      (0 where label == ignore_index)
// 'mean' divides the sum by sum over counted positions of weight_label (class indices) or by
// N * S (probabilities), as torch: nan when every label is ignored. weight: nullptr or (K,).
template <typename T>
double cross_entropy_forward(T* losses, const T* logits, const int64_t* labels, const T* target,
                             const T* weight, const CrossEntropyDims& dims,
                             const CrossEntropyParams& params);
// dlogits_(n,c,s) = g_(n,s) * (p_c * sum_k weight_k t_k - weight_c t_c); 0 where ignored
template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const int64_t* labels, const T* target,
                            const T* weight, const CrossEntropyDims& dims,
                            const CrossEntropyParams& params, const T* grad_output, double grad);

// Negative log-likelihood of log-probabilities input (N, K, S) (log_softmax's output, as
// torch's nll_loss) against class indices `labels` (N, S), with dims and params as
// cross-entropy's (label_smoothing unused, no probabilities):
//   l_(n,s) = -weight_label * input_(n,label,s)       (0 where label == ignore_index)
// 'mean' divides the sum by the counted labels' weights, as torch: nan when every label is
// ignored. weight: nullptr or (K,).
template <typename T>
double nll_loss_forward(T* losses, const T* input, const int64_t* labels, const T* weight,
                        const CrossEntropyDims& dims, const CrossEntropyParams& params);
// dinput_(n,c,s) = -g_(n,s) * weight_c where c == label, else 0 (0 where ignored); needs no
// input values
template <typename T>
void nll_loss_backward(T* dinput, const int64_t* labels, const T* weight,
                       const CrossEntropyDims& dims, const CrossEntropyParams& params,
                       const T* grad_output, double grad);

}  // namespace cnnbp
