// cnnbp/json.hpp -- the JSON values of a model file's architecture and of a layer's
// configuration: what the file holds, what Python passes to a layer's constructor, and what
// a layer reports as its config(). Integers and floats stay apart (3 is not 3.0), objects
// keep their keys in order, so that a file written and read again is the same text.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace cnnbp::json {

struct Value;
using Array = std::vector<Value>;
using Object = std::vector<std::pair<std::string, Value>>;  // in order; keys unique

struct Value {
    // an integer that does not fit int64 is kept as Big (its text), so that it can be
    // refused by name rather than rounded
    struct Big {
        std::string text;
    };
    std::variant<std::nullptr_t, bool, int64_t, double, std::string, Array, Object, Big> v;

    Value() : v(nullptr) {}
    Value(std::nullptr_t) : v(nullptr) {}
    Value(bool b) : v(b) {}
    Value(int i) : v(int64_t(i)) {}
    Value(int64_t i) : v(i) {}
    Value(double d) : v(d) {}
    Value(const char* s) : v(std::string(s)) {}
    Value(std::string s) : v(std::move(s)) {}
    Value(Array a) : v(std::move(a)) {}
    Value(Object o) : v(std::move(o)) {}
    Value(Big b) : v(std::move(b)) {}

    template <typename X>
    const X* get() const {
        return std::get_if<X>(&v);
    }
    bool is_null() const { return std::holds_alternative<std::nullptr_t>(v); }
};

// The value of `key` in `object`, or nullptr.
const Value* find(const Object& object, const std::string& key);

// Parses UTF-8 JSON text (nesting at most max_depth deep). Throws std::invalid_argument
// "[load] <where>: expected valid JSON, got <what> at character <n>".
Value parse(const std::string& text, const std::string& where, int max_depth = 32);

// Compact JSON with Python's json.dumps separators (", " and ": "); doubles round-trip.
std::string dump(const Value& value);

// Text safe for any error message: bytes outside printable ASCII as \xNN.
std::string printable(const std::string& text);

// How a value reads in an error message, as Python's repr would show it (short).
std::string describe(const Value& value);

}  // namespace cnnbp::json
