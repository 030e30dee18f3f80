// conv2d's row copies and crops in AVX-512F (see conv2d_rows.hpp). Built with -mavx512f
// -ffp-contract=off for this file only; nothing here is an inline function another file could
// share (a copy compiled for AVX-512 could be picked by the linker for older CPUs).
#include "conv2d_rows.hpp"

#if defined(CNNBP_AVX512_KERNELS)

#include <immintrin.h>

namespace cnnbp::detail {
namespace {

// lanes [0, n) of a step, n <= 16
__mmask16 first_lanes(int64_t n) { return __mmask16((1u << n) - 1u); }

// z -> the epilogue's value, in conv2d.cpp's order: (z - m) * scale + shift, then the select
__m512 apply(__m512 z, bool affine, __m512 m, __m512 scale, __m512 shift, bool relu) {
    if (affine) z = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(z, m), scale), shift);
    if (relu)
        z = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LE_OQ), z,
                                 _mm512_setzero_ps());
    return z;
}

}  // namespace

void copy_rows_f32_avx512(float* to, int64_t to_stride, const float* from, int64_t from_stride,
                          int64_t rows, int64_t width) {
    const int64_t whole = width / 16 * 16;
    const __mmask16 tail = first_lanes(width - whole);
    for (int64_t r = 0; r < rows; ++r) {
        const float* f = from + r * from_stride;
        float* t = to + r * to_stride;
        for (int64_t j = 0; j < whole; j += 16) _mm512_storeu_ps(t + j, _mm512_loadu_ps(f + j));
        if (tail) _mm512_mask_storeu_ps(t + whole, tail, _mm512_maskz_loadu_ps(tail, f + whole));
    }
}

void crop_rows_f32_avx512(float* to, int64_t to_stride, const float* from, int64_t from_stride,
                          int64_t rows, int64_t width, float b, const float* affine, bool relu) {
    const int64_t whole = width / 16 * 16;
    const __mmask16 tail = first_lanes(width - whole);
    const __m512 bias = _mm512_set1_ps(b);
    const __m512 m = _mm512_set1_ps(affine ? affine[0] : 0.0f),
                 scale = _mm512_set1_ps(affine ? affine[1] : 0.0f),
                 shift = _mm512_set1_ps(affine ? affine[2] : 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
        const float* f = from + r * from_stride;
        float* t = to + r * to_stride;
        for (int64_t j = 0; j < whole; j += 16) {
            const __m512 z = _mm512_add_ps(bias, _mm512_loadu_ps(f + j));  // b + from, as there
            _mm512_storeu_ps(t + j, apply(z, affine, m, scale, shift, relu));
        }
        if (tail) {
            const __m512 z = _mm512_add_ps(bias, _mm512_maskz_loadu_ps(tail, f + whole));
            _mm512_mask_storeu_ps(t + whole, tail, apply(z, affine, m, scale, shift, relu));
        }
    }
}

}  // namespace cnnbp::detail

#endif  // CNNBP_AVX512_KERNELS
