// cnnbp/dropout.hpp -- dropout, forward and backward, elementwise over `count` values of any
// shape. The mask is a function of (seed, flat index) only, so it is the same for any number
// of threads, on every run and every machine, and another seed gives another mask.
// Outputs are overwritten.
#pragma once

#include <cstdint>

#include "cnnbp/shapes.hpp"

namespace cnnbp {

// The counter-based hash behind the mask: output number `index` of the SplitMix64 stream
// keyed by `seed`,
//     dropout_hash(seed, index) = mix64(mix64(seed) + (index + 1) * 0x9E3779B97F4A7C15)
// (arithmetic modulo 2^64), where mix64(z) is SplitMix64's finalizer:
//     z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;  z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
//     return z ^ (z >> 31);
// Element i is kept when its uniform u = (dropout_hash(seed, i) >> 11) * 2^-53 in [0, 1)
// satisfies u >= p, which happens with probability 1 - p.
uint64_t dropout_hash(uint64_t seed, uint64_t index);

// mask[i] = 1 if element i is kept, else 0 (as above); output = input * mask / (1 - p), with
// 1 - p rounded to T, the numbers NumPy's `x * mask / (1 - p)` gives. p == 0 is the identity
// with every element kept; p == 1 keeps none and gives output = input * 0, as torch.
template <typename T>
void dropout_forward(T* output, uint8_t* mask, const T* input, int64_t count,
                     const DropoutParams& params);

// dinput = doutput * mask / (1 - p)   -- inverts `output = input * mask / (1 - p)`; any
// nonzero mask byte counts as kept. p == 1: dinput = doutput * 0 (params.seed is unused).
template <typename T>
void dropout_backward(T* dinput, const T* doutput, const uint8_t* mask, int64_t count,
                      const DropoutParams& params);

}  // namespace cnnbp
