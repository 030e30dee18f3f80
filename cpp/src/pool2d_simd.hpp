// Internal: the plane kernels of the 2x2 / stride 2 / no padding max-pool. Each handles one
// (H, W) plane with P output rows and Q output columns, output rows Q apart: P = H / 2 or
// (H + 1) / 2, Q = W / 2 or (W + 1) / 2 -- floored, or ceil_mode's, whose last row or column
// of windows (H or W odd) is clipped to the input: one input row or column instead of two.
// The portable forward lives in pool2d.cpp; the AVX-512 forward and backward in
// pool2d_avx512.cpp, compiled with -mavx512f and called only when the running CPU has
// AVX-512F (without it the backward is pool2d.cpp's zero-fill and scatter, faster there than
// one-pass loops). All have the general kernels' semantics bit for bit; they are declared
// here so that the C++ tests can hold them against each other.
#pragma once

#include <cstdint>

namespace cnnbp::detail {

// The kernels handle window offsets in 32 bits: callers pass only W < this.
constexpr int64_t kMaxSimdWidth = int64_t(1) << 30;

template <typename T>
void max_pool2x2_plane(T* output, int64_t* indices, const T* input, int64_t H, int64_t W, int64_t P,
                       int64_t Q);

using Pool2x2Forward = void (*)(float* output, int64_t* indices, const float* input, int64_t H,
                                int64_t W, int64_t P, int64_t Q);
using Pool2x2Backward = bool (*)(float* dinput, const float* doutput, const int64_t* indices,
                                 int64_t H, int64_t W, int64_t P, int64_t Q);
// The AVX-512 plane kernels, or null when this build lacks them or the CPU cannot run them.
// The backward writes dinput's plane = doutput scattered to indices in one pass (cells no
// window covers get zero). It returns false, having written part of the plane, if some index
// lies outside its own window (clipped to the input): the caller then redoes the plane by
// zero-fill and scatter.
Pool2x2Forward max_pool2x2_plane_avx512_if_supported();
Pool2x2Backward max_unpool2x2_plane_avx512_if_supported();

// Small planes, many at once: floored 2x2 pools of (H, W) planes with H and W even, W <= 16,
// Q a divisor of 16 and P*Q (= H*W/4) a divisor or a multiple of 16, stored one after
// another, are row pairs
// of one tall plane; 16 windows, 64 inputs, make a chunk (chunk c: outputs 16c .. 16c+15 of
// the whole run of planes, inputs 64c .. 64c+63), computed in a few vector instructions where
// the plane kernels spend a step on each short row. Same semantics bit for bit. (pool2d.cpp's
// small_2x2_planes says which planes qualify.)
// chunks [chunk_begin, chunk_end) of the planes that start at output, indices, input
using Pool2x2ChunksForward = void (*)(float* output, int64_t* indices, const float* input,
                                      int64_t H, int64_t W, int64_t chunk_begin, int64_t chunk_end);
// false if some index lies outside its own window (dinput then partly written)
using Pool2x2ChunksBackward = bool (*)(float* dinput, const float* doutput, const int64_t* indices,
                                       int64_t H, int64_t W, int64_t chunk_begin,
                                       int64_t chunk_end);
Pool2x2ChunksForward max_pool2x2_chunks_avx512_if_supported();
Pool2x2ChunksBackward max_unpool2x2_chunks_avx512_if_supported();

#if defined(CNNBP_AVX512_KERNELS)
void max_pool2x2_chunks_avx512(float* output, int64_t* indices, const float* input, int64_t H,
                               int64_t W, int64_t chunk_begin, int64_t chunk_end);
bool max_unpool2x2_chunks_avx512(float* dinput, const float* doutput, const int64_t* indices,
                                 int64_t H, int64_t W, int64_t chunk_begin, int64_t chunk_end);
void max_pool2x2_plane_avx512(float* output, int64_t* indices, const float* input, int64_t H,
                              int64_t W, int64_t P, int64_t Q);
bool max_unpool2x2_plane_avx512(float* dinput, const float* doutput, const int64_t* indices,
                                int64_t H, int64_t W, int64_t P, int64_t Q);
#endif

}  // namespace cnnbp::detail
