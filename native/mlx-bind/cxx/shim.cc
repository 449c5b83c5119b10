#include "mlx-bind/cxx/shim.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <optional>
#include <cstring>
#include <thread>
#include <unordered_set>
#include <stdexcept>
#include <string>
#include <vector>

#include <csignal>
#include <cstdlib>
#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlx-bind/cxx/kernels.h"
#include "mlx-bind/src/ffi.rs.h"
#include "mlx/mlx.h"

namespace mx = mlx::core;

namespace nxmlx {

namespace {

mx::Dtype to_mx(Dtype d) {
  switch (d) {
    case Dtype::Bool: return mx::bool_;
    case Dtype::U8: return mx::uint8;
    case Dtype::U16: return mx::uint16;
    case Dtype::U32: return mx::uint32;
    case Dtype::U64: return mx::uint64;
    case Dtype::I8: return mx::int8;
    case Dtype::I16: return mx::int16;
    case Dtype::I32: return mx::int32;
    case Dtype::I64: return mx::int64;
    case Dtype::F16: return mx::float16;
    case Dtype::F32: return mx::float32;
    case Dtype::F64: return mx::float64;
    case Dtype::BF16: return mx::bfloat16;
    case Dtype::C64: return mx::complex64;
  }
  throw std::invalid_argument("unknown dtype code");
}

Dtype from_mx(mx::Dtype d) {
  // Dtype mirrors mx::Dtype::Val in order (checked by a static_assert below).
  return static_cast<Dtype>(static_cast<int32_t>(d.val()));
}

static_assert(static_cast<int32_t>(mx::Dtype::Val::complex64) == 13, "Dtype order changed");
static_assert(static_cast<int32_t>(mx::Dtype::Val::bfloat16) == 12, "Dtype order changed");

mx::Device to_mx(DeviceKind d) {
  return d == DeviceKind::Gpu ? mx::Device(mx::Device::gpu, 0) : mx::Device(mx::Device::cpu, 0);
}

mx::Stream to_mx(StreamRef s) {
  return mx::Stream(s.index, to_mx(s.device));
}

mx::Shape to_shape(rust::Slice<const int32_t> shape) {
  return mx::Shape(shape.begin(), shape.end());
}

std::vector<int> to_ints(rust::Slice<const int32_t> v) {
  return std::vector<int>(v.begin(), v.end());
}

std::unique_ptr<array> boxed(array a) {
  return std::make_unique<array>(std::move(a));
}

std::string path_of(const void* addr) {
  Dl_info info;
  if (addr != nullptr && dladdr(addr, &info) != 0 && info.dli_fname != nullptr) {
    return info.dli_fname;
  }
  return "";
}

// An axis given as -ndim..ndim-1, as a position; or invalid_argument naming `op`.
int checked_axis(const char* op, const array& a, int axis) {
  int ndim = static_cast<int>(a.ndim());
  if (axis < -ndim || axis >= ndim) {
    throw std::invalid_argument(
        std::string(op) + ": axis " + std::to_string(axis) + " is out of range for an array of " +
        std::to_string(ndim) + " dimensions");
  }
  return axis < 0 ? axis + ndim : axis;
}

// MLX reads and writes at index values without checking them (an out-of-range one reads or
// writes outside the array), so every index array is clamped into [0, dim - 1] before MLX
// sees it. The upper bound stays within the index type (u8 indices into an axis of 300 need
// no clamp from above, and 299 would wrap in u8).
array clamped_indices(const char* op, const array& indices, int dim, mx::StreamOrDevice st) {
  if (!mx::issubdtype(indices.dtype(), mx::integer)) {
    throw std::invalid_argument(std::string(op) + ": indices must be integers");
  }
  if (dim <= 0) {
    if (indices.size() == 0) {
      return indices;
    }
    throw std::invalid_argument(std::string(op) + ": cannot index an empty axis");
  }
  auto dt = indices.dtype();
  int64_t type_max = dt.size() >= 8 ? INT64_MAX : (mx::issubdtype(dt, mx::unsignedinteger)
      ? (int64_t{1} << (8 * dt.size())) - 1
      : (int64_t{1} << (8 * dt.size() - 1)) - 1);
  int64_t high = std::min<int64_t>(dim - 1, type_max);
  return mx::clip(indices, mx::array(0, dt), mx::array(high, dt), st);
}

// Integer division traps (SIGFPE) on a zero divisor and on the type's minimum divided by -1.
// Such divisors are replaced by 1 before MLX divides; for -1 the quotient is then the
// (wrapping) negation of the dividend and the remainder 0, as in two's complement
// arithmetic. A zero divisor gives an unspecified value.
array integer_division(bool floor_divide, const array& a, const array& b, mx::StreamOrDevice st) {
  auto dt = mx::promote_types(a.dtype(), b.dtype());
  if (!mx::issubdtype(dt, mx::integer)) {
    return floor_divide ? mx::floor_divide(a, b, st) : mx::remainder(a, b, st);
  }
  auto x = mx::astype(a, dt, st);
  auto y = mx::astype(b, dt, st);
  auto one = mx::array(1, dt);
  auto zero = mx::array(0, dt);
  if (mx::issubdtype(dt, mx::unsignedinteger)) {
    auto d = mx::where(mx::equal(y, zero, st), one, y, st);
    return floor_divide ? mx::floor_divide(x, d, st) : mx::remainder(x, d, st);
  }
  auto minus_one = mx::array(-1, dt);
  auto by_minus_one = mx::equal(y, minus_one, st);
  auto d = mx::where(mx::logical_or(mx::equal(y, zero, st), by_minus_one, st), one, y, st);
  if (floor_divide) {
    return mx::where(by_minus_one, mx::negative(x, st), mx::floor_divide(x, d, st), st);
  }
  return mx::where(by_minus_one, zero, mx::remainder(x, d, st), st);
}

// One clamped index array per indexed axis of `a` (see clamped_indices).
std::vector<array> guarded_indices(
    const char* op, const array& a, const std::vector<array>& indices, std::vector<int>& axes,
    mx::StreamOrDevice st) {
  if (indices.size() != axes.size()) {
    throw std::invalid_argument(std::string(op) + ": one index array is needed per axis");
  }
  std::vector<array> out;
  out.reserve(indices.size());
  for (size_t i = 0; i < indices.size(); ++i) {
    axes[i] = checked_axis(op, a, axes[i]);
    out.push_back(clamped_indices(op, indices[i], a.shape(axes[i]), st));
  }
  return out;
}

} // namespace

rust::String version() {
  return rust::String(mx::version());
}

bool is_available(DeviceKind device) {
  return mx::is_available(to_mx(device));
}

StreamRef new_stream(DeviceKind device) {
  auto d = to_mx(device);
  // Creating a stream on a device that is not available terminates the process inside MLX.
  if (!mx::is_available(d)) {
    throw std::runtime_error(
        std::string("device ") + (device == DeviceKind::Gpu ? "gpu" : "cpu") +
        " is not available in this build of MLX");
  }
  auto s = mx::new_stream(d);
  return StreamRef{s.index, device};
}

void synchronize(StreamRef stream) {
  mx::synchronize(to_mx(stream));
}

void set_default_stream(StreamRef stream) {
  mx::set_default_stream(to_mx(stream));
}

rust::String library_path() {
  return rust::String(path_of(reinterpret_cast<const void*>(&mx::version)));
}

// Which shared object provides `cblas_sgemm` to libmlx. The lookup goes through the handle
// of the object this shim is linked into, so it follows the same dependency order (breadth
// first from that object) that the dynamic loader used when it bound libmlx's references.
static void* blas_symbol(const char* name) {
  std::string self = path_of(reinterpret_cast<const void*>(&blas_library_path));
  void* handle = dlopen(self.empty() ? nullptr : self.c_str(), RTLD_LAZY | RTLD_NOLOAD);
  if (handle == nullptr) {
    handle = dlopen(nullptr, RTLD_LAZY);
  }
  void* sym = handle ? dlsym(handle, name) : nullptr;
  if (handle != nullptr) {
    dlclose(handle);
  }
  return sym;
}

rust::String blas_library_path() {
  return rust::String(path_of(blas_symbol("cblas_sgemm")));
}

// OpenBLAS's own description of its build (`openblas_get_config`, e.g. "OpenBLAS 0.3.29
// DYNAMIC_ARCH NO_AFFINITY Cooperlake MAX_THREADS=64") and the kernel set it chose for this
// CPU (`openblas_get_corename`); empty for other BLAS libraries.
// The string a `char* f()` of the loaded BLAS returns, or "" when it has no such function.
static rust::String blas_string(const char* name) {
  using Fn = char* (*)();
  auto fn = reinterpret_cast<Fn>(blas_symbol(name));
  const char* s = fn ? fn() : nullptr;
  return rust::String(s ? s : "");
}

rust::String blas_config() { return blas_string("openblas_get_config"); }

rust::String blas_core() { return blas_string("openblas_get_corename"); }

// OpenBLAS's idle worker threads busy-wait (without yielding the core) for 2^timeout TSC
// cycles after each threaded call before they sleep: 2^28 by default, about 0.1 s. On a
// machine with few cores that spinning takes a core from everything MLX runs between two
// matmuls (element-wise ops, our threaded kernels); a 1x128x768 encoder block ran 10-25%
// faster at 2^16 on 2 vCPUs, and waking a sleeping worker costs microseconds against the
// tens to thousands a threaded sgemm takes. OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when it
// loads (before this code runs), so the value is set, re-read (`openblas_read_env`) and
// applied by restarting the thread server (`blas_thread_shutdown_`, `blas_thread_init`);
// the environment is left as found. A value the user
// set in OPENBLAS_THREAD_TIMEOUT wins. Returns the exponent in effect (0: OpenBLAS's
// default), or -1 when the BLAS is not OpenBLAS or lacks these functions.
int32_t blas_limit_idle_spin(int32_t exponent) {
  using ReadEnv = void (*)();
  using Server = int (*)();
  using Timeout = unsigned int (*)();
  auto read_env = reinterpret_cast<ReadEnv>(blas_symbol("openblas_read_env"));
  auto shutdown = reinterpret_cast<Server>(blas_symbol("blas_thread_shutdown_"));
  auto init = reinterpret_cast<Server>(blas_symbol("blas_thread_init"));
  auto timeout = reinterpret_cast<Timeout>(blas_symbol("openblas_thread_timeout"));
  if (read_env == nullptr || shutdown == nullptr || init == nullptr || timeout == nullptr) {
    return -1;
  }
  constexpr const char* kName = "OPENBLAS_THREAD_TIMEOUT";
  if (std::getenv(kName) == nullptr && exponent >= 4 && exponent <= 30) {
    setenv(kName, std::to_string(exponent).c_str(), 0);
    read_env();
    unsetenv(kName);
    shutdown();
    // Started again here, not lazily by the first threaded call: threads inherit the
    // priority of the thread that starts them, and the stream threads that make those
    // calls run at a low one (the NIF's worker_nice, SCHED_BATCH), where the BEAM's
    // schedulers starve them (a 1024^2 sgemm at half speed).
    init();
  }
  return static_cast<int32_t>(timeout());
}

int32_t blas_idle_spin() {
  using Timeout = unsigned int (*)();
  auto timeout = reinterpret_cast<Timeout>(blas_symbol("openblas_thread_timeout"));
  return timeout == nullptr ? -1 : static_cast<int32_t>(timeout());
}

std::unique_ptr<array> from_bytes(
    rust::Slice<const uint8_t> data, rust::Slice<const int32_t> shape, Dtype dtype) {
  auto dt = to_mx(dtype);
  auto sh = to_shape(shape);
  size_t count = 1;
  for (auto d : sh) {
    if (d < 0) {
      throw std::invalid_argument("negative dimension in shape");
    }
    if (d != 0 && count > SIZE_MAX / static_cast<size_t>(d)) {
      throw std::invalid_argument("shape has too many elements");
    }
    count *= static_cast<size_t>(d);
  }
  if (count != 0 && count > SIZE_MAX / dt.size()) {
    throw std::invalid_argument("shape has too many elements");
  }
  if (count * dt.size() != data.size()) {
    throw std::invalid_argument(
        "binary of " + std::to_string(data.size()) + " bytes does not match shape of " +
        std::to_string(count) + " elements of " + std::to_string(dt.size()) + " bytes");
  }
  auto buffer = mx::allocator::malloc(data.size());
  if (data.size() > 0) {
    std::memcpy(buffer.buffer().raw_ptr(), data.data(), data.size());
  }
  return boxed(array(std::move(buffer), std::move(sh), dt));
}

std::unique_ptr<array> clone_array(const array& a) {
  return std::make_unique<array>(a);
}

rust::Vec<int32_t> shape(const array& a) {
  rust::Vec<int32_t> out;
  out.reserve(a.ndim());
  for (auto d : a.shape()) {
    out.push_back(d);
  }
  return out;
}

Dtype dtype(const array& a) {
  return from_mx(a.dtype());
}

size_t nbytes(const array& a) {
  return a.nbytes();
}

void eval(const array& a) {
  mx::eval({a});
}

void async_eval(const array& a) {
  mx::async_eval({a});
}

// Like eval, but waits for a small graph by polling its completion (yielding the CPU) for up
// to `spin_us` microseconds before sleeping on MLX's event: waking a sleeping thread costs
// tens of microseconds on small machines, more than a tiny graph takes to run.
void eval_spin(const array& a, uint32_t spin_us) {
  array x = a;
  mx::async_eval({x});
  auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
  while (!x.is_available()) {
    if (std::chrono::steady_clock::now() >= deadline) {
      x.wait();
      return;
    }
    std::this_thread::yield();
  }
}

void copy_to(const array& a, StreamRef s, rust::Slice<uint8_t> out) {
  if (out.size() != a.nbytes()) {
    throw std::invalid_argument("output buffer size does not match the array");
  }
  array src = a;
  mx::eval({src});
  if (!src.flags().row_contiguous) {
    src = mx::contiguous(src, false, to_mx(s));
    mx::eval({src});
  }
  if (out.size() > 0) {
    std::memcpy(out.data(), src.data<uint8_t>(), out.size());
  }
}

// Copies the data of an array that is already computed and row-contiguous; false (nothing
// copied, nothing evaluated) otherwise. Safe on any thread.
bool try_copy_to(const array& a, rust::Slice<uint8_t> out) {
  if (out.size() != a.nbytes()) {
    throw std::invalid_argument("output buffer size does not match the array");
  }
  if (a.status() != array::Status::available || !a.flags().row_contiguous) {
    return false;
  }
  if (out.size() > 0) {
    std::memcpy(out.data(), a.data<uint8_t>(), out.size());
  }
  return true;
}

std::unique_ptr<ArrayList> new_array_list() {
  return std::make_unique<ArrayList>();
}

void array_list_push(ArrayList& list, const array& a) {
  list.arrays.push_back(a);
}

void async_eval_list(const ArrayList& list) {
  mx::async_eval(list.arrays);
}

void wait_list(const ArrayList& list) {
  // Arrays already scheduled by async_eval are waited on (through their completion events,
  // which carry the error of a failed task); others are evaluated.
  for (auto a : list.arrays) {
    a.eval();
  }
}

// The ids of the nodes an evaluation of `outputs` would compute (status unscheduled, with
// their siblings) go to `pending`; the ids of the computed arrays it would read go to
// `boundary`. Reads the graph only, and keeps no handle (holding references to the nodes
// while MLX evaluates them slowed GPU evaluation down five-fold).
void scan_graph(
    const ArrayList& outputs, rust::Vec<uint64_t>& pending, rust::Vec<uint64_t>& boundary) {
  std::unordered_set<std::uintptr_t> seen;
  std::vector<array> stack(outputs.arrays.begin(), outputs.arrays.end());
  while (!stack.empty()) {
    array a = std::move(stack.back());
    stack.pop_back();
    if (!seen.insert(a.id()).second) {
      continue;
    }
    if (a.status() != array::Status::unscheduled) {
      boundary.push_back(static_cast<uint64_t>(a.id()));
      continue;
    }
    pending.push_back(static_cast<uint64_t>(a.id()));
    for (const auto& s : a.siblings()) {
      if (seen.insert(s.id()).second) {
        pending.push_back(static_cast<uint64_t>(s.id()));
      }
    }
    for (const auto& in : a.inputs()) {
      stack.push_back(in);
    }
  }
}

uint64_t array_id(const array& a) {
  return static_cast<uint64_t>(a.id());
}

size_t get_active_memory() {
  return mx::get_active_memory();
}

size_t get_peak_memory() {
  return mx::get_peak_memory();
}

void reset_peak_memory() {
  mx::reset_peak_memory();
}

size_t get_cache_memory() {
  return mx::get_cache_memory();
}

size_t physical_memory() {
  long pages = sysconf(_SC_PHYS_PAGES);
  long page_size = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page_size > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page_size)
                                    : 0;
}

size_t get_memory_limit() {
  return mx::get_memory_limit();
}

size_t set_cache_limit(size_t limit) {
  return mx::set_cache_limit(limit);
}

void clear_cache() {
  mx::clear_cache();
}

std::unique_ptr<array> full_scalar(
    rust::Slice<const int32_t> shape, double value, Dtype dtype, StreamRef s) {
  auto dt = to_mx(dtype);
  return boxed(mx::full(to_shape(shape), array(value, dt), dt, to_mx(s)));
}

std::unique_ptr<array> arange(double start, double stop, double step, Dtype dtype, StreamRef s) {
  return boxed(mx::arange(start, stop, step, to_mx(dtype), to_mx(s)));
}

std::unique_ptr<array> random_uniform(
    rust::Slice<const int32_t> shape, Dtype dtype, uint64_t seed, StreamRef s) {
  auto key = mx::random::key(seed);
  return boxed(mx::random::uniform(to_shape(shape), to_mx(dtype), key, to_mx(s)));
}

// MLX's CPU exp, sigmoid, erf, erfinv, sin and cos are float polynomials (62 ulp,
// erf(1e-7) = 0) and its rsqrt is off by 1.5 ulp;
// on CPU streams these run our kernels, within 1 ulp.
static std::optional<kernels::AccurateFn> accurate_fn(UnaryOp op) {
  switch (op) {
    case UnaryOp::Exp: return kernels::AccurateFn::Exp;
    case UnaryOp::Sigmoid: return kernels::AccurateFn::Sigmoid;
    case UnaryOp::Erf: return kernels::AccurateFn::Erf;
    case UnaryOp::ErfInv: return kernels::AccurateFn::ErfInv;
    case UnaryOp::Sin: return kernels::AccurateFn::Sin;
    case UnaryOp::Cos: return kernels::AccurateFn::Cos;
    case UnaryOp::Rsqrt: return kernels::AccurateFn::Rsqrt;
    case UnaryOp::Erfc: return kernels::AccurateFn::Erfc;
    case UnaryOp::Cbrt: return kernels::AccurateFn::Cbrt;
    case UnaryOp::Gelu: return kernels::AccurateFn::Gelu;
    case UnaryOp::Tanh: return kernels::AccurateFn::Tanh;
    case UnaryOp::Log: return kernels::AccurateFn::Log;
    default: return std::nullopt;
  }
}

std::unique_ptr<array> unary(UnaryOp op, const array& a, StreamRef s) {
  auto st = to_mx(s);
  if (auto fn = accurate_fn(op); fn && kernels::has_accurate_unary(st, a.dtype())) {
    return boxed(kernels::accurate_unary(*fn, a, st));
  }
  // MLX's GPU sigmoid computes 1 / (1 + exp(|x|)) in the array's type: in f16 exp overflows
  // from |x| = 11.1 on, so sigmoid(-11.1) is 0 instead of 1.5e-5. Half types go through f32.
  if (op == UnaryOp::Sigmoid && (a.dtype() == mx::float16 || a.dtype() == mx::bfloat16)) {
    return boxed(mx::astype(mx::sigmoid(mx::astype(a, mx::float32, st), st), a.dtype(), st));
  }
  switch (op) {
    case UnaryOp::Abs: return boxed(mx::abs(a, st));
    case UnaryOp::Ceil: return boxed(mx::ceil(a, st));
    case UnaryOp::Floor: return boxed(mx::floor(a, st));
    case UnaryOp::Round: return boxed(mx::round(a, st));
    case UnaryOp::Negative: return boxed(mx::negative(a, st));
    case UnaryOp::Sign: return boxed(mx::sign(a, st));
    case UnaryOp::Exp: return boxed(mx::exp(a, st));
    case UnaryOp::Expm1: return boxed(mx::expm1(a, st));
    case UnaryOp::Log: return boxed(mx::log(a, st));
    case UnaryOp::Log1p: return boxed(mx::log1p(a, st));
    case UnaryOp::Sqrt: return boxed(mx::sqrt(a, st));
    case UnaryOp::Rsqrt: return boxed(mx::rsqrt(a, st));
    case UnaryOp::Sin: return boxed(mx::sin(a, st));
    case UnaryOp::Cos: return boxed(mx::cos(a, st));
    case UnaryOp::Tan: return boxed(mx::tan(a, st));
    case UnaryOp::Asin: return boxed(mx::arcsin(a, st));
    case UnaryOp::Acos: return boxed(mx::arccos(a, st));
    case UnaryOp::Atan: return boxed(mx::arctan(a, st));
    case UnaryOp::Sinh: return boxed(mx::sinh(a, st));
    case UnaryOp::Cosh: return boxed(mx::cosh(a, st));
    case UnaryOp::Tanh: return boxed(mx::tanh(a, st));
    case UnaryOp::Asinh: return boxed(mx::arcsinh(a, st));
    case UnaryOp::Acosh: return boxed(mx::arccosh(a, st));
    case UnaryOp::Atanh: return boxed(mx::arctanh(a, st));
    case UnaryOp::Sigmoid: return boxed(mx::sigmoid(a, st));
    case UnaryOp::Erf: return boxed(mx::erf(a, st));
    case UnaryOp::ErfInv: return boxed(mx::erfinv(a, st));
    case UnaryOp::LogicalNot: return boxed(mx::logical_not(a, st));
    case UnaryOp::BitwiseNot: return boxed(mx::bitwise_invert(a, st));
    case UnaryOp::IsNan: return boxed(mx::isnan(a, st));
    case UnaryOp::IsInf: return boxed(mx::isinf(a, st));
    case UnaryOp::Real: return boxed(mx::real(a, st));
    case UnaryOp::Imag: return boxed(mx::imag(a, st));
    case UnaryOp::Conjugate: return boxed(mx::conjugate(a, st));
    case UnaryOp::Erfc:
    case UnaryOp::Cbrt:
      throw std::invalid_argument(
          "erfc and cbrt take real floating-point arrays on a CPU stream");
    case UnaryOp::Gelu: {
      // Elsewhere than our CPU kernel: the composed form in the array's type (one fused
      // kernel under mx::compile).
      if (!mx::issubdtype(a.dtype(), mx::floating)) {
        throw std::invalid_argument("gelu takes real floating-point arrays");
      }
      auto half = mx::array(0.5, a.dtype());
      auto scale = mx::array(M_SQRT1_2, a.dtype());
      auto q = mx::add(mx::array(1.0, a.dtype()), mx::erf(mx::multiply(a, scale, st), st), st);
      return boxed(mx::multiply(mx::multiply(a, half, st), q, st));
    }
  }
  throw std::invalid_argument("unknown unary op code");
}

std::unique_ptr<array> binary(BinaryOp op, const array& a, const array& b, StreamRef s) {
  auto st = to_mx(s);
  switch (op) {
    case BinaryOp::Add: return boxed(mx::add(a, b, st));
    case BinaryOp::Subtract: return boxed(mx::subtract(a, b, st));
    case BinaryOp::Multiply: return boxed(mx::multiply(a, b, st));
    case BinaryOp::Divide: return boxed(mx::divide(a, b, st));
    case BinaryOp::FloorDivide: return boxed(integer_division(true, a, b, st));
    case BinaryOp::Remainder: return boxed(integer_division(false, a, b, st));
    case BinaryOp::Power: return boxed(mx::power(a, b, st));
    case BinaryOp::Maximum: return boxed(mx::maximum(a, b, st));
    case BinaryOp::Minimum: return boxed(mx::minimum(a, b, st));
    case BinaryOp::Atan2: return boxed(mx::arctan2(a, b, st));
    case BinaryOp::Equal: return boxed(mx::equal(a, b, st));
    case BinaryOp::NotEqual: return boxed(mx::not_equal(a, b, st));
    case BinaryOp::Less: return boxed(mx::less(a, b, st));
    case BinaryOp::LessEqual: return boxed(mx::less_equal(a, b, st));
    case BinaryOp::Greater: return boxed(mx::greater(a, b, st));
    case BinaryOp::GreaterEqual: return boxed(mx::greater_equal(a, b, st));
    case BinaryOp::LogicalAnd: return boxed(mx::logical_and(a, b, st));
    case BinaryOp::LogicalOr: return boxed(mx::logical_or(a, b, st));
    case BinaryOp::BitwiseAnd: return boxed(mx::bitwise_and(a, b, st));
    case BinaryOp::BitwiseOr: return boxed(mx::bitwise_or(a, b, st));
    case BinaryOp::BitwiseXor: return boxed(mx::bitwise_xor(a, b, st));
    case BinaryOp::LeftShift: return boxed(mx::left_shift(a, b, st));
    case BinaryOp::RightShift: return boxed(mx::right_shift(a, b, st));
  }
  throw std::invalid_argument("unknown binary op code");
}

// `axes` as [rows, count] when they are the array's last ones (as softmax and attention
// reduce), so that the array is read as a row-contiguous matrix with no copy; nullopt for
// other axes, duplicates, empty extents and extents past MLX's 32-bit dimensions.
static std::optional<std::pair<int32_t, int32_t>> trailing_matrix(
    const char* op, const array& a, const std::vector<int>& axes) {
  int ndim = static_cast<int>(a.ndim());
  std::vector<int> normalized;
  for (int axis : axes) {
    normalized.push_back(checked_axis(op, a, axis));
  }
  std::sort(normalized.begin(), normalized.end());
  if (normalized.empty() ||
      std::adjacent_find(normalized.begin(), normalized.end()) != normalized.end() ||
      normalized.front() != ndim - static_cast<int>(normalized.size())) {
    return std::nullopt;
  }
  int64_t rows = 1, count = 1;
  for (int d = 0; d < ndim; ++d) {
    (d < normalized.front() ? rows : count) *= a.shape(d);
  }
  if (rows < 1 || count < 1 || rows > std::numeric_limits<int32_t>::max() ||
      count > std::numeric_limits<int32_t>::max()) {
    return std::nullopt;
  }
  return std::pair<int32_t, int32_t>{static_cast<int32_t>(rows), static_cast<int32_t>(count)};
}

// Max or min over the trailing axes through our threaded kernel; nullopt elsewhere (MLX's
// reduction reads other axes in place).
static std::optional<array> trailing_extremum(
    bool max, const array& a, const std::vector<int>& axes, bool keep_dims, const mx::Stream& st) {
  auto matrix = trailing_matrix(max ? "max" : "min", a, axes);
  if (!matrix) {
    return std::nullopt;
  }
  int first = static_cast<int>(a.ndim()) - static_cast<int>(axes.size());
  mx::Shape kept_shape, kept_dims_shape = a.shape();
  for (int d = 0; d < static_cast<int>(a.ndim()); ++d) {
    if (d < first) {
      kept_shape.push_back(a.shape(d));
    } else {
      kept_dims_shape[d] = 1;
    }
  }
  auto r = kernels::fast_extremum(max, mx::reshape(a, {matrix->first, matrix->second}, st), st);
  return mx::reshape(r, keep_dims ? kept_dims_shape : kept_shape, st);
}

std::unique_ptr<array> reduce(
    ReduceOp op, const array& a, rust::Slice<const int32_t> axes, bool keep_dims, StreamRef s) {
  auto st = to_mx(s);
  auto ax = to_ints(axes);
  if (op == ReduceOp::Sum && kernels::has_accurate_sum(st, a.dtype())) {
    // Axis by axis, each kept as size 1, then dropped unless keep_dims.
    std::vector<int> normalized;
    for (int axis : ax) {
      int n = checked_axis("sum", a, axis);
      if (std::find(normalized.begin(), normalized.end(), n) != normalized.end()) {
        throw std::invalid_argument("[sum] axis " + std::to_string(axis) + " is given twice");
      }
      normalized.push_back(n);
    }
    if (normalized.empty()) {
      return boxed(mx::sum(a, ax, keep_dims, st));
    }
    std::sort(normalized.begin(), normalized.end());
    mx::Shape kept_dims_shape = a.shape(), kept_shape;
    std::vector<int> perm;
    for (int d = 0; d < static_cast<int>(a.ndim()); ++d) {
      if (std::binary_search(normalized.begin(), normalized.end(), d)) {
        kept_dims_shape[d] = 1;
      } else {
        perm.push_back(d);
        kept_shape.push_back(a.shape(d));
      }
    }
    // Consecutive axes (one, or a run): seen in place as [outer, count, inner] (a reshape,
    // no copy) and summed over the middle axis; moving them last would copy the array
    // through a transpose (a column sum of 4096x4096 f32 took 130 ms that way, 10 in place).
    int64_t outer = 1, count = 1, inner = 1;
    for (int d = 0; d < static_cast<int>(a.ndim()); ++d) {
      (d < normalized.front() ? outer : d > normalized.back() ? inner : count) *= a.shape(d);
    }
    bool run = normalized.back() - normalized.front() + 1 == static_cast<int>(normalized.size());
    if (run && outer <= std::numeric_limits<int32_t>::max() &&
        count <= std::numeric_limits<int32_t>::max() &&
        inner <= std::numeric_limits<int32_t>::max()) {
      mx::Shape seen = {static_cast<int32_t>(outer), static_cast<int32_t>(count),
                        static_cast<int32_t>(inner)};
      auto r = kernels::accurate_sum(mx::reshape(a, seen, st), 1, st);
      return boxed(mx::reshape(r, keep_dims ? kept_dims_shape : kept_shape, st));
    }
    // Other axes moved last and flattened into one, so that the sum is rounded once; axis
    // by axis when their product does not fit MLX's 32-bit shapes.
    count = 1;
    for (int d : normalized) {
      perm.push_back(d);
      count *= a.shape(d);
    }
    array r = a;
    if (count <= std::numeric_limits<int32_t>::max()) {
      bool identity = true;
      for (size_t i = 0; i < perm.size(); ++i) {
        identity = identity && perm[i] == static_cast<int>(i);
      }
      array moved = identity ? a : mx::transpose(a, perm, st);
      mx::Shape flat = kept_shape;
      flat.push_back(static_cast<int32_t>(count));
      r = kernels::accurate_sum(mx::reshape(moved, flat, st), static_cast<int>(flat.size()) - 1,
                                st);
    } else {
      for (int axis : normalized) {
        r = kernels::accurate_sum(r, axis, st);
      }
    }
    return boxed(mx::reshape(r, keep_dims ? kept_dims_shape : kept_shape, st));
  }
  if ((op == ReduceOp::Max || op == ReduceOp::Min) && kernels::has_fast_extremum(st, a.dtype())) {
    if (auto r = trailing_extremum(op == ReduceOp::Max, a, ax, keep_dims, st)) {
      return boxed(std::move(*r));
    }
  }
  switch (op) {
    case ReduceOp::Sum: return boxed(mx::sum(a, ax, keep_dims, st));
    case ReduceOp::Prod: return boxed(mx::prod(a, ax, keep_dims, st));
    case ReduceOp::Max: return boxed(mx::max(a, ax, keep_dims, st));
    case ReduceOp::Min: return boxed(mx::min(a, ax, keep_dims, st));
    case ReduceOp::All: return boxed(mx::all(a, ax, keep_dims, st));
    case ReduceOp::Any: return boxed(mx::any(a, ax, keep_dims, st));
    case ReduceOp::Mean: return boxed(mx::mean(a, ax, keep_dims, st));
  }
  throw std::invalid_argument("unknown reduce op code");
}

std::unique_ptr<array> astype(const array& a, Dtype dtype, StreamRef s) {
  return boxed(mx::astype(a, to_mx(dtype), to_mx(s)));
}

std::unique_ptr<array> reshape(const array& a, rust::Slice<const int32_t> shape, StreamRef s) {
  return boxed(mx::reshape(a, to_shape(shape), to_mx(s)));
}

std::unique_ptr<array> transpose(const array& a, rust::Slice<const int32_t> axes, StreamRef s) {
  return boxed(mx::transpose(a, to_ints(axes), to_mx(s)));
}

// A strided slice with step -1 along `axis`: a view, read in place by the ops that follow
// (reversing through a gather of reversed indices cost 16 ns per element on the CPU).
std::unique_ptr<array> reverse(const array& a, int32_t axis, StreamRef s) {
  int ax = checked_axis("reverse", a, axis);
  int32_t n = a.shape(ax);
  if (n <= 1) {
    return boxed(a);
  }
  mx::Shape start(a.ndim(), 0), stop = a.shape(), strides(a.ndim(), 1);
  start[ax] = n - 1;
  stop[ax] = -n - 1;
  strides[ax] = -1;
  return boxed(mx::slice(a, start, stop, strides, to_mx(s)));
}

// Layer norm over the last axis of x with scale g and shift b (both [k], k the last axis's
// size): on CPU streams for f32 our kernel (one pass per row in double); elsewhere MLX's
// fast::layer_norm (its fused kernel on the GPU).
std::unique_ptr<array> layer_norm(
    const array& x, const array& g, const array& b, double eps, StreamRef s) {
  auto st = to_mx(s);
  if (x.ndim() < 1 || x.shape(-1) < 1 || g.ndim() != 1 || b.ndim() != 1 ||
      g.shape(0) != x.shape(-1) || b.shape(0) != x.shape(-1) || g.dtype() != x.dtype() ||
      b.dtype() != x.dtype() || !mx::issubdtype(x.dtype(), mx::floating) || !(eps >= 0)) {
    throw std::invalid_argument(
        "layer_norm takes a float array, scale and shift vectors of its last axis's size and "
        "its type, and eps >= 0");
  }
  if (kernels::has_fast_extremum(st, x.dtype())) {
    int32_t k = x.shape(-1);
    int32_t rows = static_cast<int32_t>(x.size() / static_cast<size_t>(k));
    auto y = kernels::fast_layer_norm(mx::reshape(x, {rows, k}, st), g, b, eps, st);
    return boxed(mx::reshape(y, x.shape(), st));
  }
  return boxed(mx::fast::layer_norm(x, g, b, static_cast<float>(eps), st));
}

std::unique_ptr<array> rms_norm(const array& x, const array& w, double eps, StreamRef s) {
  if (x.ndim() < 1 || x.shape(-1) < 1 || w.ndim() != 1 || w.shape(0) != x.shape(-1) ||
      !mx::issubdtype(x.dtype(), mx::floating) || !mx::issubdtype(w.dtype(), mx::floating) ||
      !(eps >= 0)) {
    throw std::invalid_argument(
        "rms_norm takes a float array, a float weight vector of its last axis's size, and "
        "eps >= 0");
  }
  auto st = to_mx(s);
  // f32 on the CPU: our one-pass kernel (MLX's CPU rms_norm composes four ops).
  if (kernels::has_fast_extremum(st, x.dtype()) && w.dtype() == x.dtype()) {
    int32_t k = x.shape(-1);
    int32_t rows = static_cast<int32_t>(x.size() / static_cast<size_t>(k));
    auto y = kernels::fast_rms_norm(mx::reshape(x, {rows, k}, st), w, eps, st);
    return boxed(mx::reshape(y, x.shape(), st));
  }
  return boxed(mx::fast::rms_norm(x, w, static_cast<float>(eps), st));
}

// inputs: x, the offset (an integer scalar or one per batch entry), and optionally the
// frequencies (then `base` is unused).
std::unique_ptr<array> rope(const ArrayList& inputs, int32_t dims, bool traditional, double base,
                            double scale, StreamRef s) {
  const auto& in = inputs.arrays;
  if (in.size() != 2 && in.size() != 3) {
    throw std::invalid_argument("rope takes x, an offset and optionally frequencies");
  }
  const auto& x = in[0];
  if (x.ndim() < 3 || !mx::issubdtype(x.dtype(), mx::floating) || dims < 2 || dims % 2 != 0 ||
      dims > x.shape(-1) || in[1].ndim() > 1 || !mx::issubdtype(in[1].dtype(), mx::integer) ||
      (in[1].size() != 1 && in[1].size() != static_cast<size_t>(x.shape(0)))) {
    throw std::invalid_argument(
        "rope takes a float array of rank 3 or more, an even dims within its last axis, and an "
        "integer offset (a scalar or one per batch entry)");
  }
  std::optional<mx::array> freqs;
  std::optional<float> b = static_cast<float>(base);
  if (in.size() == 3) {
    if (in[2].ndim() != 1 || in[2].shape(0) != dims / 2) {
      throw std::invalid_argument("rope: the frequencies must have dims / 2 values");
    }
    freqs = in[2];
    b = std::nullopt;
  }
  return boxed(mx::fast::rope(x, dims, traditional, b, static_cast<float>(scale), in[1], freqs,
                              to_mx(s)));
}

// inputs: q, k, v, then the mask when `mask` is 2 (an array: boolean or additive), then the
// sinks when `sinks`. `mask`: 0 none, 1 causal, 2 an array.
std::unique_ptr<array> attention(const ArrayList& inputs, double scale, uint8_t mask,
                                 bool sinks, StreamRef s) {
  const auto& in = inputs.arrays;
  const size_t want = 3 + (mask == 2 ? 1 : 0) + (sinks ? 1 : 0);
  if (mask > 2 || in.size() != want) {
    throw std::invalid_argument(
        "attention takes q, k, v, a mask when the mask mode is an array, and sinks when asked");
  }
  for (size_t i = 0; i < 3; ++i) {
    if (in[i].ndim() != 4) {
      throw std::invalid_argument("attention takes q, k and v of rank 4");
    }
  }
  std::optional<mx::array> mask_arr;
  if (mask == 2) {
    mask_arr = in[3];
  }
  std::optional<mx::array> sinks_arr;
  if (sinks) {
    sinks_arr = in.back();
  }
  const std::string mode = mask == 1 ? "causal" : "";
  return boxed(mx::fast::scaled_dot_product_attention(in[0], in[1], in[2],
                                                      static_cast<float>(scale), mode, mask_arr,
                                                      sinks_arr, false, to_mx(s)));
}

namespace {

// Quantization modes, numbered as mlx-bind's QuantMode: affine (scales and biases per group),
// then the microscaling float formats (scales only).
const char* quant_mode(uint8_t mode) {
  switch (mode) {
    case 0: return "affine";
    case 1: return "mxfp4";
    case 2: return "mxfp8";
    case 3: return "nvfp4";
  }
  throw std::invalid_argument("quantization: the mode is 0 (affine), 1 (mxfp4), 2 (mxfp8) or 3 (nvfp4)");
}

// Ranges checked before MLX sees them (MLX checks the combinations).
void check_quant(int32_t group_size, int32_t bits, uint8_t mode) {
  quant_mode(mode);
  if (group_size != 16 && group_size != 32 && group_size != 64 && group_size != 128) {
    throw std::invalid_argument("quantization: the group size is 16, 32, 64 or 128, got " +
                                std::to_string(group_size));
  }
  if (bits < 2 || bits > 8 || bits == 7) {
    throw std::invalid_argument("quantization: bits are 2, 3, 4, 5, 6 or 8, got " +
                                std::to_string(bits));
  }
}

// The weight triple of a quantized operand: [w, scales] then the biases in affine mode.
size_t quant_operands(uint8_t mode) { return mode == 0 ? 3 : 2; }

// MLX's quantized kernels divide by the sizes of their operands (an empty x raised SIGFPE in
// the CPU matmul): empty arrays are refused. Nx has no empty axes, so only direct callers
// meet this.
void check_nonempty(const char* op, const std::vector<array>& in) {
  for (const auto& a : in) {
    if (a.size() == 0) {
      throw std::invalid_argument(std::string(op) + " takes no empty arrays");
    }
  }
}

void check_packed(const array& w, const array& scales) {
  if (w.dtype() != mx::uint32) {
    throw std::invalid_argument("quantization: packed weights are uint32");
  }
  if (w.ndim() < 2 || scales.ndim() != w.ndim()) {
    throw std::invalid_argument(
        "quantization: packed weights and their scales have the same rank, at least 2");
  }
}

}  // namespace

array matmul_routed(const array& a, const array& b, const mx::Stream& st);

namespace {

bool real_float(const array& a) {
  return a.dtype() == mx::float32 || a.dtype() == mx::float16 || a.dtype() == mx::bfloat16;
}

// Our CPU kernels serve affine 2-, 4- and 8-bit weights of rank 2 (MLX's CPU kernels are
// scalar loops): float32 inside, the result in x's type.
bool quantized_on_cpu(const mx::Stream& st, uint8_t mode, int32_t bits, int32_t group_size,
                      const array& w, const array& scales) {
  return mode == 0 && kernels::has_quantized_cpu(st, bits, group_size) && w.ndim() == 2 &&
         scales.ndim() == 2 && w.dtype() == mx::uint32 &&
         w.shape(1) * 32 == scales.shape(1) * group_size * bits && real_float(scales);
}

// Up to this many rows of x, the quantized kernel; past it, the weights dequantized once and
// a BLAS matmul, which reuses each weight better (2 vCPUs, 16 x 4096 times 4096 x 4096 4-bit:
// 27 ms in the kernel, 19 ms dequantized and multiplied).
constexpr int64_t kQuantizedKernelRows = 8;

// The checks the ops on a quantized weight share: the layout's ranges, `count` operands (a
// too-short list is refused before it is indexed), none empty, and the packed weight and its
// scales at `w`; the biases (at `w + 2`) in affine mode.
std::optional<array> quantized_operands(const char* op, const std::vector<array>& in,
                                        size_t count, size_t w, int32_t group_size, int32_t bits,
                                        uint8_t mode, const char* takes) {
  check_quant(group_size, bits, mode);
  if (in.size() != count) {
    throw std::invalid_argument(std::string(op) + " takes " + takes);
  }
  check_nonempty(op, in);
  check_packed(in[w], in[w + 1]);
  if (mode == 0) return in[w + 2];
  return std::nullopt;
}

}  // namespace

std::unique_ptr<ArrayList> quantize(const array& w, int32_t group_size, int32_t bits, uint8_t mode,
                                    StreamRef s) {
  check_quant(group_size, bits, mode);
  if (w.ndim() < 2 || !mx::issubdtype(w.dtype(), mx::floating)) {
    throw std::invalid_argument("quantize takes a float array of rank 2 or more");
  }
  check_nonempty("quantize", {w});
  auto list = std::make_unique<ArrayList>();
  list->arrays = mx::quantize(w, group_size, bits, quant_mode(mode), std::nullopt, to_mx(s));
  return list;
}

std::unique_ptr<array> dequantize(const ArrayList& inputs, int32_t group_size, int32_t bits,
                                  uint8_t mode, Dtype dtype, StreamRef s) {
  const auto& in = inputs.arrays;
  auto biases = quantized_operands("dequantize", in, quant_operands(mode), 0, group_size, bits,
                                   mode, "w and scales, and biases in affine mode");
  auto out = to_mx(dtype);
  if (!mx::issubdtype(out, mx::floating)) {
    throw std::invalid_argument("dequantize: the result type is a float type");
  }
  auto st = to_mx(s);
  if (quantized_on_cpu(st, mode, bits, group_size, in[0], in[1]) && in[2].shape() == in[1].shape()) {
    auto f = kernels::dequantize(in[0], mx::astype(in[1], mx::float32, st),
                                 mx::astype(in[2], mx::float32, st), bits, group_size, st);
    return boxed(mx::astype(f, out, st));
  }
  return boxed(mx::dequantize(in[0], in[1], biases, group_size, bits, quant_mode(mode),
                              std::nullopt, out, to_mx(s)));
}

std::unique_ptr<array> quantized_matmul(const ArrayList& inputs, bool transpose,
                                        int32_t group_size, int32_t bits, uint8_t mode,
                                        StreamRef s) {
  const auto& in = inputs.arrays;
  auto biases = quantized_operands("quantized_matmul", in, 1 + quant_operands(mode), 1,
                                   group_size, bits, mode,
                                   "x, w and scales, and biases in affine mode");
  if (in[0].ndim() < 1 || !mx::issubdtype(in[0].dtype(), mx::floating)) {
    throw std::invalid_argument("quantized_matmul takes a float x");
  }
  auto st = to_mx(s);
  const auto& x = in[0];
  if (transpose && quantized_on_cpu(st, mode, bits, group_size, in[1], in[2]) &&
      in[3].shape() == in[2].shape() && real_float(x) &&
      x.shape(-1) == in[2].shape(1) * group_size) {
    const int64_t k = x.shape(-1);
    auto x2 = mx::reshape(mx::astype(x, mx::float32, st), {-1, static_cast<int>(k)}, st);
    auto sc = mx::astype(in[2], mx::float32, st);
    auto bi = mx::astype(in[3], mx::float32, st);
    auto y = x2.shape(0) <= kQuantizedKernelRows
                 ? kernels::quantized_matmul(x2, in[1], sc, bi, bits, group_size, st)
                 : matmul_routed(x2,
                                 mx::transpose(kernels::dequantize(in[1], sc, bi, bits,
                                                                   group_size, st),
                                               st),
                                 st);
    auto shape = x.shape();
    shape.back() = in[1].shape(0);
    return boxed(mx::astype(mx::reshape(y, shape, st), x.dtype(), st));
  }
  return boxed(mx::quantized_matmul(in[0], in[1], in[2], biases, transpose, group_size, bits,
                                    quant_mode(mode), to_mx(s)));
}

std::unique_ptr<array> gather_qmm(const ArrayList& inputs, bool has_lhs, bool has_rhs,
                                  bool transpose, int32_t group_size, int32_t bits, uint8_t mode,
                                  StreamRef s) {
  const auto& in = inputs.arrays;
  const size_t q = 1 + quant_operands(mode);
  auto biases = quantized_operands(
      "gather_qmm", in, q + (has_lhs ? 1 : 0) + (has_rhs ? 1 : 0), 1, group_size, bits, mode,
      "x, w, scales (and biases in affine mode), then the indices asked for");
  if (in[0].ndim() < 2 || !mx::issubdtype(in[0].dtype(), mx::floating)) {
    throw std::invalid_argument("gather_qmm takes a float x of rank 2 or more");
  }
  std::optional<mx::array> lhs;
  std::optional<mx::array> rhs;
  // Indices count matrices: lhs over x's leading axes, rhs over w's; clamped into them.
  auto batch = [](const array& a) {
    int64_t n = 1;
    for (size_t i = 0; i + 2 < a.ndim(); ++i) n *= a.shape(static_cast<int>(i));
    return static_cast<int>(std::min<int64_t>(n, INT32_MAX));
  };
  auto st = to_mx(s);
  size_t next = q;
  if (has_lhs) {
    lhs = mx::astype(clamped_indices("gather_qmm", in[next++], batch(in[0]), st), mx::uint32, st);
  }
  if (has_rhs) {
    rhs = mx::astype(clamped_indices("gather_qmm", in[next++], batch(in[1]), st), mx::uint32, st);
  }
  return boxed(mx::gather_qmm(in[0], in[1], in[2], biases, lhs, rhs, transpose, group_size, bits,
                              quant_mode(mode), std::nullopt, false, st));
}

std::unique_ptr<array> broadcast_to(const array& a, rust::Slice<const int32_t> shape, StreamRef s) {
  return boxed(mx::broadcast_to(a, to_shape(shape), to_mx(s)));
}

namespace {

// f32 on the CPU over equal batch axes (attention heads), when each product is small enough
// that MLX's loop of threaded sgemm calls loses to one batched call (at most 2^24
// multiply-adds an item: 12 heads of 128x64x128 ran 1.4-2.8x faster batched, 2 vCPUs), and
// above 100^3: OpenBLAS 0.3.29's builds for several CPUs (DYNAMIC_ARCH) call an unresolved
// kernel address for batched items of at most 100^3 multiply-adds (its small-matrix path)
// and crash; those stay on MLX's loop, where OpenBLAS runs each on one thread anyway.
bool batched_small(const array& a, const array& b, const mx::Stream& st) {
  if (!kernels::has_batched_matmul(st, a.dtype()) || b.dtype() != a.dtype() || a.ndim() < 3 ||
      b.ndim() != a.ndim() || a.shape(-1) != b.shape(-2)) {
    return false;
  }
  size_t items = 1;
  for (size_t d = 0; d + 2 < a.ndim(); ++d) {
    if (a.shape(static_cast<int>(d)) != b.shape(static_cast<int>(d))) {
      return false;
    }
    items *= static_cast<size_t>(a.shape(static_cast<int>(d)));
  }
  const double work = static_cast<double>(a.shape(-2)) * a.shape(-1) * b.shape(-1);
  return items >= 2 && work > 1.0e6 && work <= 16777216.0 &&
         items <= static_cast<size_t>(std::numeric_limits<int32_t>::max());
}

}  // namespace

// MLX's matmul with our CPU routes: f16/bf16 through f32 (MLX's CPU half-precision GEMM is
// a loop without BLAS: 1024^2 bf16 took 390 ms against 12 ms in f32 on 2 vCPUs; accumulating
// in f32 and rounding once is also the more accurate), single rows and columns through
// sgemv, small batched items through sgemm_batch.
array matmul_routed(const array& a, const array& b, const mx::Stream& st) {
  if (st.device.type == mx::Device::cpu && b.dtype() == a.dtype() &&
      (a.dtype() == mx::float16 || a.dtype() == mx::bfloat16)) {
    auto r = matmul_routed(mx::astype(a, mx::float32, st), mx::astype(b, mx::float32, st), st);
    return mx::astype(r, a.dtype(), st);
  }
  // f32 on the CPU with a single row (a decode step's [1, k] x [k, n]) or a single column:
  // the BLAS's sgemv, not MLX's sgemm (3-9x faster with one row on OpenBLAS).
  if (kernels::has_matvec(st, a.dtype()) && b.dtype() == a.dtype() && a.ndim() >= 2 &&
      b.ndim() == 2 && a.shape(-1) == b.shape(0) && a.shape(-1) >= 1 && b.shape(1) >= 1 &&
      a.size() == static_cast<size_t>(a.shape(-1)) &&
      a.shape(-1) <= std::numeric_limits<int32_t>::max() &&
      b.shape(1) <= std::numeric_limits<int32_t>::max()) {
    auto shape = a.shape();
    shape.back() = b.shape(1);
    auto y = kernels::matvec(mx::transpose(b, {1, 0}, st), mx::reshape(a, {a.shape(-1)}, st), st);
    return mx::reshape(y, shape, st);
  }
  if (kernels::has_matvec(st, a.dtype()) && b.dtype() == a.dtype() && a.ndim() == 2 &&
      b.ndim() == 2 && b.shape(1) == 1 && a.shape(1) == b.shape(0) && a.shape(0) > 1 &&
      a.shape(1) >= 1 && a.shape(0) <= std::numeric_limits<int32_t>::max() &&
      a.shape(1) <= std::numeric_limits<int32_t>::max()) {
    auto y = kernels::matvec(a, mx::reshape(b, {b.shape(0)}, st), st);
    return mx::reshape(y, {a.shape(0), 1}, st);
  }
  if (batched_small(a, b, st)) {
    return kernels::batched_matmul(a, b, st);
  }
  return mx::matmul(a, b, st);
}

std::unique_ptr<array> matmul(const array& a, const array& b, StreamRef s) {
  return boxed(matmul_routed(a, b, to_mx(s)));
}

std::unique_ptr<array> where_(const array& cond, const array& a, const array& b, StreamRef s) {
  return boxed(mx::where(cond, a, b, to_mx(s)));
}

std::unique_ptr<array> concatenate(const ArrayList& list, int32_t axis, StreamRef s) {
  return boxed(mx::concatenate(list.arrays, axis, to_mx(s)));
}

std::unique_ptr<array> slice(
    const array& a,
    rust::Slice<const int32_t> start,
    rust::Slice<const int32_t> stop,
    rust::Slice<const int32_t> strides,
    StreamRef s) {
  for (auto step : strides) {
    if (step == 0) {
      throw std::invalid_argument("slice: a stride of 0 is not allowed");
    }
  }
  return boxed(mx::slice(a, to_shape(start), to_shape(stop), to_shape(strides), to_mx(s)));
}

std::unique_ptr<array> slice_update(
    const array& src,
    const array& update,
    rust::Slice<const int32_t> start,
    rust::Slice<const int32_t> stop,
    StreamRef s) {
  return boxed(mx::slice_update(src, update, to_shape(start), to_shape(stop), to_mx(s)));
}

std::unique_ptr<array> slice_dynamic(
    const array& a,
    const array& start,
    rust::Slice<const int32_t> axes,
    rust::Slice<const int32_t> sizes,
    StreamRef s) {
  return boxed(mx::slice(
      a, start, std::vector<int>(axes.begin(), axes.end()), to_shape(sizes), to_mx(s)));
}

std::unique_ptr<array> slice_update_dynamic(
    const array& src,
    const array& update,
    const array& start,
    rust::Slice<const int32_t> axes,
    StreamRef s) {
  return boxed(mx::slice_update(
      src, update, start, std::vector<int>(axes.begin(), axes.end()), to_mx(s)));
}

std::unique_ptr<array> pad(
    const array& a,
    rust::Slice<const int32_t> low,
    rust::Slice<const int32_t> high,
    const array& value,
    StreamRef s) {
  // Nothing to pad (a scalar, or all widths 0): the array itself. MLX's GPU pad of a
  // scalar returns the pad value.
  bool none = std::all_of(low.begin(), low.end(), [](int32_t w) { return w == 0; }) &&
              std::all_of(high.begin(), high.end(), [](int32_t w) { return w == 0; });
  if (none && low.size() == a.ndim() && high.size() == a.ndim()) {
    return boxed(a);
  }
  std::vector<int> axes(a.ndim());
  for (int i = 0; i < static_cast<int>(a.ndim()); ++i) {
    axes[i] = i;
  }
  return boxed(mx::pad(a, axes, to_shape(low), to_shape(high), value, "constant", to_mx(s)));
}

std::unique_ptr<array> take(const array& a, const array& indices, int32_t axis, StreamRef s) {
  auto st = to_mx(s);
  int ax = checked_axis("take", a, axis);
  return boxed(mx::take(a, clamped_indices("take", indices, a.shape(ax), st), ax, st));
}

std::unique_ptr<array> take_along_axis(
    const array& a, const array& indices, int32_t axis, StreamRef s) {
  auto st = to_mx(s);
  int ax = checked_axis("take_along_axis", a, axis);
  auto idx = clamped_indices("take_along_axis", indices, a.shape(ax), st);
  return boxed(mx::take_along_axis(a, idx, ax, st));
}

std::unique_ptr<array> put_along_axis(
    const array& a, const array& indices, const array& values, int32_t axis, StreamRef s) {
  auto st = to_mx(s);
  int ax = checked_axis("put_along_axis", a, axis);
  auto idx = clamped_indices("put_along_axis", indices, a.shape(ax), st);
  return boxed(mx::put_along_axis(a, idx, values, ax, st));
}

std::unique_ptr<array> topk(const array& a, int32_t k, int32_t axis, StreamRef s) {
  int ax = checked_axis("topk", a, axis);
  if (k < 1 || k > a.shape(ax)) {
    throw std::invalid_argument(
        "topk: k must be in 1.." + std::to_string(a.shape(ax)) + ", got " + std::to_string(k));
  }
  return boxed(mx::topk(a, k, ax, to_mx(s)));
}

std::unique_ptr<array> softmax(
    const array& a, rust::Slice<const int32_t> axes, bool precise, StreamRef s) {
  auto st = to_mx(s);
  auto ax = to_ints(axes);
  // f32 over the trailing axes on the CPU: our one-pass kernel (MLX's CPU softmax is about
  // 3x slower than its five composed ops).
  if (kernels::has_fast_extremum(st, a.dtype())) {
    if (auto matrix = trailing_matrix("softmax", a, ax)) {
      auto r = kernels::fast_softmax(mx::reshape(a, {matrix->first, matrix->second}, st), st);
      return boxed(mx::reshape(r, a.shape(), st));
    }
  }
  return boxed(mx::softmax(a, ax, precise, st));
}

std::unique_ptr<array> arg_reduce(bool max, const array& a, int32_t axis, bool keep_dims, StreamRef s) {
  return boxed(
      max ? mx::argmax(a, axis, keep_dims, to_mx(s)) : mx::argmin(a, axis, keep_dims, to_mx(s)));
}

std::unique_ptr<array> sort_axis(bool indices, const array& a, int32_t axis, StreamRef s) {
  return boxed(indices ? mx::argsort(a, axis, to_mx(s)) : mx::sort(a, axis, to_mx(s)));
}

std::unique_ptr<array> scatter(
    bool add,
    const array& a,
    const ArrayList& indices,
    const array& updates,
    rust::Slice<const int32_t> axes,
    StreamRef s) {
  auto st = to_mx(s);
  auto ax = to_ints(axes);
  auto idx = guarded_indices("scatter", a, indices.arrays, ax, st);
  return boxed(
      add ? mx::scatter_add(a, idx, updates, ax, st) : mx::scatter(a, idx, updates, ax, st));
}

std::unique_ptr<array> as_strided(
    const array& a,
    rust::Slice<const int32_t> shape,
    rust::Slice<const int64_t> strides,
    size_t offset,
    StreamRef s) {
  mx::Strides st(strides.begin(), strides.end());
  return boxed(mx::as_strided(a, to_shape(shape), std::move(st), offset, to_mx(s)));
}

std::unique_ptr<array> view(const array& a, Dtype dtype, StreamRef s) {
  return boxed(mx::view(a, to_mx(dtype), to_mx(s)));
}

// Inclusive scans along `axis` (from the end when `reverse`).
std::unique_ptr<array> scan(ScanOp op, const array& a, int32_t axis, bool reverse, StreamRef s) {
  auto st = to_mx(s);
  switch (op) {
    case ScanOp::Sum: return boxed(mx::cumsum(a, axis, reverse, true, st));
    case ScanOp::Prod: return boxed(mx::cumprod(a, axis, reverse, true, st));
    case ScanOp::Max: return boxed(mx::cummax(a, axis, reverse, true, st));
    case ScanOp::Min: return boxed(mx::cummin(a, axis, reverse, true, st));
  }
  throw std::invalid_argument("unknown scan op code");
}

std::unique_ptr<array> conv_general(
    const array& input,
    const array& weight,
    rust::Slice<const int32_t> strides,
    rust::Slice<const int32_t> padding_lo,
    rust::Slice<const int32_t> padding_hi,
    rust::Slice<const int32_t> kernel_dilation,
    rust::Slice<const int32_t> input_dilation,
    int32_t groups,
    StreamRef s) {
  // MLX divides the channels by `groups` before checking it.
  if (groups < 1) {
    throw std::invalid_argument("conv: groups must be at least 1, got " + std::to_string(groups));
  }
  return boxed(mx::conv_general(
      input,
      weight,
      to_ints(strides),
      to_ints(padding_lo),
      to_ints(padding_hi),
      to_ints(kernel_dilation),
      to_ints(input_dilation),
      groups,
      false,
      to_mx(s)));
}

std::unique_ptr<array> fft(bool inverse, const array& a, int32_t n, int32_t axis, StreamRef s) {
  return boxed(
      inverse ? mx::fft::ifft(a, n, axis, mx::fft::FFTNorm::Backward, to_mx(s))
              : mx::fft::fft(a, n, axis, mx::fft::FFTNorm::Backward, to_mx(s)));
}

// kind: 0 fftn, 1 ifftn, 2 rfftn, 3 irfftn (unnormalized forward, 1/n inverse).
std::unique_ptr<array> fftn(
    uint8_t kind,
    const array& a,
    rust::Slice<const int32_t> lengths,
    rust::Slice<const int32_t> axes,
    StreamRef s) {
  auto n = to_shape(lengths);
  auto ax = to_ints(axes);
  auto norm = mx::fft::FFTNorm::Backward;
  switch (kind) {
    case 0: return boxed(mx::fft::fftn(a, n, ax, norm, to_mx(s)));
    case 1: return boxed(mx::fft::ifftn(a, n, ax, norm, to_mx(s)));
    case 2: return boxed(mx::fft::rfftn(a, n, ax, norm, to_mx(s)));
    case 3: return boxed(mx::fft::irfftn(a, n, ax, norm, to_mx(s)));
  }
  throw std::invalid_argument("unknown fft kind");
}

std::unique_ptr<array> gather(
    const array& a,
    const ArrayList& indices,
    rust::Slice<const int32_t> axes,
    rust::Slice<const int32_t> slice_sizes,
    StreamRef s) {
  auto st = to_mx(s);
  auto ax = to_ints(axes);
  auto idx = guarded_indices("gather", a, indices.arrays, ax, st);
  return boxed(mx::gather(a, idx, ax, to_shape(slice_sizes), st));
}

std::unique_ptr<array> linalg_inv(const array& a, StreamRef s) {
  return boxed(mx::linalg::inv(a, to_mx(s)));
}

std::unique_ptr<array> linalg_solve(const array& a, const array& b, StreamRef s) {
  return boxed(mx::linalg::solve(a, b, to_mx(s)));
}

std::unique_ptr<array> linalg_solve_triangular(
    const array& a, const array& b, bool upper, StreamRef s) {
  return boxed(mx::linalg::solve_triangular(a, b, upper, to_mx(s)));
}

std::unique_ptr<array> linalg_cholesky(const array& a, bool upper, StreamRef s) {
  return boxed(mx::linalg::cholesky(a, upper, to_mx(s)));
}

std::unique_ptr<array> linalg_det(const array& a, StreamRef s) {
  return boxed(mx::linalg::det(a, to_mx(s)));
}

// op: 0 qr -> [q, r] (reduced), 1 svd -> [u, s, vt] (full), 2 eigh -> [values, vectors]
// (ascending, from the lower triangle), 3 lu -> [row_pivots, l, u].
std::unique_ptr<ArrayList> linalg_multi(uint8_t op, const array& a, StreamRef s) {
  auto list = std::make_unique<ArrayList>();
  auto st = to_mx(s);
  switch (op) {
    case 0: {
      auto [q, r] = mx::linalg::qr(a, st);
      list->arrays = {q, r};
      return list;
    }
    case 1:
      list->arrays = mx::linalg::svd(a, true, st);
      return list;
    case 2: {
      auto [w, v] = mx::linalg::eigh(a, "L", st);
      list->arrays = {w, v};
      return list;
    }
    case 3:
      list->arrays = mx::linalg::lu(a, st);
      return list;
  }
  throw std::invalid_argument("unknown linalg op");
}

size_t array_list_len(const ArrayList& list) {
  return list.arrays.size();
}

std::unique_ptr<array> array_list_get(const ArrayList& list, size_t i) {
  return boxed(list.arrays.at(i));
}

// On the CPU, a ⋅ b contracted over axes_a/axes_b as one [M, K] x [K, N] product through
// matmul_routed (mx::tensordot calls MLX's own matmul, past our routes); elsewhere
// mx::tensordot.
std::unique_ptr<array> tensordot(
    const array& a,
    const array& b,
    rust::Slice<const int32_t> axes_a,
    rust::Slice<const int32_t> axes_b,
    StreamRef s) {
  auto st = to_mx(s);
  auto xa = to_ints(axes_a);
  auto xb = to_ints(axes_b);
  if (st.device.type != mx::Device::cpu) {
    return boxed(mx::tensordot(a, b, xa, xb, st));
  }
  if (xa.size() != xb.size()) {
    throw std::invalid_argument("tensordot: the two lists of contracted axes differ in length");
  }
  auto normalize = [](std::vector<int>& axes, const array& x, const char* which) {
    std::vector<bool> seen(x.ndim(), false);
    for (auto& ax : axes) {
      int n = static_cast<int>(x.ndim());
      if (ax < -n || ax >= n) {
        throw std::invalid_argument(std::string("tensordot: axis out of range for ") + which);
      }
      ax = ax < 0 ? ax + n : ax;
      if (seen[ax]) {
        throw std::invalid_argument(std::string("tensordot: repeated axis for ") + which);
      }
      seen[ax] = true;
    }
    return seen;
  };
  auto seen_a = normalize(xa, a, "the first operand");
  auto seen_b = normalize(xb, b, "the second operand");
  int64_t k = 1;
  for (size_t i = 0; i < xa.size(); ++i) {
    if (a.shape(xa[i]) != b.shape(xb[i])) {
      throw std::invalid_argument("tensordot: contracted axes of different sizes");
    }
    k *= a.shape(xa[i]);
  }
  std::vector<int> perm_a, perm_b(xb.begin(), xb.end());
  mx::Shape out_shape;
  int64_t m = 1, n = 1;
  for (int d = 0; d < static_cast<int>(a.ndim()); ++d) {
    if (!seen_a[d]) {
      perm_a.push_back(d);
      out_shape.push_back(a.shape(d));
      m *= a.shape(d);
    }
  }
  perm_a.insert(perm_a.end(), xa.begin(), xa.end());
  for (int d = 0; d < static_cast<int>(b.ndim()); ++d) {
    if (!seen_b[d]) {
      perm_b.push_back(d);
      out_shape.push_back(b.shape(d));
      n *= b.shape(d);
    }
  }
  constexpr int64_t int_max = std::numeric_limits<int32_t>::max();
  if (m > int_max || n > int_max || k > int_max) {
    return boxed(mx::tensordot(a, b, xa, xb, st));
  }
  auto at = mx::reshape(mx::transpose(a, perm_a, st),
                        {static_cast<int32_t>(m), static_cast<int32_t>(k)}, st);
  auto bt = mx::reshape(mx::transpose(b, perm_b, st),
                        {static_cast<int32_t>(k), static_cast<int32_t>(n)}, st);
  return boxed(mx::reshape(matmul_routed(at, bt, st), out_shape, st));
}

// mx::compile over a Rust function. The lambda is not a plain function pointer, so MLX owns
// it and its cache entry (the traced tape, with every captured constant) is erased when the
// returned function is destroyed, on whichever thread that happens.
std::unique_ptr<CompiledFn> compile_fn(rust::Box<TraceFn> f) {
  auto shared = std::make_shared<rust::Box<TraceFn>>(std::move(f));
  std::function<std::vector<array>(const std::vector<array>&)> fun =
      [shared](const std::vector<array>& inputs) {
        ArrayList list{inputs};
        auto out = trace_fn_call(**shared, list);
        return std::move(out->arrays);
      };
  return std::make_unique<CompiledFn>(CompiledFn{mx::compile(std::move(fun))});
}

std::unique_ptr<ArrayList> compiled_call(const CompiledFn& f, const ArrayList& inputs) {
  auto list = std::make_unique<ArrayList>();
  list->arrays = f.fun(inputs.arrays);
  return list;
}

namespace {

// MLX's CPU compile builds kernels with `g++` through popen/pclose: with SIGCHLD ignored (as
// some host runtimes leave it) the child is reaped before pclose can wait for it, and the
// build fails.
bool sigchld_waitable() {
  struct sigaction old {};
  if (sigaction(SIGCHLD, nullptr, &old) != 0) {
    return false;
  }
  return old.sa_handler != SIG_IGN && !(old.sa_flags & SA_NOCLDWAIT);
}

bool on_path(const char* name) {
  const char* path = std::getenv("PATH");
  if (path == nullptr) {
    return false;
  }
  std::string dirs(path);
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t end = dirs.find(':', start);
    if (end == std::string::npos) {
      end = dirs.size();
    }
    std::string file = dirs.substr(start, end - start) + "/" + name;
    struct stat st {};
    if (end > start && stat(file.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
        access(file.c_str(), X_OK) == 0) {
      return true;
    }
    start = end + 1;
  }
  return false;
}

} // namespace

// Whether mx::compile fuses on `device` now: MLX_DISABLE_COMPILE unset, and on the CPU a
// `g++` on PATH that popen/pclose can wait for.
bool compile_enabled(DeviceKind device) {
  const char* off = std::getenv("MLX_DISABLE_COMPILE");
  if (off != nullptr && *off != '\0') {
    return false;
  }
  if (device == DeviceKind::Gpu) {
    return true;
  }
  return sigchld_waitable() && on_path("g++");
}

} // namespace nxmlx
