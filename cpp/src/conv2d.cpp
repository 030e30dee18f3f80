// conv2d forward and backward.
// N batch, C in-channels, K out-channels, H/W input, P/Q output, R/S filter; CRS = C*R*S
// is the length of one filter, PQ = P*Q the pixels of one output plane.
//
// Per image the convolution is a matrix product with the im2col matrix of the image,
// col (CRS x PQ), col[(c,r,s), (p,q)] = input[c, p*sh-ph+r, q*sw-pw+s] (0 outside):
//   forward   output_n (K x PQ)   = weight (K x CRS) . col_n
//   dinput    dcol_n (CRS x PQ)   = weight^T . doutput_n (K x PQ), then col2im adds into dinput
//   dweight   dweight (K x CRS)  += doutput_n . col_n^T          (summed over the batch)
// col is never materialized whole. make_plan chooses the paths by shape, and sizes their
// scratch memory:
//   - tiny problems (fewer multiply-adds than packing costs): direct loops (forward_direct,
//     dinput_direct, dweight_direct);
//   - unit strides: each image is copied once into a zero-padded stack, and on the
//     padded-width output grid every row of col is a contiguous run of that stack, read in
//     place by the tap and gather micro-kernels (forward_padded, dweight_padded); dinput is
//     the forward convolution of the padded doutput with the flipped, transposed weight
//     (dinput_as_forward);
//   - other strides: the forward packs col blocks into the GEMM (forward_gemm), dinput runs
//     the GEMM into dcol blocks and adds them back (dinput_gemm_col2im), dweight takes the
//     dot-product kernel on blocks of col rows (dweight_gemm_dot).
// Threads split the batch (or fixed chunks of it for the dweight/dbias sums), so results do
// not depend on the thread count.
#include "cnnbp/conv2d.hpp"

#include <algorithm>
#include <optional>
#include <vector>

#include "gemm.hpp"
#include "parallel.hpp"

namespace cnnbp {

using detail::valid_range;

namespace {

// Below this many multiply-adds per image, packing costs more than it saves.
constexpr int64_t kMinGemmWork = 4096;
// dweight gathers this many pixels of im2col rows at a time (bounded workspace; long rows
// amortize the dot-product kernel's final horizontal sums). A multiple of kVectorPad.
constexpr int64_t kPixelBlock = 1024;
// Waking the second thread costs microseconds: split the batch only above this many
// multiply-adds (about 10 us of work).
constexpr int64_t kMinConvParallelWork = int64_t(1) << 20;
// Grid pixels per gather-kernel call: its B panel (kGatherBlock x NR) stays in L1.
constexpr int64_t kGatherBlock = 128;
// Rows handed to the dot-product kernel are padded to a multiple of the widest vector.
constexpr int64_t kVectorPad = 16;

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Whether the batch (or its chunks) is split among threads.
bool split_batch(const Conv2dDims& d) {
    return d.N * d.K * d.P * d.Q * d.C * d.R * d.S >= kMinConvParallelWork;
}

// Scratch memory of one path: `shared` values of T allocated once per call, `per_thread`
// values by each thread that runs it (at most `max_threads`: the images or the chunks of
// the batch split among threads), and `offsets` int64_t tap offsets.
struct Buffers {
    int64_t shared = 0, per_thread = 0, max_threads = 1, offsets = 0;

    template <typename T>
    int64_t bytes(int64_t threads) const {
        const int64_t workers = std::max<int64_t>(1, std::min(threads, max_threads));
        return int64_t(sizeof(T)) * (shared + workers * per_thread) +
               int64_t(sizeof(int64_t)) * offsets;
    }
};

Buffers no_buffers(const Conv2dDims&) { return {}; }  // the direct loops

// ---- direct loops (tiny problems) ----------------------------------------------------------

// The direct loops' walk over the filter taps: body(r, s, p_lo, p_hi, q_lo, q_hi, col) for
// every tap, where output rows [p_lo, p_hi) and columns [q_lo, q_hi) read inside the input,
// output (op, oq) reading input row op*sh-ph+r, column oq*sw+col.
template <typename Body>
void for_each_tap(const Conv2dDims& d, Body&& body) {
    const auto& p = d.params;
    for (int64_t r = 0; r < d.R; ++r) {
        int64_t p_lo, p_hi;
        valid_range(d.P, d.H, p.stride_h, p.pad_h, r, p_lo, p_hi);
        for (int64_t s = 0; s < d.S; ++s) {
            int64_t q_lo, q_hi;
            valid_range(d.Q, d.W, p.stride_w, p.pad_w, s, q_lo, q_hi);
            body(r, s, p_lo, p_hi, q_lo, q_hi, s - p.pad_w);
        }
    }
}

// output = bias + weight . col, one (n, k) plane at a time, by direct loops.
template <typename T>
void forward_direct(T* output, const T* input, const T* weight, const T* bias,
                    const Conv2dDims& d) {
    const auto& p = d.params;
    const int64_t PQ = d.P * d.Q, per_image = d.K * PQ * d.C * d.R * d.S;
    detail::parallel_for(d.N * d.K, d.N * per_image, [&](int64_t begin, int64_t end) {
        for (int64_t nk = begin; nk < end; ++nk) {
            const int64_t k = nk % d.K;
            const T* in_image = input + (nk / d.K) * d.C * d.H * d.W;
            T* out = output + nk * PQ;
            std::fill(out, out + PQ, bias ? bias[k] : T(0));
            for (int64_t c = 0; c < d.C; ++c) {
                const T* in = in_image + c * d.H * d.W;
                const T* wkc = weight + (k * d.C + c) * d.R * d.S;
                for_each_tap(d, [&](int64_t r, int64_t s, int64_t p_lo, int64_t p_hi, int64_t q_lo,
                                    int64_t q_hi, int64_t col) {
                    const T w = wkc[r * d.S + s];
                    for (int64_t op = p_lo; op < p_hi; ++op) {
                        const T* in_row = in + (op * p.stride_h - p.pad_h + r) * d.W;
                        T* out_row = out + op * d.Q;
                        for (int64_t oq = q_lo; oq < q_hi; ++oq)
                            out_row[oq] += w * in_row[oq * p.stride_w + col];
                    }
                });
            }
        }
    });
}

// Inverts `output_n = weight . col_n` by direct loops, one (n, c) plane at a time: every
// input cell gathers weight . doutput over the windows that read it.
template <typename T>
void dinput_direct(T* dinput, const T* doutput, const T* weight, const Conv2dDims& d) {
    const auto& p = d.params;
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W, per_image = d.K * PQ * d.C * d.R * d.S;
    detail::parallel_for(d.N * d.C, d.N * per_image, [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc) {
            const int64_t n = nc / d.C, c = nc % d.C;
            T* din = dinput + nc * HW;
            std::fill(din, din + HW, T(0));
            for (int64_t k = 0; k < d.K; ++k) {
                const T* dout = doutput + (n * d.K + k) * PQ;
                const T* wkc = weight + (k * d.C + c) * d.R * d.S;
                for_each_tap(d, [&](int64_t r, int64_t s, int64_t p_lo, int64_t p_hi, int64_t q_lo,
                                    int64_t q_hi, int64_t col) {
                    const T w = wkc[r * d.S + s];
                    for (int64_t op = p_lo; op < p_hi; ++op) {
                        T* din_row = din + (op * p.stride_h - p.pad_h + r) * d.W;
                        const T* dout_row = dout + op * d.Q;
                        for (int64_t oq = q_lo; oq < q_hi; ++oq)
                            din_row[oq * p.stride_w + col] += w * dout_row[oq];
                    }
                });
            }
        }
    });
}

// Sum of n values in a fixed order (8 interleaved partial sums), so it vectorizes.
template <typename T>
T sum_fixed_order(const T* v, int64_t n) {
    T lanes[8] = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += v[i + l];
    for (; i < n; ++i) lanes[i % 8] += v[i];
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
           ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Inverts `output_n = weight . col_n` for dweight and dbias by direct loops on the calling
// thread, summing over the batch in order: packing would cost more than the arithmetic.
//   dweight[k,c,r,s] = sum_{n,p,q} doutput[n,k,p,q] * input[n,c,p*sh-ph+r,q*sw-pw+s]
template <typename T>
void dweight_direct(T* dweight, T* dbias, const T* doutput, const T* input, const Conv2dDims& d) {
    const auto& p = d.params;
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W;
    if (dbias)
        for (int64_t k = 0; k < d.K; ++k) {
            T sum = 0;
            for (int64_t n = 0; n < d.N; ++n)
                sum += sum_fixed_order(doutput + (n * d.K + k) * PQ, PQ);
            dbias[k] = sum;
        }
    if (!dweight) return;
    for (int64_t kc = 0; kc < d.K * d.C; ++kc) {
        const int64_t k = kc / d.C, c = kc % d.C;
        for_each_tap(d, [&](int64_t r, int64_t s, int64_t p_lo, int64_t p_hi, int64_t q_lo,
                            int64_t q_hi, int64_t col) {
            T sum = 0;
            for (int64_t n = 0; n < d.N; ++n) {
                const T* plane = input + (n * d.C + c) * HW;
                const T* dout = doutput + (n * d.K + k) * PQ;
                for (int64_t op = p_lo; op < p_hi; ++op) {
                    const T* in_row = plane + (op * p.stride_h - p.pad_h + r) * d.W;
                    const T* dout_row = dout + op * d.Q;
                    for (int64_t oq = q_lo; oq < q_hi; ++oq)
                        sum += dout_row[oq] * in_row[oq * p.stride_w + col];
                }
            }
            dweight[(kc * d.R + r) * d.S + s] = sum;
        });
    }
}

// ---- im2col --------------------------------------------------------------------------------

// dst[t * stride] = col[(c,r,s), pixel_start + t] for t < count, where pixel (p,q) of the
// output reads input[c, p*sh-ph+r, q*sw-pw+s] (zero outside the plane). Runs along one
// output row at a time, so with unit strides the inside of each run is a plain copy.
template <typename T>
void im2col_tap(const T* image, const Conv2dDims& d, int64_t c, int64_t r, int64_t s,
                int64_t pixel_start, int64_t count, T* dst, int64_t stride) {
    const auto& prm = d.params;
    const T* plane = image + c * d.H * d.W;
    int64_t row_lo, row_hi;  // output columns that read inside an input row: same every row
    valid_range(d.Q, d.W, prm.stride_w, prm.pad_w, s, row_lo, row_hi);
    const int64_t col = s - prm.pad_w;  // input column of output column 0
    int64_t op = pixel_start / d.Q, oq = pixel_start % d.Q, t = 0;
    while (t < count) {
        const int64_t run = std::min(count - t, d.Q - oq);
        const int64_t ih = op * prm.stride_h - prm.pad_h + r;
        T* o = dst + t * stride;  // o[(q - oq) * stride] is output column q
        if (ih < 0 || ih >= d.H) {
            for (int64_t u = 0; u < run; ++u) o[u * stride] = T(0);
        } else {
            const int64_t lo = std::clamp(row_lo, oq, oq + run);
            const int64_t hi = std::clamp(row_hi, lo, oq + run);
            const T* row = plane + ih * d.W;
            for (int64_t q = oq; q < lo; ++q) o[(q - oq) * stride] = T(0);
            if (stride == 1 && prm.stride_w == 1) {
                // runs are one output row: too short for a memmove call to pay off
                const T* from = row + col;
                T* to = o - oq;
                for (int64_t q = lo; q < hi; ++q) to[q] = from[q];
            } else
                for (int64_t q = lo; q < hi; ++q)
                    o[(q - oq) * stride] = row[q * prm.stride_w + col];
            for (int64_t q = hi; q < oq + run; ++q) o[(q - oq) * stride] = T(0);
        }
        t += run;
        oq = 0;
        ++op;
    }
}

// pack_b for the forward: rows (c,r,s) in [k0, k0+kc), columns (p,q) in [j0, j0+nc) of the
// im2col matrix of one image, as NR-wide micro-panels.
template <typename T>
void pack_im2col(const T* image, const Conv2dDims& d, int NR, int64_t k0, int64_t kc, int64_t j0,
                 int64_t nc, T* dst) {
    for (int64_t jp = 0; jp * NR < nc; ++jp) {
        const int64_t n = std::min<int64_t>(NR, nc - jp * NR);
        int64_t c = k0 / (d.R * d.S), r = (k0 / d.S) % d.R, s = k0 % d.S;
        for (int64_t k = 0; k < kc; ++k) {
            T* out = dst + (jp * kc + k) * NR;
            im2col_tap(image, d, c, r, s, j0 + jp * NR, n, out, 1);
            std::fill(out + n, out + NR, T(0));
            if (++s == d.S) {
                s = 0;
                if (++r == d.R) r = 0, ++c;
            }
        }
    }
}

// col rows (c,r,s) with row stride ld receive the im2col columns [pixel_start,
// pixel_start + count) of one image.
template <typename T>
void im2col_block(const T* image, const Conv2dDims& d, int64_t pixel_start, int64_t count,
                  int64_t ld, T* col) {
    int64_t i = 0;
    for (int64_t c = 0; c < d.C; ++c)
        for (int64_t r = 0; r < d.R; ++r)
            for (int64_t s = 0; s < d.S; ++s, ++i)
                im2col_tap(image, d, c, r, s, pixel_start, count, col + i * ld, 1);
}

// dinput_image += col2im(dcol) for output columns [j0, j0 + nc): dcol is (CRS x nc).
template <typename T>
void col2im_add(T* dimage, const T* dcol, const Conv2dDims& d, int64_t j0, int64_t nc) {
    const auto& prm = d.params;
    const int64_t p_start = j0 / d.Q, q_start = j0 % d.Q;
    int64_t i = 0;
    for (int64_t c = 0; c < d.C; ++c)
        for (int64_t r = 0; r < d.R; ++r)
            for (int64_t s = 0; s < d.S; ++s, ++i) {
                T* plane = dimage + c * d.H * d.W;
                const T* src = dcol + i * nc;
                int64_t op = p_start, oq = q_start, jj = 0;
                while (jj < nc) {
                    const int64_t run = std::min(nc - jj, d.Q - oq);
                    const int64_t ih = op * prm.stride_h - prm.pad_h + r;
                    if (ih >= 0 && ih < d.H) {
                        int64_t q_lo, q_hi;
                        valid_range(d.Q, d.W, prm.stride_w, prm.pad_w, s, q_lo, q_hi);
                        q_lo = std::clamp(q_lo, oq, oq + run);
                        q_hi = std::clamp(q_hi, q_lo, oq + run);
                        T* row = plane + ih * d.W;
                        const int64_t col = s - prm.pad_w;  // input column of output column 0
                        const T* g = src + jj;              // g[q - oq] is column q
                        for (int64_t q = q_lo; q < q_hi; ++q)
                            row[q * prm.stride_w + col] += g[q - oq];
                    }
                    jj += run;
                    oq = 0;
                    ++op;
                }
            }
}

// ---- the padded-width grid (unit strides) --------------------------------------------------

// The planes of one image into the interior of a zero-bordered (C, H+2ph, W+2pw) stack
// (whose borders are already zero).
template <typename T>
void copy_into_padded(T* padded, const T* image, const Conv2dDims& d) {
    const auto& prm = d.params;
    const int64_t Hp = d.H + 2 * prm.pad_h, Wp = d.W + 2 * prm.pad_w;
    for (int64_t c = 0; c < d.C; ++c)
        for (int64_t h = 0; h < d.H; ++h)
            std::copy(image + (c * d.H + h) * d.W, image + (c * d.H + h + 1) * d.W,
                      padded + (c * Hp + h + prm.pad_h) * Wp + prm.pad_w);
}

// Offsets of the filter taps (c,r,s) in a padded (C, Hp, Wp) stack.
std::vector<int64_t> tap_offsets(const Conv2dDims& d, int64_t Hp, int64_t Wp) {
    std::vector<int64_t> offsets;
    for (int64_t c = 0; c < d.C; ++c)
        for (int64_t r = 0; r < d.R; ++r)
            for (int64_t s = 0; s < d.S; ++s) offsets.push_back(c * Hp * Wp + r * Wp + s);
    return offsets;
}

// The padded (C, Hp, Wp) stack of an image and the output grid on it: grid pixel
// o = p*Wp + q reads tap (c,r,s) at o + c*Hp*Wp + r*Wp + s; columns q >= Q are a margin.
// Grid pixels run up to grid_padded (the grid rounded up to whole tiles); reading every tap
// there, the last rows run past the planes by up to S-1 values plus the rounding, so the
// stack holds `stack` values, which must exist and be zero -- the grid's margin multiplies
// them by zero, and uninitialized memory could hold NaN.
struct PaddedGrid {
    int64_t Hp, Wp, grid, grid_padded, stack;
};

PaddedGrid padded_grid(const Conv2dDims& d, int64_t tile) {
    const int64_t Hp = d.H + 2 * d.params.pad_h, Wp = d.W + 2 * d.params.pad_w;
    const int64_t grid = d.P * Wp, grid_padded = round_up(grid, tile);
    const int64_t last_tap = (d.C - 1) * Hp * Wp + (d.R - 1) * Wp + (d.S - 1);
    return {Hp, Wp, grid, grid_padded, std::max(d.C * Hp * Wp, last_tap + grid_padded)};
}

// ---- forward -------------------------------------------------------------------------------

// output_n (K x PQ) = bias + weight (K x CRS) . col_n for every image, through the GEMM
// with im2col packing (any strides).
template <typename T>
void forward_gemm(T* output, const T* input, const T* weight, const T* bias, const Conv2dDims& d) {
    const int64_t CRS = d.C * d.R * d.S, PQ = d.P * d.Q;
    const auto& uk = detail::kernels_for_cpu<T>().gemm;
    detail::PackedA<T> packed_weight;  // weight (K x CRS), shared by every image
    packed_weight.pack(weight, CRS, 1, d.K, CRS, uk.MR);
    detail::parallel_for_if(split_batch(d), d.N, [&](int64_t n_begin, int64_t n_end) {
        detail::Scratch<T> b_buffer(detail::b_buffer_size(uk));
        for (int64_t n = n_begin; n < n_end; ++n) {
            const T* image = input + n * d.C * d.H * d.W;
            T* out = output + n * d.K * PQ;  // output_n (K x PQ)
            for (int64_t k = 0; k < d.K; ++k)
                std::fill(out + k * PQ, out + (k + 1) * PQ, bias ? bias[k] : T(0));
            auto pack = [&](int64_t k0, int64_t kc, int64_t j0, int64_t nc, T* dst) {
                pack_im2col(image, d, uk.NR, k0, kc, j0, nc, dst);
            };
            detail::gemm(uk, packed_weight, PQ, pack, out, PQ, /*accumulate=*/true,
                         b_buffer.data());
        }
    });
}

template <typename T>
Buffers forward_gemm_buffers(const Conv2dDims& d) {
    const auto& uk = detail::kernels_for_cpu<T>().gemm;
    return {detail::PackedA<T>::size(d.K, d.C * d.R * d.S, uk.MR), detail::b_buffer_size(uk), d.N};
}

// out (K, P, Q) = bias + the output grid (K, grid_padded) without its margin columns.
template <typename T>
void crop_grid(T* __restrict out, const T* __restrict grid_out, const T* bias, const Conv2dDims& d,
               int64_t grid_padded, int64_t Wp) {
    for (int64_t k = 0; k < d.K; ++k) {
        const T b = bias ? bias[k] : T(0);
        for (int64_t op = 0; op < d.P; ++op) {
            const T* from = grid_out + k * grid_padded + op * Wp;
            T* to = out + (k * d.P + op) * d.Q;
            for (int64_t oq = 0; oq < d.Q; ++oq) to[oq] = b + from[oq];
        }
    }
}

// output = bias + weight . col for unit strides, without im2col: each image is copied once
// into its padded stack, whose taps the tap kernel reads in place along the grid (one B row
// of the GEMM per tap); the grid's margin columns are computed, then dropped.
template <typename T>
void forward_padded(T* output, const T* input, const T* weight, const T* bias,
                    const Conv2dDims& d) {
    const int64_t CRS = d.C * d.R * d.S, PQ = d.P * d.Q;
    const auto& uk = detail::kernels_for_cpu<T>().tap_for(d.K);
    const PaddedGrid g = padded_grid(d, uk.NR);
    detail::PackedA<T> packed_weight;  // weight (K x CRS), shared by every image
    packed_weight.pack(weight, CRS, 1, d.K, CRS, uk.MR);
    const std::vector<int64_t> tap_offset = tap_offsets(d, g.Hp, g.Wp);
    const int64_t panels = (d.K + uk.MR - 1) / uk.MR;
    detail::parallel_for_if(split_batch(d), d.N, [&](int64_t n_begin, int64_t n_end) {
        detail::Scratch<T> padded(g.stack);                       // (C, Hp, Wp) + slack
        detail::Scratch<T> grid_out(d.K * g.grid_padded);         // (K, grid_padded)
        std::fill(padded.data(), padded.data() + g.stack, T(0));  // borders stay zero
        for (int64_t n = n_begin; n < n_end; ++n) {
            copy_into_padded(padded.data(), input + n * d.C * d.H * d.W, d);
            for (int64_t o0 = 0; o0 < g.grid; o0 += uk.NR) {
                const int nvalid = int(std::min<int64_t>(uk.NR, g.grid - o0));
                for (int64_t ip = 0; ip < panels; ++ip) {
                    const int m = int(std::min<int64_t>(uk.MR, d.K - ip * uk.MR));
                    T* c_tile = grid_out.data() + ip * uk.MR * g.grid_padded + o0;
                    for (int64_t k0 = 0; k0 < CRS; k0 += packed_weight.kc) {
                        const int64_t kb = std::min(packed_weight.kc, CRS - k0);
                        uk.run(kb, packed_weight.panel(ip, k0, kb), tap_offset.data() + k0,
                               padded.data() + o0, c_tile, g.grid_padded, k0 > 0, m, nvalid);
                    }
                }
            }
            crop_grid(output + n * d.K * PQ, grid_out.data(), bias, d, g.grid_padded, g.Wp);
        }
    });
}

template <typename T>
Buffers forward_padded_buffers(const Conv2dDims& d) {
    const auto& uk = detail::kernels_for_cpu<T>().tap_for(d.K);
    const PaddedGrid g = padded_grid(d, uk.NR);
    const int64_t CRS = d.C * d.R * d.S;
    return {detail::PackedA<T>::size(d.K, CRS, uk.MR), g.stack + d.K * g.grid_padded, d.N, CRS};
}

// ---- dinput --------------------------------------------------------------------------------

// With unit strides, dinput is itself a convolution: doutput (N, K, P, Q) padded by R-1-ph
// rows and S-1-pw columns, correlated with the weight flipped in r, s and transposed in
// (k, c), gives dinput (N, C, H, W). These are its dims.
Conv2dDims as_forward_dims(const Conv2dDims& d) {
    const auto& p = d.params;
    return {d.N, d.K, d.P, d.Q, d.C,
            d.R, d.S, d.H, d.W, Conv2dParams{1, 1, d.R - 1 - p.pad_h, d.S - 1 - p.pad_w}};
}

// Inverts `output_n = weight . col_n` for unit strides as the forward convolution of
// as_forward_dims, through forward_padded: doutput is read in place.
template <typename T>
void dinput_as_forward(T* dinput, const T* doutput, const T* weight, const Conv2dDims& d) {
    std::vector<T> flipped(size_t(d.C * d.K * d.R * d.S));  // (C, K, R, S)
    for (int64_t k = 0; k < d.K; ++k)
        for (int64_t c = 0; c < d.C; ++c)
            for (int64_t r = 0; r < d.R; ++r)
                for (int64_t s = 0; s < d.S; ++s)
                    flipped[((c * d.K + k) * d.R + r) * d.S + s] =
                        weight[((k * d.C + c) * d.R + (d.R - 1 - r)) * d.S + (d.S - 1 - s)];
    forward_padded(dinput, doutput, flipped.data(), static_cast<const T*>(nullptr),
                   as_forward_dims(d));
}

template <typename T>
Buffers dinput_as_forward_buffers(const Conv2dDims& d) {
    Buffers b = forward_padded_buffers<T>(as_forward_dims(d));
    b.shared += d.K * d.C * d.R * d.S;  // the flipped weight
    return b;
}

// Inverts `output_n = weight . col_n` for any strides: dcol_n = weight^T . doutput_n by the
// GEMM, a block of columns at a time, and every input cell gathers the dcol entries of the
// windows that read it (col2im).
template <typename T>
void dinput_gemm_col2im(T* dinput, const T* doutput, const T* weight, const Conv2dDims& d) {
    const int64_t CRS = d.C * d.R * d.S, PQ = d.P * d.Q, HW = d.H * d.W;
    const auto& uk = detail::kernels_for_cpu<T>().gemm;
    detail::PackedA<T> packed_weight_t;  // weight^T (CRS x K): row (c,r,s) reads column i
    packed_weight_t.pack(weight, 1, CRS, CRS, d.K, uk.MR);
    detail::parallel_for_if(split_batch(d), d.N, [&](int64_t n_begin, int64_t n_end) {
        detail::Scratch<T> b_buffer(detail::b_buffer_size(uk));
        detail::Scratch<T> dcol(CRS * std::min(detail::kNC, PQ));  // a column block of dcol_n
        for (int64_t n = n_begin; n < n_end; ++n) {
            T* dimage = dinput + n * d.C * HW;
            std::fill(dimage, dimage + d.C * HW, T(0));
            const T* dout = doutput + n * d.K * PQ;  // doutput_n (K x PQ)
            for (int64_t j0 = 0; j0 < PQ; j0 += detail::kNC) {
                const int64_t nc = std::min(detail::kNC, PQ - j0);
                auto pack = [&](int64_t k0, int64_t kc, int64_t jj0, int64_t ncc, T* dst) {
                    detail::pack_b_rows(dout + j0, PQ, uk.NR, k0, kc, jj0, ncc, dst);
                };
                detail::gemm(uk, packed_weight_t, nc, pack, dcol.data(), nc, false,
                             b_buffer.data());
                col2im_add(dimage, dcol.data(), d, j0, nc);
            }
        }
    });
}

template <typename T>
Buffers dinput_gemm_col2im_buffers(const Conv2dDims& d) {
    const auto& uk = detail::kernels_for_cpu<T>().gemm;
    const int64_t CRS = d.C * d.R * d.S;
    return {detail::PackedA<T>::size(CRS, d.K, uk.MR),
            detail::b_buffer_size(uk) + CRS * std::min(detail::kNC, d.P * d.Q), d.N};
}

// ---- dweight and dbias ---------------------------------------------------------------------

// The batch is split into a fixed number of chunks for the dweight/dbias reduction, so
// the order of the sums depends on N only, never on the number of threads.
int64_t reduction_chunks(int64_t N) { return std::min<int64_t>(N, 8); }

// out (rows x cols) = the sum of `chunks` partials in chunk order, stored chunk after chunk,
// each (rows x cols) or, when `transposed`, (cols x rows).
template <typename T>
void add_partials(T* out, const T* partials, int64_t chunks, int64_t rows, int64_t cols,
                  bool transposed) {
    const int64_t size = rows * cols;
    if (!transposed) {
        std::copy(partials, partials + size, out);
        for (int64_t chunk = 1; chunk < chunks; ++chunk)
            for (int64_t i = 0; i < size; ++i) out[i] += partials[chunk * size + i];
        return;
    }
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
            T sum = partials[c * rows + r];
            for (int64_t chunk = 1; chunk < chunks; ++chunk)
                sum += partials[chunk * size + c * rows + r];
            out[r * cols + c] = sum;
        }
}

// dweight and dbias as sums over reduction_chunks(N) chunks of the batch: each chunk sums
// into partials of its own, then the partials add up in chunk order. dbias sums doutput's
// planes; for dweight every thread makes one worker (make_worker()) and calls
// add(dw, n, last) for each image n of its chunks, dw the chunk's partial, (K, CRS) or
// (CRS, K) when `transposed`, and last true for a chunk's last image.
template <typename T, typename MakeWorker>
void sum_over_chunks(T* dweight, T* dbias, const T* doutput, const Conv2dDims& d, bool transposed,
                     const MakeWorker& make_worker) {
    const int64_t CRS = d.C * d.R * d.S, KCRS = d.K * CRS, PQ = d.P * d.Q;
    const int64_t chunks = reduction_chunks(d.N);
    std::vector<T> partial_w(size_t(dweight ? chunks * KCRS : 0));
    std::vector<T> partial_b(size_t(chunks * d.K));
    detail::parallel_for_if(split_batch(d), chunks, [&](int64_t chunk_begin, int64_t chunk_end) {
        std::optional<decltype(make_worker())> add;
        if (dweight) add.emplace(make_worker());
        for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
            const int64_t n_begin = d.N * chunk / chunks, n_end = d.N * (chunk + 1) / chunks;
            T* dw = dweight ? partial_w.data() + chunk * KCRS : nullptr;
            T* db = partial_b.data() + chunk * d.K;
            std::fill(db, db + d.K, T(0));
            if (dw) std::fill(dw, dw + KCRS, T(0));
            for (int64_t n = n_begin; n < n_end; ++n) {
                const T* dout = doutput + n * d.K * PQ;  // doutput_n (K x PQ)
                for (int64_t k = 0; k < d.K; ++k) db[k] += sum_fixed_order(dout + k * PQ, PQ);
                if (dw) (*add)(dw, n, n + 1 == n_end);
            }
        }
    });
    if (dweight) add_partials(dweight, partial_w.data(), chunks, d.K, CRS, transposed);
    if (dbias) add_partials(dbias, partial_b.data(), chunks, 1, d.K, false);
}

// The partial sums of sum_over_chunks, with `per_thread` values of each worker's buffers.
Buffers chunk_buffers(const Conv2dDims& d, int64_t per_thread, int64_t offsets) {
    const int64_t chunks = reduction_chunks(d.N);
    return {chunks * d.K * (d.C * d.R * d.S + 1), per_thread, chunks, offsets};
}

// doutput_n^T on the padded-width grid for the gather kernel: panel jp holds filters
// [jp*NR, jp*NR + NR) as (grid, NR), zero for filters past K and on the grid's margin.
template <typename T>
void pack_doutput_panels(T* panels_out, const T* dout, const Conv2dDims& d, const PaddedGrid& g,
                         int NR) {
    const int64_t PQ = d.P * d.Q, panels = (d.K + NR - 1) / NR;
    for (int64_t jp = 0; jp < panels; ++jp) {
        const int64_t n = std::min<int64_t>(NR, d.K - jp * NR);
        T* panel = panels_out + jp * g.grid * NR;
        const T* from_k = dout + jp * NR * PQ;
        for (int64_t op = 0; op < d.P; ++op) {
            T* row = panel + op * g.Wp * NR;
            // 16 pixels of each filter at a time: doutput rows lie PQ apart (often 4 KiB, one
            // cache set), so each line is read once, whole
            for (int64_t q0 = 0; q0 < d.Q; q0 += 16) {
                const int64_t count = std::min<int64_t>(16, d.Q - q0);
                for (int64_t jj = 0; jj < n; ++jj) {
                    const T* from = from_k + jj * PQ + op * d.Q + q0;
                    T* to = row + q0 * NR + jj;
                    for (int64_t t = 0; t < count; ++t) to[t * NR] = from[t];
                }
            }
            if (n < NR)
                for (int64_t oq = 0; oq < d.Q; ++oq)
                    std::fill(row + oq * NR + n, row + (oq + 1) * NR, T(0));
            std::fill(row + d.Q * NR, row + g.Wp * NR, T(0));  // grid margin
        }
    }
}

// Inverts `output_n = weight . col_n` for dweight and dbias with unit strides, without
// im2col, on the padded-width grid of forward_padded:
//   dweight^T[(c,r,s), k] = sum_n sum_o padded_n[tap(c,r,s) + o] * doutput_n[k, o]
// (o runs over grid pixels; the grid's margin columns carry a zero doutput). The image
// taps are read in place by the gather kernel; doutput_n^T is packed into NR-wide panels.
template <typename T>
void dweight_padded(T* dweight, T* dbias, const T* doutput, const T* input, const Conv2dDims& d) {
    const int64_t CRS = d.C * d.R * d.S, PQ = d.P * d.Q;
    const auto& gk = detail::kernels_for_cpu<T>().gather_for(d.K);
    const PaddedGrid g = padded_grid(d, 1);
    const int64_t panels = (d.K + gk.NR - 1) / gk.NR;  // NR-wide panels of filters
    const std::vector<int64_t> tap_offset = tap_offsets(d, g.Hp, g.Wp);
    sum_over_chunks(dweight, dbias, doutput, d, /*transposed=*/true, [&] {
        detail::Scratch<T> padded(g.stack);  // (C, Hp, Wp) + overrun, borders zero
        std::fill(padded.data(), padded.data() + g.stack, T(0));
        return [&, padded = std::move(padded),
                dout_panels = detail::Scratch<T>(panels * g.grid * gk.NR)](T* dwt, int64_t n,
                                                                           bool) mutable {
            copy_into_padded(padded.data(), input + n * d.C * d.H * d.W, d);
            pack_doutput_panels(dout_panels.data(), doutput + n * d.K * PQ, d, g, gk.NR);
            for (int64_t o0 = 0; o0 < g.grid; o0 += kGatherBlock) {
                const int64_t kb = std::min(kGatherBlock, g.grid - o0);
                for (int64_t jp = 0; jp < panels; ++jp) {
                    const int nk = int(std::min<int64_t>(gk.NR, d.K - jp * gk.NR));
                    const T* b = dout_panels.data() + (jp * g.grid + o0) * gk.NR;
                    for (int64_t i0 = 0; i0 < CRS; i0 += gk.MR)
                        gk.run(kb, padded.data() + o0, tap_offset.data() + i0, b,
                               dwt + i0 * d.K + jp * gk.NR, d.K, true,
                               int(std::min<int64_t>(gk.MR, CRS - i0)), nk);
                }
            }
        };
    });
}

template <typename T>
Buffers dweight_padded_buffers(const Conv2dDims& d) {
    const auto& gk = detail::kernels_for_cpu<T>().gather_for(d.K);
    const PaddedGrid g = padded_grid(d, 1);
    const int64_t panels = (d.K + gk.NR - 1) / gk.NR;
    return chunk_buffers(d, g.stack + panels * g.grid * gk.NR, d.C * d.R * d.S);
}

// Row stride of dweight_gemm_dot's pixel blocks: a whole chunk's pixels when they are fewer
// than kPixelBlock, padded to whole vectors.
int64_t pixel_block(const Conv2dDims& d) {
    const int64_t chunks = reduction_chunks(d.N);
    const int64_t chunk_pixels = (d.N + chunks - 1) / chunks * d.P * d.Q;
    return std::min(kPixelBlock, round_up(chunk_pixels, kVectorPad));
}

// Inverts `output_n = weight . col_n` for dweight and dbias, any strides:
// dweight = sum_n doutput_n . col_n^T. Pixels of a chunk's images are gathered into blocks
// (doutput rows and im2col rows, side by side), and each block adds its
// doutput_block . col_block^T with the dot-product kernel: both run along the pixels.
template <typename T>
void dweight_gemm_dot(T* dweight, T* dbias, const T* doutput, const T* input, const Conv2dDims& d) {
    const int64_t CRS = d.C * d.R * d.S, PQ = d.P * d.Q, ld = pixel_block(d);
    const auto& dk = detail::kernels_for_cpu<T>().dot;
    sum_over_chunks(dweight, dbias, doutput, d, /*transposed=*/false, [&] {
        return [&, col = detail::Scratch<T>(CRS * ld),      // col_block (CRS x ld)
                dout_block = detail::Scratch<T>(d.K * ld),  // doutput_block (K x ld)
                filled = int64_t(0)](T* dw, int64_t n, bool last) mutable {
            auto flush = [&] {  // rows padded with zeros to whole vectors: no scalar tail
                const int64_t len = round_up(filled, kVectorPad);
                for (int64_t i = 0; i < CRS; ++i)
                    std::fill(col.data() + i * ld + filled, col.data() + i * ld + len, T(0));
                for (int64_t k = 0; k < d.K; ++k)
                    std::fill(dout_block.data() + k * ld + filled, dout_block.data() + k * ld + len,
                              T(0));
                detail::gemm_dot(dk, d.K, CRS, len, dout_block.data(), ld, col.data(), ld, dw, CRS);
                filled = 0;
            };
            const T* image = input + n * d.C * d.H * d.W;
            const T* dout = doutput + n * d.K * PQ;  // doutput_n (K x PQ)
            for (int64_t p0 = 0; p0 < PQ;) {
                const int64_t count = std::min(PQ - p0, ld - filled);
                im2col_block(image, d, p0, count, ld, col.data() + filled);
                for (int64_t k = 0; k < d.K; ++k)
                    std::copy(dout + k * PQ + p0, dout + k * PQ + p0 + count,
                              dout_block.data() + k * ld + filled);
                filled += count;
                p0 += count;
                if (filled == ld) flush();
            }
            if (last && filled) flush();
        };
    });
}

Buffers dweight_gemm_dot_buffers(const Conv2dDims& d) {
    return chunk_buffers(d, (d.C * d.R * d.S + d.K) * pixel_block(d), 0);
}

// ---- the plan ------------------------------------------------------------------------------

// One path: the function that runs it and the sizes of its scratch memory for given dims.
template <typename Run>
struct Path {
    Run* run;
    Buffers (*buffers)(const Conv2dDims& d);
};

// The paths of one convolution: forward, dinput, and dweight with dbias.
template <typename T>
struct Conv2dPlan {
    Path<void(T* output, const T* input, const T* weight, const T* bias, const Conv2dDims& d)>
        forward;
    Path<void(T* dinput, const T* doutput, const T* weight, const Conv2dDims& d)> dinput;
    Path<void(T* dweight, T* dbias, const T* doutput, const T* input, const Conv2dDims& d)> dweight;
};

// The one place that chooses the paths, by the dims alone (the thread count changes only
// how many threads' buffers are allocated, Buffers::bytes).
template <typename T>
Conv2dPlan<T> make_plan(const Conv2dDims& d) {
    using Plan = Conv2dPlan<T>;
    if (d.K * d.P * d.Q * d.C * d.R * d.S < kMinGemmWork)  // tiny: direct loops
        return {{forward_direct<T>, no_buffers},
                {dinput_direct<T>, no_buffers},
                {dweight_direct<T>, no_buffers}};
    Plan plan;
    const auto& p = d.params;
    const bool unit = p.stride_h == 1 && p.stride_w == 1;
    plan.forward = unit ? decltype(Plan::forward){forward_padded<T>, forward_padded_buffers<T>}
                        : decltype(Plan::forward){forward_gemm<T>, forward_gemm_buffers<T>};
    // dinput as a forward needs padding below the kernel size. It reads doutput in place
    // instead of adding C*R*S rows back through col2im: faster for every channel count
    // measured (1 to 64).
    plan.dinput =
        unit && p.pad_h < d.R && p.pad_w < d.S
            ? decltype(Plan::dinput){dinput_as_forward<T>, dinput_as_forward_buffers<T>}
            : decltype(Plan::dinput){dinput_gemm_col2im<T>, dinput_gemm_col2im_buffers<T>};
    // dweight in place: below the narrowest gather panel of filters the dot-product path is
    // faster (measured), and it serves every strided convolution.
    plan.dweight = unit && d.K > detail::kernels_for_cpu<T>().gather[2].NR
                       ? decltype(Plan::dweight){dweight_padded<T>, dweight_padded_buffers<T>}
                       : decltype(Plan::dweight){dweight_gemm_dot<T>, dweight_gemm_dot_buffers};
    return plan;
}

}  // namespace

template <typename T>
void conv2d_forward(T* output, const T* input, const T* weight, const T* bias,
                    const Conv2dDims& d) {
    make_plan<T>(d).forward.run(output, input, weight, bias, d);
}

template <typename T>
void conv2d_backward(T* dinput, T* dweight, T* dbias, const T* doutput, const T* input,
                     const T* weight, const Conv2dDims& d) {
    const Conv2dPlan<T> plan = make_plan<T>(d);
    if (dinput) plan.dinput.run(dinput, doutput, weight, d);
    if (dweight || dbias) plan.dweight.run(dweight, dbias, doutput, input, d);
}

template <typename T>
int64_t conv2d_workspace_bytes(const Conv2dDims& d, int64_t threads) {
    const Conv2dPlan<T> plan = make_plan<T>(d);
    return std::max({plan.forward.buffers(d).template bytes<T>(threads),
                     plan.dinput.buffers(d).template bytes<T>(threads),
                     plan.dweight.buffers(d).template bytes<T>(threads)});
}

#define CNNBP_INSTANTIATE(T)                                                              \
    template void conv2d_forward<T>(T*, const T*, const T*, const T*, const Conv2dDims&); \
    template int64_t conv2d_workspace_bytes<T>(const Conv2dDims&, int64_t);               \
    template void conv2d_backward<T>(T*, T*, T*, const T*, const T*, const T*, const Conv2dDims&);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
