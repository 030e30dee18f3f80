// Internal: the float sigmoid loop, included by activation.cpp (baseline instruction set)
// and by activation_avx512.cpp (compiled with -mavx512f -ffp-contract=off). Everything here
// has internal linkage and uses no standard-library templates, so that no function compiled
// for AVX-512 can be shared with, and picked by the linker for, the baseline code.
#pragma once

#include <cstdint>
#include <cstring>

namespace cnnbp::detail {

// a[i] = sigmoid(z[i]) for count floats: the baseline build and the AVX-512 build of the
// loop below (the latter only in builds that define CNNBP_AVX512_KERNELS, to be called
// only when avx512_kernels_enabled()).
void sigmoid_f32_baseline(float* a, const float* z, int64_t count);
void sigmoid_f32_avx512(float* a, const float* z, int64_t count);

namespace {

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
    const float scale =
        from_bits(static_cast<uint32_t>(ni + static_cast<int32_t>(tiny & 64u) + 127) << 23);
    const float unscale = from_bits(pick(tiny, 0x1f800000u, 0x3f800000u));  // 2^-64 or 1
    const float e = from_bits(to_bits(p * scale * unscale) & ~is_big);
    const float numerator =
        from_bits(pick(ones_if_negative(static_cast<int32_t>(z_bits)), to_bits(e), 0x3f800000u));
    return from_bits(pick(is_nan, z_bits, to_bits(numerator / (1.0f + e))));
}

inline void sigmoid_f32(float* __restrict a, const float* __restrict z, int64_t count) {
    for (int64_t i = 0; i < count; ++i) a[i] = sigmoid_value(z[i]);
}

}  // namespace
}  // namespace cnnbp::detail
