// Internal: batch_norm2d's loops over one channel's values, included by batch_norm2d.cpp
// (baseline instruction set) and by batch_norm2d_avx512.cpp (compiled with -mavx512f
// -ffp-contract=off: the same operations in the same order, so the same bits). Everything
// here has internal linkage and uses no standard-library templates, so that no function
// compiled for AVX-512 can be shared with, and picked by the linker for, the baseline code.
//
// A channel's values are N planes of HW contiguous values, `stride` (C * HW) apart. Sums are
// in double over 8 running lanes per plane (lane k takes i = k, k + 8, ...), added in a
// fixed order at the end of the plane, then plane by plane (n in order): independent chains
// that vectorize, and one order whatever the instruction set or thread count.
#pragma once

#include <cstdint>

namespace cnnbp::detail {

// The loops of one value type T, as function pointers: the baseline build and the AVX-512
// build (the latter only in builds that define CNNBP_AVX512_KERNELS, to be called only when
// avx512_kernels_enabled()).
template <typename T>
struct BatchNorm2dKernels {
    // sum(x)
    double (*sum)(const T* x, int64_t N, int64_t HW, int64_t stride);
    // sum((x - mean)^2)
    double (*sum_sq_dev)(const T* x, int64_t N, int64_t HW, int64_t stride, double mean);
    // y = (x - m) * scale + shift
    void (*affine)(T* y, const T* x, int64_t N, int64_t HW, int64_t stride, T m, T scale, T shift);
    // sums[0] = sum(dy), sums[1] = sum(dy * (x - mean))
    void (*sums_dy)(double* sums, const T* dy, const T* x, int64_t N, int64_t HW, int64_t stride,
                    double mean);
    // dx = dy * a
    void (*scale)(T* dx, const T* dy, int64_t N, int64_t HW, int64_t stride, T a);
    // dx = a * (dy - g - (x - m) * k)
    void (*dx_training)(T* dx, const T* dy, const T* x, int64_t N, int64_t HW, int64_t stride, T a,
                        T g, T m, T k);
};

BatchNorm2dKernels<float> batch_norm2d_kernels_f32_baseline();
BatchNorm2dKernels<double> batch_norm2d_kernels_f64_baseline();
BatchNorm2dKernels<float> batch_norm2d_kernels_f32_avx512();
BatchNorm2dKernels<double> batch_norm2d_kernels_f64_avx512();

namespace {

inline double add_lanes(const double* lane) {
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
           ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

#if defined(__GNUC__) && defined(__AVX512F__)
// With AVX-512 the 8 lanes are one vector of GCC's (and Clang's) vector extension:
// element-wise IEEE operations, so exactly the scalar lanes' arithmetic, written out because
// the compiler does not find the vectors itself in lanes kept in an array. The baseline keeps
// the scalar lanes (faster there than SSE2's pairs of doubles, after float-to-double
// conversions).
constexpr int kVecs = 1;
typedef double Vec __attribute__((vector_size(64)));
struct Lanes {
    Vec v[kVecs];
};
#define CNNBP_BN_LANES 1

inline __attribute__((always_inline)) void zero_lanes(Lanes& l) { l.v[0] = Vec{}; }
// p[0..8) as doubles
inline __attribute__((always_inline)) void load_lanes(Lanes& l, const float* p) {
    typedef float Floats8 __attribute__((vector_size(32)));
    Floats8 f;
    __builtin_memcpy(&f, p, sizeof f);
    l.v[0] = __builtin_convertvector(f, Vec);
}
inline __attribute__((always_inline)) void load_lanes(Lanes& l, const double* p) {
    __builtin_memcpy(&l, p, sizeof l);
}
inline __attribute__((always_inline)) void store_lanes(double* lane, const Lanes& l) {
    __builtin_memcpy(lane, &l, sizeof l);
}
#endif

// What a statistics pass adds up, per value: x; (x - mean)^2; dy and dy * (x - mean).
enum class Stat { sum, sq_dev, dy };

// The sums of P planes at once (independent chains: P times as many additions in flight),
// plane p's values at x + p * stride (and dy + p * stride): out[p][0] (and out[p][1], for
// Stat::dy) get plane p's sums, each over its 8 lanes.
template <Stat S, int P, typename T>
inline __attribute__((always_inline)) void plane_sums(double (*out)[2], const T* x, const T* dy,
                                                      int64_t HW, int64_t stride, double mean) {
    int64_t i = 0;
    double a[P][8], b[P][8];
    for (int p = 0; p < P; ++p)
        for (int k = 0; k < 8; ++k) a[p][k] = b[p][k] = 0;
#if defined(CNNBP_BN_LANES)
    Lanes acc_a[P], acc_b[P], u, v;
    for (int p = 0; p < P; ++p) zero_lanes(acc_a[p]), zero_lanes(acc_b[p]);
    for (; i + 8 <= HW; i += 8)
        for (int p = 0; p < P; ++p) {
            load_lanes(v, x + p * stride + i);
            if (S == Stat::dy) load_lanes(u, dy + p * stride + i);

            for (int j = 0; j < kVecs; ++j) {
                if (S == Stat::sum) acc_a[p].v[j] += v.v[j];
                if (S == Stat::sq_dev) {
                    const Vec d = v.v[j] - mean;
                    acc_a[p].v[j] += d * d;
                }
                if (S == Stat::dy) {
                    acc_a[p].v[j] += u.v[j];
                    acc_b[p].v[j] += u.v[j] * (v.v[j] - mean);
                }
            }
        }
    for (int p = 0; p < P; ++p) store_lanes(a[p], acc_a[p]), store_lanes(b[p], acc_b[p]);
#endif
    for (int p = 0; p < P; ++p) {
        const T *xp = x + p * stride, *dyp = dy + p * stride;
        int64_t t = i;
#if !defined(CNNBP_BN_LANES)
        for (; t + 8 <= HW; t += 8)
            for (int k = 0; k < 8; ++k) {
                if (S == Stat::sum) a[p][k] += double(xp[t + k]);
                if (S == Stat::sq_dev) {
                    const double d = double(xp[t + k]) - mean;
                    a[p][k] += d * d;
                }
                if (S == Stat::dy) {
                    const double g = double(dyp[t + k]);
                    a[p][k] += g;
                    b[p][k] += g * (double(xp[t + k]) - mean);
                }
            }
#endif
        for (int k = 0; t < HW; ++t, ++k) {
            if (S == Stat::sum) a[p][k] += double(xp[t]);
            if (S == Stat::sq_dev) {
                const double d = double(xp[t]) - mean;
                a[p][k] += d * d;
            }
            if (S == Stat::dy) {
                const double g = double(dyp[t]);
                a[p][k] += g;
                b[p][k] += g * (double(xp[t]) - mean);
            }
        }
        out[p][0] = add_lanes(a[p]);
        out[p][1] = add_lanes(b[p]);
    }
}

// The sums over the channel: the planes' sums added in plane order (n = 0, 1, ...).
template <Stat S, typename T>
void channel_sums(double* sums, const T* x, const T* dy, int64_t N, int64_t HW, int64_t stride,
                  double mean) {
#if defined(__AVX512F__)
    constexpr int P = 4;
#else
    constexpr int P = 2;
#endif
    double sum_a = 0, sum_b = 0, out[P][2];
    int64_t n = 0;
    for (; n + P <= N; n += P) {
        plane_sums<S, P>(out, x + n * stride, dy ? dy + n * stride : dy, HW, stride, mean);
        for (int p = 0; p < P; ++p) sum_a += out[p][0], sum_b += out[p][1];
    }
    for (; n < N; ++n) {
        plane_sums<S, 1>(out, x + n * stride, dy ? dy + n * stride : dy, HW, stride, mean);
        sum_a += out[0][0], sum_b += out[0][1];
    }
    sums[0] = sum_a;
    sums[1] = sum_b;
}

template <typename T>
double bn_sum(const T* x, int64_t N, int64_t HW, int64_t stride) {
    double sums[2];
    channel_sums<Stat::sum>(sums, x, static_cast<const T*>(nullptr), N, HW, stride, 0.0);
    return sums[0];
}

template <typename T>
double bn_sum_sq_dev(const T* x, int64_t N, int64_t HW, int64_t stride, double mean) {
    double sums[2];
    channel_sums<Stat::sq_dev>(sums, x, static_cast<const T*>(nullptr), N, HW, stride, mean);
    return sums[0];
}

template <typename T>
void bn_affine(T* y, const T* x, int64_t N, int64_t HW, int64_t stride, T m, T scale, T shift) {
    for (int64_t n = 0; n < N; ++n) {
        T* __restrict q = y + n * stride;
        const T* __restrict p = x + n * stride;
        for (int64_t i = 0; i < HW; ++i) q[i] = (p[i] - m) * scale + shift;
    }
}

template <typename T>
void bn_sums_dy(double* sums, const T* dy, const T* x, int64_t N, int64_t HW, int64_t stride,
                double mean) {
    channel_sums<Stat::dy>(sums, x, dy, N, HW, stride, mean);
}

template <typename T>
void bn_scale(T* dx, const T* dy, int64_t N, int64_t HW, int64_t stride, T a) {
    for (int64_t n = 0; n < N; ++n) {
        T* __restrict q = dx + n * stride;
        const T* __restrict d = dy + n * stride;
        for (int64_t i = 0; i < HW; ++i) q[i] = d[i] * a;
    }
}

template <typename T>
void bn_dx_training(T* dx, const T* dy, const T* x, int64_t N, int64_t HW, int64_t stride, T a, T g,
                    T m, T k) {
    for (int64_t n = 0; n < N; ++n) {
        T* __restrict q = dx + n * stride;
        const T* __restrict d = dy + n * stride;
        const T* __restrict p = x + n * stride;
        for (int64_t i = 0; i < HW; ++i) q[i] = a * (d[i] - g - (p[i] - m) * k);
    }
}

template <typename T>
BatchNorm2dKernels<T> bn_kernels() {
    return {bn_sum<T>,     bn_sum_sq_dev<T>, bn_affine<T>,
            bn_sums_dy<T>, bn_scale<T>,      bn_dx_training<T>};
}

}  // namespace
}  // namespace cnnbp::detail
