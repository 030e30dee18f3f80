// The kernels' thread pool (src/thread_pool.cpp) through parallel.hpp's loops: every index
// run once for any thread count, exceptions from any part reach the caller, loops inside a
// part, two callers at once, the team barrier, with and without a call under way (Busy).
#include <atomic>
#include <memory>
#include <new>
#include <stdexcept>
#include <thread>
#include <vector>

#include "../src/parallel.hpp"
#include "check.hpp"
#include "cnnbp/cnnbp.hpp"

using namespace cnnbp;

namespace {

// Restores the thread count a test changed.
struct ThreadCount {
    int64_t saved = get_num_threads();
    ~ThreadCount() { set_num_threads(saved); }
};

// How often each index of [0, count) was handed to the body.
std::vector<int> visits(int64_t count) {
    std::vector<std::atomic<int>> seen(static_cast<size_t>(count));
    detail::parallel_for_if(true, count, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) seen[size_t(i)].fetch_add(1);
    });
    std::vector<int> out;
    for (auto& s : seen) out.push_back(s.load());
    return out;
}

}  // namespace

TEST_CASE("thread pool: every index once, for any count and thread count") {
    ThreadCount restore;
    for (int64_t threads : {1, 2, 3, 4, 7}) {
        set_num_threads(threads);
        for (int64_t count : {0, 1, 2, 3, 5, 8, 64, 1000})
            for (int round = 0; round < 3; ++round)
                CHECK(visits(count) == std::vector<int>(size_t(count), 1));
    }
}

TEST_CASE("thread pool: an exception from any part reaches the caller, and the pool goes on") {
    ThreadCount restore;
    set_num_threads(3);
    for (int64_t failing : {0, 1, 2}) {  // the caller's part, then the pool threads'
        bool caught = false;
        try {
            detail::parallel_for_if(true, 3, [&](int64_t begin, int64_t) {
                if (begin == failing) throw std::bad_alloc();
            });
        } catch (const std::bad_alloc&) {
            caught = true;
        }
        CHECK(caught);
        CHECK(visits(100) == std::vector<int>(100, 1));
    }
}

TEST_CASE("thread pool: a loop inside a part runs on that part's thread") {
    ThreadCount restore;
    set_num_threads(2);
    std::vector<std::atomic<int>> seen(64 * 10);
    detail::parallel_for_if(true, 64, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
            detail::parallel_for_if(true, 10, [&](int64_t b, int64_t e) {
                for (int64_t j = b; j < e; ++j) seen[size_t(i * 10 + j)].fetch_add(1);
            });
    });
    bool once = true;
    for (auto& s : seen) once = once && s.load() == 1;
    CHECK(once);
}

TEST_CASE("thread pool: two callers at once each get every index once") {
    ThreadCount restore;
    std::atomic<int> wrong{0};
    auto caller = [&] {
        set_num_threads(2);  // a setting of the calling thread
        for (int round = 0; round < 300; ++round)
            if (visits(257) != std::vector<int>(257, 1)) wrong.fetch_add(1);
    };
    std::thread a(caller), b(caller);
    a.join();
    b.join();
    CHECK(wrong.load() == 0);
}

TEST_CASE("thread pool: the team barrier, with and without a call under way") {
    ThreadCount restore;
    for (bool busy : {false, true}) {
        std::unique_ptr<detail::Busy> guard;
        if (busy) guard = std::make_unique<detail::Busy>();
        for (int64_t threads : {2, 3}) {
            set_num_threads(threads);
            for (int round = 0; round < 50; ++round) {
                std::vector<int64_t> written(size_t(threads), -1), read(size_t(threads), -1);
                detail::parallel_team(true, [&](const detail::Team& team) {
                    written[size_t(team.thread)] = round * 10 + team.thread;
                    team.barrier();  // every thread's write is seen after it
                    read[size_t(team.thread)] = written[size_t((team.thread + 1) % team.threads)];
                    team.barrier();
                });
                for (int64_t t = 0; t < threads; ++t)
                    CHECK(read[size_t(t)] == round * 10 + (t + 1) % threads);
            }
        }
    }
}
