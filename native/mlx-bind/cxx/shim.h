// C++ side of the binding: thin functions over mlx::core with the stream as the last argument.
// Exceptions thrown by MLX propagate to cxx, which turns them into Rust `Err`s.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "mlx/array.h"
#include "rust/cxx.h"

namespace nxmlx {

enum class Dtype : int32_t;
enum class DeviceKind : int32_t;
enum class UnaryOp : int32_t;
enum class BinaryOp : int32_t;
enum class ReduceOp : int32_t;
enum class ScanOp : int32_t;
struct StreamRef;

using mlx::core::array;

// A list of array handles, to evaluate several arrays as one graph.
struct ArrayList {
  std::vector<array> arrays;
};

// A Rust function of arrays (defined in compile.rs) and its compiled form.
struct TraceFn;
struct CompiledFn {
  std::function<std::vector<array>(const std::vector<array>&)> fun;
};
std::unique_ptr<CompiledFn> compile_fn(rust::Box<TraceFn> f);
std::unique_ptr<ArrayList> compiled_call(const CompiledFn& f, const ArrayList& inputs);
bool compile_enabled(DeviceKind device);

rust::String version();
bool is_available(DeviceKind device);
StreamRef new_stream(DeviceKind device);
void synchronize(StreamRef stream);
void set_default_stream(StreamRef stream);
rust::String library_path();
rust::String blas_library_path();
rust::String blas_config();
rust::String blas_core();
int32_t blas_limit_idle_spin(int32_t exponent);
int32_t blas_idle_spin();

std::unique_ptr<array> from_bytes(
    rust::Slice<const uint8_t> data, rust::Slice<const int32_t> shape, Dtype dtype);
std::unique_ptr<array> clone_array(const array& a);
rust::Vec<int32_t> shape(const array& a);
Dtype dtype(const array& a);
size_t nbytes(const array& a);
void eval(const array& a);
void async_eval(const array& a);
void eval_spin(const array& a, uint32_t spin_us);
void copy_to(const array& a, StreamRef s, rust::Slice<uint8_t> out);
bool try_copy_to(const array& a, rust::Slice<uint8_t> out);

std::unique_ptr<ArrayList> new_array_list();
void array_list_push(ArrayList& list, const array& a);
void async_eval_list(const ArrayList& list);
void wait_list(const ArrayList& list);
void scan_graph(
    const ArrayList& outputs, rust::Vec<uint64_t>& pending, rust::Vec<uint64_t>& boundary);
uint64_t array_id(const array& a);


size_t get_active_memory();
size_t get_peak_memory();
size_t physical_memory();
void reset_peak_memory();
size_t get_cache_memory();
size_t get_memory_limit();
size_t set_cache_limit(size_t limit);
void clear_cache();

std::unique_ptr<array> full_scalar(
    rust::Slice<const int32_t> shape, double value, Dtype dtype, StreamRef s);
std::unique_ptr<array> arange(double start, double stop, double step, Dtype dtype, StreamRef s);
std::unique_ptr<array> random_uniform(
    rust::Slice<const int32_t> shape, Dtype dtype, uint64_t seed, StreamRef s);

std::unique_ptr<array> unary(UnaryOp op, const array& a, StreamRef s);
std::unique_ptr<array> binary(BinaryOp op, const array& a, const array& b, StreamRef s);
std::unique_ptr<array> reduce(
    ReduceOp op, const array& a, rust::Slice<const int32_t> axes, bool keep_dims, StreamRef s);
// exp(a - max(a)) / sum(exp(a - max(a))) over `axes` as one MLX op (its fused kernel when the
// axes are the last one); `precise` accumulates half types in f32.
std::unique_ptr<array> softmax(
    const array& a, rust::Slice<const int32_t> axes, bool precise, StreamRef s);
std::unique_ptr<array> astype(const array& a, Dtype dtype, StreamRef s);
std::unique_ptr<array> reshape(const array& a, rust::Slice<const int32_t> shape, StreamRef s);
std::unique_ptr<array> transpose(const array& a, rust::Slice<const int32_t> axes, StreamRef s);
std::unique_ptr<array> reverse(const array& a, int32_t axis, StreamRef s);
std::unique_ptr<array> layer_norm(
    const array& x, const array& g, const array& b, double eps, StreamRef s);
std::unique_ptr<array> broadcast_to(const array& a, rust::Slice<const int32_t> shape, StreamRef s);
std::unique_ptr<array> matmul(const array& a, const array& b, StreamRef s);
std::unique_ptr<array> linalg_inv(const array& a, StreamRef s);
std::unique_ptr<array> concatenate(const ArrayList& list, int32_t axis, StreamRef s);
std::unique_ptr<array> rms_norm(const array& x, const array& w, double eps, StreamRef s);
std::unique_ptr<array> rope(const ArrayList& inputs, int32_t dims, bool traditional, double base,
                            double scale, StreamRef s);
std::unique_ptr<array> attention(const ArrayList& inputs, double scale, uint8_t mask,
                                 bool sinks, StreamRef s);
std::unique_ptr<ArrayList> quantize(const array& w, int32_t group_size, int32_t bits, uint8_t mode,
                                    StreamRef s);
std::unique_ptr<array> dequantize(const ArrayList& inputs, int32_t group_size, int32_t bits,
                                  uint8_t mode, Dtype dtype, StreamRef s);
std::unique_ptr<array> quantized_matmul(const ArrayList& inputs, bool transpose,
                                        int32_t group_size, int32_t bits, uint8_t mode,
                                        StreamRef s);
std::unique_ptr<array> gather_qmm(const ArrayList& inputs, bool has_lhs, bool has_rhs,
                                  bool transpose, int32_t group_size, int32_t bits, uint8_t mode,
                                  StreamRef s);
std::unique_ptr<array> slice(
    const array& a,
    rust::Slice<const int32_t> start,
    rust::Slice<const int32_t> stop,
    rust::Slice<const int32_t> strides,
    StreamRef s);
std::unique_ptr<array> slice_update(
    const array& src,
    const array& update,
    rust::Slice<const int32_t> start,
    rust::Slice<const int32_t> stop,
    StreamRef s);
std::unique_ptr<array> slice_dynamic(
    const array& a,
    const array& start,
    rust::Slice<const int32_t> axes,
    rust::Slice<const int32_t> sizes,
    StreamRef s);
std::unique_ptr<array> slice_update_dynamic(
    const array& src,
    const array& update,
    const array& start,
    rust::Slice<const int32_t> axes,
    StreamRef s);
std::unique_ptr<array> pad(
    const array& a,
    rust::Slice<const int32_t> low,
    rust::Slice<const int32_t> high,
    const array& value,
    StreamRef s);
std::unique_ptr<array> take(const array& a, const array& indices, int32_t axis, StreamRef s);
std::unique_ptr<array> take_along_axis(
    const array& a, const array& indices, int32_t axis, StreamRef s);
std::unique_ptr<array> put_along_axis(
    const array& a, const array& indices, const array& values, int32_t axis, StreamRef s);
std::unique_ptr<array> topk(const array& a, int32_t k, int32_t axis, StreamRef s);
std::unique_ptr<array> scatter(
    bool add,
    const array& a,
    const ArrayList& indices,
    const array& updates,
    rust::Slice<const int32_t> axes,
    StreamRef s);
std::unique_ptr<array> as_strided(
    const array& a,
    rust::Slice<const int32_t> shape,
    rust::Slice<const int64_t> strides,
    size_t offset,
    StreamRef s);
std::unique_ptr<array> view(const array& a, Dtype dtype, StreamRef s);
std::unique_ptr<array> scan(ScanOp op, const array& a, int32_t axis, bool reverse, StreamRef s);
std::unique_ptr<array> conv_general(
    const array& input,
    const array& weight,
    rust::Slice<const int32_t> strides,
    rust::Slice<const int32_t> padding_lo,
    rust::Slice<const int32_t> padding_hi,
    rust::Slice<const int32_t> kernel_dilation,
    rust::Slice<const int32_t> input_dilation,
    int32_t groups,
    StreamRef s);
std::unique_ptr<array> fft(bool inverse, const array& a, int32_t n, int32_t axis, StreamRef s);
std::unique_ptr<array> fftn(
    uint8_t kind,
    const array& a,
    rust::Slice<const int32_t> lengths,
    rust::Slice<const int32_t> axes,
    StreamRef s);
std::unique_ptr<array> linalg_solve(const array& a, const array& b, StreamRef s);
std::unique_ptr<array> linalg_solve_triangular(
    const array& a, const array& b, bool upper, StreamRef s);
std::unique_ptr<array> linalg_cholesky(const array& a, bool upper, StreamRef s);
std::unique_ptr<array> linalg_det(const array& a, StreamRef s);
std::unique_ptr<ArrayList> linalg_multi(uint8_t op, const array& a, StreamRef s);
size_t array_list_len(const ArrayList& list);
std::unique_ptr<array> array_list_get(const ArrayList& list, size_t i);
std::unique_ptr<array> gather(
    const array& a,
    const ArrayList& indices,
    rust::Slice<const int32_t> axes,
    rust::Slice<const int32_t> slice_sizes,
    StreamRef s);
std::unique_ptr<array> arg_reduce(bool max, const array& a, int32_t axis, bool keep_dims, StreamRef s);
std::unique_ptr<array> sort_axis(bool indices, const array& a, int32_t axis, StreamRef s);
std::unique_ptr<array> where_(const array& cond, const array& a, const array& b, StreamRef s);
std::unique_ptr<array> tensordot(
    const array& a,
    const array& b,
    rust::Slice<const int32_t> axes_a,
    rust::Slice<const int32_t> axes_b,
    StreamRef s);

} // namespace nxmlx
