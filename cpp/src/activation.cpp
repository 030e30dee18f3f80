// ReLU and sigmoid, forward and backward, elementwise over `count` values.
//
// The loops are branch-free so that the compiler vectorizes them for the baseline
// instruction set, and run on several threads above the parallel threshold (each element
// is written by exactly one thread, so results do not depend on the thread count).
#include "cnnbp/activation.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>

#include "parallel.hpp"

namespace cnnbp {

template <typename T>
void relu_forward(T* a, const T* z, int64_t count) {
    // `!(z <= 0)` is `z > 0 || isnan(z)` in one compare: NaN stays NaN, -0 becomes +0.
    detail::parallel_for(count, count, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) a[i] = z[i] <= T(0) ? T(0) : z[i];
    });
}

template <typename T>
void relu_backward(T* dz, const T* da, const T* z, int64_t count) {
    detail::parallel_for(count, count, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const T g = da[i];  // loaded unconditionally, so that the select vectorizes
            dz[i] = z[i] <= T(0) ? T(0) : g;
        }
    });
}

namespace {

// The work of one float sigmoid in multiply-adds, for the parallel threshold.
constexpr int64_t kSigmoidWork = 16;

inline float from_bits(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}
inline uint32_t to_bits(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return bits;
}
// All ones when x < 0, else zero; with pick() below, a select written as bit operations.
// Written as `cond ? a : b`, GCC moves the float arithmetic into branches, which it then
// may not merge back (floating-point operations can trap), and the loop stays scalar.
inline uint32_t ones_if_negative(int32_t x) { return static_cast<uint32_t>(x >> 31); }
inline uint32_t pick(uint32_t mask, uint32_t if_ones, uint32_t if_zeros) {
    return (if_ones & mask) | (if_zeros & ~mask);
}

// float sigmoid in the stable form, from e = exp(-|z|) <= 1 which never overflows:
// a = 1 / (1 + e) for z >= 0, e / (1 + e) for z < 0, NaN stays NaN. exp has no vector form
// in the C++ library, so it is written out: Cody-Waite reduction -|z| = n ln2 + r with
// |r| <= ln2 / 2, Cephes' polynomial for exp(r), and 2^n from its bits, in two factors when
// the result is subnormal (n < -126) so that it is rounded once. Beyond |z| = 104, e rounds
// to 0. Within 2.5 ulp of the float64 sigmoid over all float inputs.
inline float sigmoid_value(float z) {
    const uint32_t z_bits = to_bits(z);
    const int32_t mag = static_cast<int32_t>(z_bits & 0x7fffffffu);  // |z| as ordered bits
    const uint32_t is_nan = ones_if_negative(0x7f800000 - mag);
    const uint32_t is_big = ones_if_negative(0x42cfffff - mag);  // |z| >= 104 (or NaN)
    const float x = -from_bits(pick(is_big, 0x42d00000u, static_cast<uint32_t>(mag)));  // >= -104
    const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float n = (x * 1.44269504088896341f + shifter) - shifter;
    // ln2 = 0.693359375 - 2.12194440e-4, the first part short enough that n * it is exact
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const int32_t ni = static_cast<int32_t>(n);  // in [-150, 0]
    const uint32_t tiny = ones_if_negative(ni + 126);
    const float scale = from_bits(static_cast<uint32_t>(ni + static_cast<int32_t>(tiny & 64u) + 127)
                                  << 23);
    const float unscale = from_bits(pick(tiny, 0x1f800000u, 0x3f800000u));  // 2^-64 or 1
    const float e = from_bits(to_bits(p * scale * unscale) & ~is_big);
    const float numerator = from_bits(pick(ones_if_negative(static_cast<int32_t>(z_bits)),
                                           to_bits(e), 0x3f800000u));
    return from_bits(pick(is_nan, z_bits, to_bits(numerator / (1.0f + e))));
}

}  // namespace

template <>
void sigmoid_forward<float>(float* a, const float* z, int64_t count) {
    detail::parallel_for(count, count * kSigmoidWork, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) a[i] = sigmoid_value(z[i]);
    });
}

// float64 keeps the library exp, a call per element: its accuracy needs more than a short
// polynomial.
template <>
void sigmoid_forward<double>(double* a, const double* z, int64_t count) {
    detail::parallel_for(count, count * kSigmoidWork, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) a[i] = 1.0 / (1.0 + std::exp(-z[i]));
    });
}

template <typename T>
void sigmoid_backward(T* dz, const T* da, const T* a, int64_t count) {
    detail::parallel_for(count, count, [=](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) dz[i] = da[i] * (T(1) - a[i]) * a[i];
    });
}

#define CNNBP_INSTANTIATE(T)                                                  \
    template void relu_forward<T>(T*, const T*, int64_t);                    \
    template void relu_backward<T>(T*, const T*, const T*, int64_t);         \
    template void sigmoid_backward<T>(T*, const T*, const T*, int64_t);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
