// Internal: the plane kernels of the 2x2 / stride 2 / no padding max-pool. Each handles one
// (H, W) plane with P = H / 2, Q = W / 2 output rows and columns (the forward writes its
// output rows out_stride apart: a ceil_mode pool has one more column of partial windows). The
// portable ones live in pool2d.cpp; the AVX-512 ones in pool2d_avx512.cpp, compiled with -mavx512f
// and called only when the running CPU has AVX-512F. Both have the general kernel's semantics bit
// for bit; they are declared here so that the C++ tests can hold them against each other.
#pragma once

#include <cstdint>

namespace cnnbp::detail {

// The kernels handle window offsets in 32 bits: callers pass only W < this.
constexpr int64_t kMaxSimdWidth = int64_t(1) << 30;

template <typename T>
void max_pool2x2_plane(T* output, int64_t* indices, const T* input, int64_t W, int64_t P, int64_t Q,
                       int64_t out_stride);
// dinput plane = doutput scattered to indices, written in one pass. Returns false, having
// written part of the plane, if some index lies outside its own 2x2 window: the caller then
// redoes the plane by zero-fill and scatter.
template <typename T>
bool max_unpool2x2_plane(T* dinput, const T* doutput, const int64_t* indices, int64_t H, int64_t W,
                         int64_t P, int64_t Q);

using Pool2x2Forward = void (*)(float* output, int64_t* indices, const float* input, int64_t W,
                                int64_t P, int64_t Q, int64_t out_stride);
using Pool2x2Backward = bool (*)(float* dinput, const float* doutput, const int64_t* indices,
                                 int64_t H, int64_t W, int64_t P, int64_t Q);
// The AVX-512 plane kernels, or null when this build lacks them or the CPU cannot run them.
Pool2x2Forward max_pool2x2_plane_avx512_if_supported();
Pool2x2Backward max_unpool2x2_plane_avx512_if_supported();

#if defined(CNNBP_AVX512_KERNELS)
void max_pool2x2_plane_avx512(float* output, int64_t* indices, const float* input, int64_t W,
                              int64_t P, int64_t Q, int64_t out_stride);
bool max_unpool2x2_plane_avx512(float* dinput, const float* doutput, const int64_t* indices,
                                int64_t H, int64_t W, int64_t P, int64_t Q);
#endif

}  // namespace cnnbp::detail
