// cnnbp/optim.hpp -- optimizer updates, elementwise over one parameter tensor.
//
// param, grad and the momentum buffer have `count` values each; param and the buffer are
// updated in place. Constants are rounded to T before use, as NumPy and torch do with a
// Python float and a float32 tensor, so float32 updates are float32 arithmetic throughout.
#pragma once

#include <cstdint>

namespace cnnbp {

struct SgdParams {
    double lr = 0.1, momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
    bool nesterov = false;
};

// torch.optim.SGD, one step, in this order of operations:
//   g = grad + weight_decay * param                          (weight_decay != 0)
//   buffer = g                               on the first step (buffer_is_new),
//   buffer = momentum * buffer + (1 - dampening) * g    after  (momentum != 0)
//   g = nesterov ? g + momentum * buffer : buffer            (momentum != 0)
//   param -= lr * g
// momentum_buffer may be nullptr when momentum == 0.
template <typename T>
void sgd_step(T* param, const T* grad, T* momentum_buffer, bool buffer_is_new,
              const SgdParams& params, int64_t count);

struct AdamParams {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
    bool decoupled_weight_decay = false;  // AdamW
};

// torch.optim.Adam / AdamW, step number `step` (1 for the first), in torch's order:
//   param *= 1 - lr * weight_decay                         (AdamW, weight_decay != 0)
//   g = grad + weight_decay * param                        (Adam, weight_decay != 0)
//   m += (1 - beta1) * (g - m)          v = beta2 * v + (1 - beta2) * g * g
//   param += -lr / (1 - beta1^step) * (m / (sqrt(v) / sqrt(1 - beta2^step) + eps))
// m and v start at zero.
template <typename T>
void adam_step(T* param, const T* grad, T* first_moment, T* second_moment, int64_t step,
               const AdamParams& params, int64_t count);

}  // namespace cnnbp
