// A minimal test harness: TEST_CASE registers a function, CHECK_* record failures; and the
// helpers the property files share (finite differences, guarded outputs, bit equality,
// thread counts, the pooling shapes).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <optional>
#include <random>
#include <string>
#include <typeinfo>
#include <vector>

#include "cnnbp/shapes.hpp"
#include "cnnbp/threads.hpp"

namespace cnnbp_test {

struct Case {
    std::string name;
    std::function<void()> body;
};
std::vector<Case>& registry();
int& failures();

struct Register {
    Register(const char* name, std::function<void()> body) { registry().push_back({name, body}); }
};

inline void fail(const char* file, int line, const std::string& what) {
    ++failures();
    std::cerr << file << ":" << line << ": " << what << "\n";
}

// |got - expected| <= atol + rtol * |expected| elementwise
template <typename T>
void check_close(const char* file, int line, const T* got, const std::vector<double>& expected,
                 double atol, double rtol) {
    for (size_t i = 0; i < expected.size(); ++i) {
        const double g = double(got[i]), e = expected[i];
        if (!(std::abs(g - e) <= atol + rtol * std::abs(e))) {
            fail(file, line,
                 "element " + std::to_string(i) + ": got " + std::to_string(g) + ", expected " +
                     std::to_string(e));
            return;
        }
    }
}

inline void check_close(const char* file, int line, double got, double expected, double atol,
                        double rtol) {
    check_close(file, line, &got, std::vector<double>{expected}, atol, rtol);
}

// An output buffer of `count` elements between two guard regions of `guard` elements,
// every byte of which holds a pattern. A kernel that writes outside [data(), data() + count)
// changes a guard (guards_intact() turns false); the interior starts as the same pattern,
// so an element a kernel forgot to write keeps it (all_written() turns false).
template <typename T>
class Guarded {
 public:
    static constexpr unsigned char kPattern = 0xA5;

    explicit Guarded(size_t count, size_t guard = 64)
        : storage_(count + 2 * guard), count_(count), guard_(guard) {
        std::memset(static_cast<void*>(storage_.data()), kPattern, storage_.size() * sizeof(T));
    }
    T* data() { return storage_.data() + guard_; }
    const T* data() const { return storage_.data() + guard_; }
    size_t size() const { return count_; }
    T operator[](size_t i) const { return data()[i]; }

    bool guards_intact() const {
        return untouched(storage_.data(), guard_) && untouched(data() + count_, guard_);
    }
    bool all_written() const {
        for (size_t i = 0; i < count_; ++i)
            if (untouched(data() + i, 1)) return false;
        return true;
    }

 private:
    static bool untouched(const T* p, size_t n) {
        const auto* bytes = reinterpret_cast<const unsigned char*>(p);
        for (size_t i = 0; i < n * sizeof(T); ++i)
            if (bytes[i] != kPattern) return false;
        return true;
    }
    std::vector<T> storage_;
    size_t count_, guard_;
};

// `count` values drawn uniformly from [-scale, scale], reproducible from `seed`.
template <typename T = double>
std::vector<T> random_values(size_t count, unsigned seed, double scale = 1.0) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<double> dist(-1.0, 1.0);
    std::vector<T> v(count);
    for (auto& x : v) x = T(scale * dist(gen));
    return v;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
    return s;
}

// Exact equality of the bytes: tells -0 from +0 and NaN payloads apart.
template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <typename T>
std::string bytes_of(const std::vector<T>& v) {
    return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// Central differences of objective() with respect to every value, each restored after use.
template <typename F>
std::vector<double> numeric_gradient(std::vector<double>& values, F objective) {
    const double h = 1e-6;
    std::vector<double> numeric(values.size());
    for (size_t i = 0; i < values.size(); ++i) {
        const double saved = values[i];
        values[i] = saved + h;
        const double plus = objective();
        values[i] = saved - h;
        const double minus = objective();
        values[i] = saved;
        numeric[i] = (plus - minus) / (2 * h);
    }
    return numeric;
}

// The kernel wrote nothing outside each guarded output buffer and every element inside it.
template <typename... Buffers>
void check_guarded(const char* file, int line, const char* names, const Buffers&... buffers) {
    int i = 0;
    auto check = [&](const auto& buffer) {
        const std::string which = "output " + std::to_string(i++) + " of (" + names + ")";
        if (!buffer.guards_intact()) fail(file, line, "write outside " + which);
        if (!buffer.all_written()) fail(file, line, "an element of " + which + " not written");
    };
    (check(buffers), ...);
}

// run() returns its outputs' bytes (bytes_of): one thread and two, three or four give the
// same (more threads than images, or than a small batch's share, split other things).
template <typename Run>
void check_thread_count_independent(const char* file, int line, Run run) {
    const int64_t before = cnnbp::get_num_threads();
    cnnbp::set_num_threads(1);
    const std::vector<std::string> one = run();
    for (int64_t threads = 2; threads <= 4; ++threads) {
        cnnbp::set_num_threads(threads);
        const std::vector<std::string> more = run();
        for (size_t i = 0; i < one.size(); ++i)
            if (one[i] != more[i])
                fail(file, line,
                     "output " + std::to_string(i) + " differs with " + std::to_string(threads) +
                         " threads");
    }
    cnnbp::set_num_threads(before);
}

// Pooling windows of every kind: tiled, overlapping, padded, strided past a remainder,
// rectangular, and windows as large as the padded input.
struct PoolCase {
    cnnbp::Shape x;
    cnnbp::Pool2dParams params;
};
inline const std::vector<PoolCase>& pool_cases() {
    static const std::vector<PoolCase> cases = {
        {{1, 1, 4, 4}, {2, 2, 2, 2, 0, 0}},  {{2, 3, 7, 7}, {3, 3, 2, 2, 0, 0}},
        {{2, 2, 9, 8}, {3, 3, 2, 2, 1, 1}},  {{1, 2, 5, 7}, {2, 3, 1, 2, 1, 1}},
        {{1, 1, 5, 5}, {5, 5, 1, 1, 2, 2}},  {{2, 1, 7, 5}, {2, 2, 3, 3, 0, 0}},
        {{1, 2, 8, 9}, {3, 3, 1, 1, 1, 1}},  {{2, 2, 9, 9}, {5, 4, 1, 2, 2, 1}},
        {{1, 1, 6, 13}, {1, 4, 1, 3, 0, 2}}, {{3, 2, 11, 10}, {4, 3, 3, 1, 2, 1}},
    };
    return cases;
}

// params with torch's options beyond the window
inline cnnbp::Pool2dParams with_options(cnnbp::Pool2dParams p, int64_t dilation, bool ceil_mode,
                                        bool count_include_pad = true,
                                        std::optional<int64_t> divisor_override = {}) {
    p.dilation_h = p.dilation_w = dilation;
    p.ceil_mode = ceil_mode;
    p.count_include_pad = count_include_pad;
    p.divisor_override = divisor_override;
    return p;
}

// avg_pool2d's options: ceil_mode windows hanging past the padding or dropped for starting
// in it, count_include_pad false, divisor_override (negative too), odd shapes
inline const std::vector<PoolCase>& avg_pool_option_cases() {
    static const std::vector<PoolCase> cases = {
        {{2, 2, 6, 6}, with_options({3, 3, 2, 2, 1, 1}, 1, true)},
        {{2, 1, 5, 5}, with_options({2, 2, 2, 2, 1, 1}, 1, true)},
        {{1, 2, 6, 7}, with_options({3, 3, 2, 2, 1, 1}, 1, false, false)},
        {{1, 2, 6, 7}, with_options({3, 3, 2, 2, 1, 1}, 1, true, false)},
        {{1, 2, 7, 5}, with_options({3, 2, 2, 1, 1, 0}, 1, false, true, 5)},
        {{1, 1, 5, 8}, with_options({3, 3, 3, 3, 1, 1}, 1, true, false, -3)},
        {{2, 2, 7, 9}, with_options({2, 4, 3, 2, 1, 2}, 1, true)},
        {{8, 16, 25, 23}, with_options({3, 3, 2, 2, 1, 1}, 1, true, false)},  // threads
    };
    return cases;
}

// max_pool2d's options: dilation, ceil_mode (the 2x2 kernels with a partial last row and
// column among them), both
inline const std::vector<PoolCase>& max_pool_option_cases() {
    static const std::vector<PoolCase> cases = {
        {{2, 2, 9, 9}, with_options({3, 3, 2, 2, 1, 1}, 2, false)},
        {{2, 2, 7, 7}, with_options({2, 2, 2, 2, 0, 0}, 1, true)},
        {{1, 2, 5, 5}, with_options({2, 2, 2, 2, 1, 1}, 1, true)},
        {{2, 1, 5, 6}, with_options({3, 3, 2, 2, 1, 1}, 2, true)},
        {{1, 1, 3, 10}, with_options({2, 2, 3, 3, 0, 0}, 1, true)},
        {{1, 2, 4, 5}, with_options({2, 2, 1, 1, 1, 1}, 4, false)},
        {{8, 16, 25, 27}, with_options({2, 2, 2, 2, 0, 0}, 1, true)},  // threads
    };
    return cases;
}

}  // namespace cnnbp_test

#define CNNBP_CAT2(a, b) a##b
#define CNNBP_CAT(a, b) CNNBP_CAT2(a, b)
#define TEST_CASE(name)                                                                           \
    static void CNNBP_CAT(test_, __LINE__)();                                                     \
    static cnnbp_test::Register CNNBP_CAT(register_, __LINE__)(name, CNNBP_CAT(test_, __LINE__)); \
    static void CNNBP_CAT(test_, __LINE__)()

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) cnnbp_test::fail(__FILE__, __LINE__, "CHECK(" #cond ") failed"); \
    } while (0)
#define CHECK_CLOSE(got, expected, atol, rtol) \
    cnnbp_test::check_close(__FILE__, __LINE__, got, expected, atol, rtol)
// CHECK_GUARDED(y, dx, ...): Guarded buffers, each written exactly.
#define CHECK_GUARDED(...) cnnbp_test::check_guarded(__FILE__, __LINE__, #__VA_ARGS__, __VA_ARGS__)
#define CHECK_THREAD_COUNT_INDEPENDENT(...) \
    cnnbp_test::check_thread_count_independent(__FILE__, __LINE__, __VA_ARGS__)
// The statement must throw std::invalid_argument whose message contains `fragment`.
#define CHECK_THROWS(statement, fragment)                                                    \
    do {                                                                                     \
        bool thrown = false;                                                                 \
        try {                                                                                \
            statement;                                                                       \
        } catch (const std::invalid_argument& e) {                                           \
            thrown = true;                                                                   \
            if (std::string(e.what()).find(fragment) == std::string::npos)                   \
                cnnbp_test::fail(                                                            \
                    __FILE__, __LINE__,                                                      \
                    std::string("message '") + e.what() + "' lacks '" + fragment + "'");     \
        }                                                                                    \
        if (!thrown) cnnbp_test::fail(__FILE__, __LINE__, "expected std::invalid_argument"); \
    } while (0)
// The statement must throw exactly `Type` (not a subclass of another standard type named
// in errors.hpp) whose message contains `fragment`.
#define CHECK_THROWS_AS(statement, Type, fragment)                                            \
    do {                                                                                      \
        bool thrown = false;                                                                  \
        try {                                                                                 \
            statement;                                                                        \
        } catch (const Type& e) {                                                             \
            thrown = typeid(e) == typeid(Type);                                               \
            if (!thrown)                                                                      \
                cnnbp_test::fail(__FILE__, __LINE__,                                          \
                                 std::string("expected " #Type ", got ") + typeid(e).name()); \
            if (std::string(e.what()).find(fragment) == std::string::npos)                    \
                cnnbp_test::fail(                                                             \
                    __FILE__, __LINE__,                                                       \
                    std::string("message '") + e.what() + "' lacks '" + fragment + "'");      \
            thrown = true;                                                                    \
        }                                                                                     \
        if (!thrown) cnnbp_test::fail(__FILE__, __LINE__, "expected " #Type);                 \
    } while (0)
