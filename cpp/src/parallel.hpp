// Internal: OpenMP loops that compile to plain loops without OpenMP. Work below
// kMinParallelWork multiply-adds stays on the calling thread: for tiny layers, waking a
// thread team costs more than the work. Every parallel loop gives each output element to
// exactly one thread, so results do not depend on the number of threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace cnnbp::detail {

constexpr int64_t kMinParallelWork = int64_t(1) << 16;

// body(begin, end) over [0, count) split into one contiguous chunk per thread (as
// schedule(static)) when `parallel` (parallel_for: when work >= kMinParallelWork), else
// body(0, count) on the calling thread
// without entering a parallel region: `omp parallel if (false)` still makes libgomp set up
// and tear down a team of one, about 0.4 us, more than a tiny layer's whole kernel.
template <typename Body>
inline void parallel_for_if(bool parallel, int64_t count, const Body& body) {
#ifdef _OPENMP
    if (parallel && count > 1 && omp_get_max_threads() > 1) {
        // An exception must not leave an OpenMP region (that terminates the process): the
        // first one thrown (std::bad_alloc of a workspace) is rethrown after the region.
        std::exception_ptr error;
#pragma omp parallel
        {
            const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
            const int64_t begin = count * t / threads, end = count * (t + 1) / threads;
            try {
                if (begin < end) body(begin, end);
            } catch (...) {
#pragma omp critical(cnnbp_parallel_error)
                if (!error) error = std::current_exception();
            }
        }
        if (error) std::rethrow_exception(error);
        return;
    }
#else
    (void)parallel;
#endif
    if (count > 0) body(int64_t(0), count);
}

template <typename Body>
inline void parallel_for(int64_t count, int64_t work, const Body& body) {
    parallel_for_if(work >= kMinParallelWork, count, body);
}

// The number of threads a parallel region starts (1 without OpenMP).
inline int64_t max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Items [0, count) handed out `grain` at a time to whichever thread of a parallel_team asks
// first (take(body) calls body(begin, end) until none are left): on a shared machine a
// thread that wakes late or is preempted takes fewer, instead of holding up the others. Which
// thread computes an item must never change how it is computed.
class WorkQueue {
 public:
    WorkQueue(int64_t count, int64_t grain) : count_(count), grain_(std::max<int64_t>(grain, 1)) {}

    template <typename Body>
    void take(const Body& body) {
        for (;;) {
            const int64_t begin = next_.fetch_add(grain_, std::memory_order_relaxed);
            if (begin >= count_) return;
            body(begin, std::min(begin + grain_, count_));
        }
    }

 private:
    std::atomic<int64_t> next_{0};
    const int64_t count_, grain_;
};

// The grain of a WorkQueue of `count` items of `item_work` multiply-adds each: takes of
// about kMinParallelWork * 4 multiply-adds (a few microseconds, so the queue's atomic is
// rare), and at least 4 takes per thread to balance.
inline int64_t queue_grain(int64_t count, int64_t item_work, int64_t threads) {
    const int64_t by_work =
        (kMinParallelWork * 4 + item_work - 1) / std::max<int64_t>(item_work, 1);
    return std::max<int64_t>(1, std::min(by_work, count / (4 * threads)));
}

// One thread of a parallel_team region: barrier() waits for every thread of the team.
struct Team {
    int64_t thread, threads;

    void barrier() const {
#ifdef _OPENMP
        if (threads > 1) {
#pragma omp barrier
        }
#endif
    }
};

// body(team) on every thread of one parallel region when `parallel` (else on the calling
// thread alone, a team of one): several steps separated by team.barrier() for the price of
// one wake-up of the threads. body must not throw -- a thread that left early would leave
// the others at the barrier -- so its memory is allocated before the region.
template <typename Body>
inline void parallel_team(bool parallel, const Body& body) noexcept {
#ifdef _OPENMP
    if (parallel && omp_get_max_threads() > 1) {
#pragma omp parallel
        body(Team{omp_get_thread_num(), omp_get_num_threads()});
        return;
    }
#else
    (void)parallel;
#endif
    body(Team{0, 1});
}

// Range of output positions o in [0, out_count) whose input position
// o * stride - pad + offset lies inside [0, in_size): returns [lo, hi) (empty if lo >= hi).
inline void valid_range(int64_t out_count, int64_t in_size, int64_t stride, int64_t pad,
                        int64_t offset, int64_t& lo, int64_t& hi) {
    const int64_t first = pad - offset;               // o * stride >= first
    lo = first <= 0 ? 0 : (first - 1) / stride + 1;   // ceil, no overflow for any stride
    const int64_t last = in_size - 1 + pad - offset;  // o * stride <= last
    hi = last < 0 ? 0 : last / stride + 1;
    if (hi > out_count) hi = out_count;
    if (lo > hi) lo = hi;
}

}  // namespace cnnbp::detail
