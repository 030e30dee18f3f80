// Array conversion shared by the bindings: dtype checks (TypeError), C-contiguous views,
// new arrays made without pybind11's detours, and int / pair arguments.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "cnnbp/shapes.hpp"

namespace cnnbp_bindings {

namespace py = pybind11;
using cnnbp::Shape;

enum class DType { f32, f64 };

inline std::string type_name(const py::handle& obj) {
    return py::str(py::type::of(obj).attr("__name__"));
}

// The one conversion of every array argument: any array-like becomes an ndarray, a view of
// the caller's memory whenever NumPy can make one, so nothing is copied on the way in.
// An ndarray passes as it is; the buffer protocol (memoryview, array.array, bytes-like) and
// __array_interface__ / __array__ are NumPy's own conversion; an object that offers only
// __dlpack__ for these (PyTorch CPU tensors, JAX CPU arrays) is viewed by numpy.from_dlpack.
// A view that is strided or of another dtype is then copied or refused as for an ndarray.
// None and non-numeric objects are refused.
inline py::array as_array(const char* op, const char* name, const py::handle& obj) {
    if (obj.is_none())
        throw py::type_error(std::string("[") + op + "] " + name + ": expected an array, got None");
    if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj);
    if (py::hasattr(obj, "__dlpack__") && !py::hasattr(obj, "__array_interface__") &&
        !PyObject_CheckBuffer(obj.ptr())) {
        static const auto* from_dlpack = [] {  // never destroyed: arrays may outlive statics
            const py::object numpy = py::module_::import("numpy");
            return new py::object(py::getattr(numpy, "from_dlpack", py::none()));
        }();
        if (!from_dlpack->is_none()) {
            try {
                return (*from_dlpack)(obj);
            } catch (py::error_already_set& error) {  // a GPU tensor, one that requires grad
                throw py::type_error(std::string("[") + op + "] " + name +
                                     ": expected an array NumPy can view (numpy.from_dlpack), "
                                     "got a " +
                                     type_name(obj) +
                                     " it refused: " + std::string(py::str(error.value())));
            }
        }
    }
    py::array arr = py::array::ensure(obj);
    if (!arr)
        throw py::type_error(std::string("[") + op + "] " + name + ": expected an array, got " +
                             type_name(obj));
    return arr;
}

inline std::string dtype_name(const py::array& a) { return py::str(a.dtype()); }

// By kind and size, not dtype identity: a float64 that went through pickle or carries
// a non-native byte order is still float64 (contiguous() converts it).
inline DType float_dtype(const char* op, const char* name, const py::array& a) {
    const py::dtype dt = a.dtype();
    if (dt.kind() == 'f' && dt.itemsize() == 4) return DType::f32;
    if (dt.kind() == 'f' && dt.itemsize() == 8) return DType::f64;
    throw py::type_error(std::string("[") + op + "] " + name +
                         ": expected float32 or float64, got " + dtype_name(a));
}

// Every float tensor of one call has the dtype of the first: mixing is an error.
inline void check_dtype(const char* op, const char* name, const py::array& a, DType expected) {
    DType got = float_dtype(op, name, a);
    if (got != expected)
        throw py::type_error(std::string("[") + op + "] " + name + ": expected " +
                             (expected == DType::f32 ? "float32" : "float64") +
                             " like the first array argument, got " + dtype_name(a));
}

inline Shape shape_of(const py::array& a) { return Shape(a.shape(), a.shape() + a.ndim()); }

// A C-contiguous view of `a` (a copy only when a is strided, Fortran-ordered or of the
// other byte order). Arrays that already are, nearly all, pass straight through without
// PyArray_FromAny's conversion machinery: for a tiny layer that costs more than its kernel.
// True when obj is an aligned, C-contiguous ndarray of exactly T in native byte order, read
// off the array's header (pybind11's isinstance asks NumPy to compare dtypes, which costs
// more than a tiny layer's kernel).
template <typename T>
bool is_plain_array(const py::handle& obj) {
    if (!py::array::check_(obj)) return false;
    const auto arr = py::reinterpret_borrow<py::array>(obj);
    constexpr int kAligned = 0x0100;  // NumPy's NPY_ARRAY_ALIGNED
    if (!(arr.flags() & py::array::c_style) || !(arr.flags() & kAligned)) return false;
    static const int wanted = py::dtype::of<T>().num();
    const py::dtype dtype = arr.dtype();
    return dtype.num() == wanted && dtype.byteorder() != '>';
}

// A copy that cannot be made raises (MemoryError): array_t::ensure would return a null
// array instead, whose data() is a null pointer.
template <typename T>
py::array_t<T, py::array::c_style> contiguous(const py::array& a) {
    if (is_plain_array<T>(a) || py::isinstance<py::array_t<T, py::array::c_style>>(a))
        return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(a);
    return py::array_t<T, py::array::c_style>(py::reinterpret_borrow<py::object>(a));
}

// Storage for large new arrays, kept for reuse after their arrays die. A memory-bound
// kernel on megabytes (batch norm, pooling, activations) takes about as long as the kernel
// that faults fresh pages in, and glibc hands large freed blocks back to the system
// (a new mapping, or the heap's top trimmed), so every call would pay again. Blocks of at
// least kMinBytes go back to this pool instead, the most recent kMaxKept bytes of them, and
// the next array of the same rounded size takes one. Smaller arrays come from NumPy as usual.
class BlockPool {
 public:
    static constexpr size_t kMinBytes = size_t(1) << 20;
    static constexpr size_t kMaxKept = size_t(64) << 20;
    static constexpr size_t kHeader = 64;  // the block's size, before the 64-byte aligned data

    static BlockPool& instance() {
        static BlockPool* pool = new BlockPool;  // never destroyed: arrays may outlive statics
        return *pool;
    }
    // Data of at least `bytes`, 64-byte aligned; release() gives it back.
    void* take(size_t bytes) {
        const size_t size = (bytes + 4095) / 4096 * 4096;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            for (size_t i = free_.size(); i-- > 0;)
                if (free_[i].first == size) {
                    void* data = free_[i].second;
                    free_.erase(free_.begin() + std::ptrdiff_t(i));
                    kept_ -= size;
                    return data;
                }
        }
        auto* block = static_cast<char*>(std::aligned_alloc(64, kHeader + size));
        if (!block) throw std::bad_alloc();
        *reinterpret_cast<size_t*>(block) = size;
        return block + kHeader;
    }
    // Keeps the block, dropping the oldest kept ones while more than kMaxKept is kept: the
    // sizes a loop uses now stay, those of earlier work go back to the system.
    void release(void* data) {
        char* block = static_cast<char*>(data) - kHeader;
        const size_t size = *reinterpret_cast<size_t*>(block);
        if (size > kMaxKept) return std::free(block);
        std::vector<void*> dropped;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            free_.emplace_back(size, data);
            kept_ += size;
            size_t oldest = 0;
            while (kept_ > kMaxKept) {
                kept_ -= free_[oldest].first;
                dropped.push_back(free_[oldest++].second);
            }
            free_.erase(free_.begin(), free_.begin() + std::ptrdiff_t(oldest));
        }
        for (void* d : dropped) std::free(static_cast<char*>(d) - kHeader);
    }

 private:
    std::mutex mutex_;
    std::vector<std::pair<size_t, void*>> free_;  // (rounded size, data), the newest last
    size_t kept_ = 0;
};

// A new uninitialized C-contiguous array (large ones on BlockPool's storage).
template <typename T>
py::array_t<T> empty_like_shape(const Shape& shape) {
    py::array::ShapeContainer dims(shape.begin(), shape.end());
    size_t bytes = sizeof(T);
    for (int64_t d : shape) bytes *= size_t(d);  // checked against kMaxElements by the ops
    if (bytes < BlockPool::kMinBytes) return py::array_t<T>(std::move(dims));
    void* data = BlockPool::instance().take(bytes);
    py::capsule owner(data, [](void* p) { BlockPool::instance().release(p); });
    return py::array_t<T>(std::move(dims), static_cast<T*>(data), owner);
}

// Integer arrays (class labels, pooling indices) as C-contiguous int64.
inline py::array_t<int64_t, py::array::c_style> as_int64(const char* op, const char* name,
                                                         const py::handle& obj) {
    py::array arr = as_array(op, name, obj);
    const char kind = arr.dtype().kind();
    if (kind != 'i' && kind != 'u')
        throw py::type_error(std::string("[") + op + "] " + name +
                             ": expected an integer array, got " + dtype_name(arr));
    if (py::isinstance<py::array_t<int64_t, py::array::c_style>>(arr))  // as contiguous()
        return py::reinterpret_borrow<py::array_t<int64_t, py::array::c_style>>(arr);
    // the converting constructor raises where ensure() would return a null array
    return py::array_t<int64_t, py::array::c_style | py::array::forcecast>(arr);
}

// A loss's reduction: the str "mean", "sum" or "none"; anything else a ValueError
// "[op] reduction: expected 'mean', 'sum' or 'none', got <repr>".
inline cnnbp::Reduction reduction_arg(const char* op, const py::handle& obj) {
    if (!py::isinstance<py::str>(obj))
        throw std::invalid_argument(std::string("[") + op +
                                    "] reduction: expected 'mean', 'sum' or 'none', got " +
                                    std::string(py::repr(obj)));
    return cnnbp::parse_reduction(op, obj.cast<std::string>());
}

// A plain Python int that fits int64 without the generic PyNumber_Index round trip, which
// costs more than a tiny layer's kernel; false for anything else (the caller's generic path
// then converts it or reports it).
inline bool exact_int(const py::handle& v, int64_t& out) {
    if (!PyLong_CheckExact(v.ptr())) return false;
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
    if (overflow || (value == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return false;
    }
    out = value;
    return true;
}

// v.__index__() as int64. py::cast would raise RuntimeError for a value beyond int64;
// this names the op and the argument.
inline int64_t index_value(const char* op, const char* name, const py::handle& v) {
    const auto index = py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr()));
    if (!index) throw py::error_already_set();
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (overflow)
        throw py::value_error(std::string("[") + op + "] " + name +
                              ": expected a 64-bit integer, got " + std::string(py::str(index)));
    if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
    return value;
}

// An int or a pair of ints -> (h, w).
inline std::array<int64_t, 2> parse_pair(const char* op, const char* name, const py::handle& obj) {
    auto as_int = [&](const py::handle& v) -> int64_t {
        int64_t fast;
        if (exact_int(v, fast)) return fast;
        if (py::isinstance<py::bool_>(v) || !PyIndex_Check(v.ptr()))
            throw py::type_error(std::string("[") + op + "] " + name +
                                 ": expected an int or a pair of ints, got " +
                                 std::string(py::repr(obj)));
        return index_value(op, name, v);
    };
    if (PyIndex_Check(obj.ptr())) {  // ints, numpy integers, 0-d integer arrays
        const int64_t v = as_int(obj);
        return {v, v};
    }
    if (py::isinstance<py::sequence>(obj) && !py::isinstance<py::str>(obj)) {
        py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
        if (seq.size() != 2)
            throw py::type_error(std::string("[") + op + "] " + name +
                                 ": expected an int or a pair of ints, got " +
                                 std::string(py::repr(obj)));
        return {as_int(seq[0]), as_int(seq[1])};
    }
    as_int(obj);  // throws the op-prefixed TypeError
    return {0, 0};
}

// A Python int (or numpy integer), not a bool.
inline int64_t parse_int(const char* op, const char* name, const py::handle& obj) {
    if (py::isinstance<py::bool_>(obj) || !PyIndex_Check(obj.ptr()))
        throw py::type_error(std::string("[") + op + "] " + name + ": expected an int, got " +
                             std::string(py::repr(obj)));
    return index_value(op, name, obj);
}

// Runs body(T{}) with T = float or double.
template <typename Body>
auto dispatch(DType dtype, Body&& body) {
    if (dtype == DType::f32) return body(float{});
    return body(double{});
}

}  // namespace cnnbp_bindings
