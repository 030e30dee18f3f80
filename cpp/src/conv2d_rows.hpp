// Internal: conv2d's row copies in and out of its padded stacks, for float in AVX-512
// (conv2d_rows_avx512.cpp, compiled with -mavx512f -ffp-contract=off; to be called only
// when avx512_kernels_enabled()). The rows of a small plane are short (a 13-wide plane, an
// 11-wide output), where a library copy per row or a loop of 4-wide steps with a scalar
// tail spends more on its overheads than on the values; these take 16 values a step and a
// masked last step. Every value goes through the same IEEE operations as conv2d.cpp's
// portable loops, so the results are the same bits.
#pragma once

#include <cstdint>

namespace cnnbp::detail {

// to[r * to_stride + j] = from[r * from_stride + j], r < rows, j < width
void copy_rows_f32_avx512(float* to, int64_t to_stride, const float* from, int64_t from_stride,
                          int64_t rows, int64_t width);

// The crop of a band of the output grid with conv2d's epilogue: z = b + from[...], then
// with `affine` (m, scale, shift) y = (z - m) * scale + shift, then with relu y <= 0 ? 0 : y.
void crop_rows_f32_avx512(float* to, int64_t to_stride, const float* from, int64_t from_stride,
                          int64_t rows, int64_t width, float b, const float* affine, bool relu);

}  // namespace cnnbp::detail
