// Dropout forward and backward, elementwise over `count` values.
//
// Each mask byte is computed from (seed, flat index) alone by a counter-based hash, and each
// output element is written by one thread: results do not depend on the thread count. The
// loops are branch-free so that the compiler vectorizes them; the forward makes the mask
// and the output block by block, so that the mask is still in cache when it is used.
#include "cnnbp/dropout.hpp"

#include <algorithm>
#include <cmath>

#include "parallel.hpp"

namespace cnnbp {
namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;  // SplitMix64's increment

// SplitMix64's finalizer (Stafford's Mix13): every input bit affects every output bit.
inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Kept iff (hash >> 11) * 2^-53 >= p, i.e. (hash >> 11) >= ceil(p * 2^53): an integer compare
// (p * 2^53 is exact for p in [0, 1]). p = 0 keeps all, p = 1 gives 2^53 and keeps none.
inline uint64_t keep_threshold(double p) {
    return static_cast<uint64_t>(std::ceil(std::ldexp(p, 53)));
}

// The work of one element (hash, compare, scale) in multiply-adds, for the parallel threshold.
constexpr int64_t kDropoutWork = 8;
constexpr int64_t kBlock = 1024;

}  // namespace

uint64_t dropout_hash(uint64_t seed, uint64_t index) {
    return mix64(mix64(seed) + (index + 1) * kGamma);
}

template <typename T>
void dropout_forward(T* output, uint8_t* mask, const T* input, int64_t count,
                     const DropoutParams& params) {
    const uint64_t key = mix64(params.seed);
    const uint64_t threshold = keep_threshold(params.p);
    const bool drop_all = params.p == 1.0;
    const T keep = T(1.0 - params.p);  // 1 - p in double, rounded once to T as NumPy does
    detail::parallel_for(count, count * kDropoutWork, [=](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; b += kBlock) {
            const int64_t n = std::min(kBlock, end - b);
            uint8_t* __restrict m = mask + b;
            T* __restrict out = output + b;
            const T* __restrict in = input + b;
            const uint64_t first = static_cast<uint64_t>(b) + 1;  // the counter of element b
            for (int64_t i = 0; i < n; ++i)
                m[i] =
                    (mix64(key + (first + static_cast<uint64_t>(i)) * kGamma) >> 11) >= threshold;
            if (drop_all)  // torch: input * 0 (NaN and inf give NaN, negatives -0)
                for (int64_t i = 0; i < n; ++i) out[i] = in[i] * T(0);
            else
                for (int64_t i = 0; i < n; ++i) out[i] = in[i] * T(m[i]) / keep;
        }
    });
}

template <typename T>
void dropout_backward(T* dinput, const T* doutput, const uint8_t* mask, int64_t count,
                      const DropoutParams& params) {
    const bool drop_all = params.p == 1.0;
    const T keep = T(1.0 - params.p);
    detail::parallel_for(count, count, [=](int64_t begin, int64_t end) {
        T* __restrict din = dinput;
        const T* __restrict dout = doutput;
        const uint8_t* __restrict m = mask;
        if (drop_all)
            for (int64_t i = begin; i < end; ++i) din[i] = dout[i] * T(0);
        else
            for (int64_t i = begin; i < end; ++i) din[i] = dout[i] * T(m[i] != 0) / keep;
    });
}

#define CNNBP_INSTANTIATE(T)                                                                 \
    template void dropout_forward<T>(T*, uint8_t*, const T*, int64_t, const DropoutParams&); \
    template void dropout_backward<T>(T*, const T*, const uint8_t*, int64_t, const DropoutParams&);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
