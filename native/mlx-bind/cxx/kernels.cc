#include "mlx-bind/cxx/kernels.h"

#include "mlx-bind/cxx/simd.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <cmath>
#include <complex>
#include <limits>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

#include <dlfcn.h>

#include "mlx/allocator.h"
#include "mlx/backend/common/unary.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace nxmlx::kernels {

namespace {

// Arrays smaller than this run on the stream's thread alone: handing half of them to a pool
// worker (waking it, waiting for it) costs about as much as computing them (exp over 64k
// f32 on 2 vCPUs: 69 us split, about 80 us estimated alone).
constexpr size_t kParallelGrain = size_t{1} << 15;

// A fixed set of worker threads (one per core beyond the caller's), started on first use and
// kept for the life of the process: starting and joining a thread per call cost 57-74 us on
// a 2-vCPU machine, as long as a threaded kernel takes on 100k floats. A caller queues a job
// of `count` tasks, runs tasks itself until none are left to claim, then waits for those
// the workers claimed; jobs from several streams queue in order, and each caller can finish
// its own job alone, so none waits on another. A task started on a worker runs nested
// parallel work inline.
class WorkerPool {
 public:
  static WorkerPool& instance() {
    // Never destroyed: the threads block on the queue until the process ends.
    static WorkerPool* pool = new WorkerPool();
    return *pool;
  }

  // Threads a job can use, the caller's included.
  size_t threads() const { return workers_ + 1; }

  template <typename Task>
  void run(size_t count, const Task& task) {
    if (count == 0) {
      return;
    }
    if (count == 1 || workers_ == 0 || on_worker_) {
      for (size_t i = 0; i < count; ++i) {
        task(i);
      }
      return;
    }
    Job job;
    job.count = count;
    job.context = &task;
    job.call = [](const void* context, size_t i) { (*static_cast<const Task*>(context))(i); };
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(&job);
    }
    wake_.notify_all();
    for (size_t i; (i = job.next.fetch_add(1)) < count;) {
      task(i);
      job.done.fetch_add(1);
    }
    std::unique_lock<std::mutex> lock(mutex_);
    auto at = std::find(queue_.begin(), queue_.end(), &job);
    if (at != queue_.end()) {
      queue_.erase(at);
    }
    finished_.wait(lock, [&] { return job.done.load() == count; });
  }

 private:
  struct Job {
    size_t count = 0;
    const void* context = nullptr;
    void (*call)(const void*, size_t) = nullptr;
    std::atomic<size_t> next{0};
    std::atomic<size_t> done{0};
  };

  WorkerPool() {
    const size_t cores = std::max<size_t>(1, std::thread::hardware_concurrency());
    for (size_t w = 1; w < cores; ++w) {
      try {
        std::thread([this] { loop(); }).detach();
        ++workers_;
      } catch (const std::system_error&) {
        break;  // Fewer threads than cores; callers run the rest.
      }
    }
  }

  void loop() {
    on_worker_ = true;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return !queue_.empty(); });
      Job* job = queue_.front();
      const size_t i = job->next.fetch_add(1);
      if (i + 1 >= job->count) {
        queue_.pop_front();  // Every task is claimed.
      }
      if (i >= job->count) {
        continue;
      }
      lock.unlock();
      job->call(job->context, i);
      // After this increment the caller may return and the job be gone.
      const bool last = job->done.fetch_add(1) + 1 == job->count;
      lock.lock();
      if (last) {
        finished_.notify_all();
      }
    }
  }

  static thread_local bool on_worker_;
  size_t workers_ = 0;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable finished_;
  std::deque<Job*> queue_;
};

thread_local bool WorkerPool::on_worker_ = false;

// Runs body(begin, end) over [0, n) in contiguous chunks, one per core, on the worker pool
// and the calling thread. body must not throw. `grain` is the least number of items worth a
// thread of their own.
template <typename Body>
void parallel_for(size_t n, size_t grain, const Body& body) {
  auto& pool = WorkerPool::instance();
  const size_t workers =
      std::max<size_t>(1, std::min(pool.threads(), n / std::max<size_t>(1, grain)));
  if (workers == 1) {
    body(size_t{0}, n);
    return;
  }
  const size_t chunk = (n + workers - 1) / workers;
  pool.run(workers, [&](size_t w) {
    const size_t begin = std::min(n, w * chunk);
    body(begin, std::min(n, begin + chunk));
  });
}

inline double sigmoid(double x) {
  // Each branch evaluates exp of a non-positive argument, so nothing overflows; NaN stays NaN.
  if (x >= 0) {
    return 1.0 / (1.0 + std::exp(-x));
  }
  double e = std::exp(x);
  return e / (1.0 + e);
}

// The x with erf(x) = y: Winitzki's approximation (2e-3 relative), then Newton's method in
// double, on erfc(x) = 1 - |y| in the tails (1 - |y| is exact for |y| >= 0.5) so that the
// root keeps its precision as |y| nears 1.
inline double erfinv(double y) {
  if (std::isnan(y) || y < -1.0 || y > 1.0) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  if (y == 0.0) {
    return y;
  }
  double ay = std::fabs(y);
  if (ay == 1.0) {
    return std::copysign(std::numeric_limits<double>::infinity(), y);
  }
  constexpr double a = 0.147;
  constexpr double two_over_sqrt_pi = 1.1283791670955126;
  double l = std::log((1.0 - ay) * (1.0 + ay));
  double t = 2.0 / (M_PI * a) + l / 2.0;
  double x = std::sqrt(std::sqrt(t * t - l / a) - t);
  double tail = 1.0 - ay;
  for (int i = 0; i < 6; ++i) {
    double d = two_over_sqrt_pi * std::exp(-x * x);
    if (d == 0.0) {
      break;
    }
    double f = ay >= 0.5 ? tail - std::erfc(x) : std::erf(x) - ay;
    double step = f / d;
    x -= step;
    if (std::fabs(step) <= 1e-17 * x) {
      break;
    }
  }
  return std::copysign(x, y);
}

template <typename T>
inline double widen(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return static_cast<double>(static_cast<float>(x));
  }
}

template <typename T>
inline T narrow(double x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else if constexpr (std::is_same_v<T, float>) {
    return static_cast<float>(x);
  } else {
    return T(static_cast<float>(x));
  }
}

template <typename T, typename Op>
void map_contiguous(const mx::array& in, mx::array& out, Op op) {
  const T* src = in.data<T>();
  T* dst = out.data<T>();
  parallel_for(in.data_size(), kParallelGrain, [src, dst, op](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      dst[i] = narrow<T>(op(widen<T>(src[i])));
    }
  });
}

// The vectorised f32 loop of simd.h for `fn`, or null when it has none.
using VectorLoop = void (*)(const float*, float*, size_t);

VectorLoop vector_loop(AccurateFn fn) {
  switch (fn) {
    case AccurateFn::Exp: return simd::exp_f32;
    case AccurateFn::Sigmoid: return simd::sigmoid_f32;
    case AccurateFn::Erf: return simd::erf_f32;
    case AccurateFn::Gelu: return simd::gelu_f32;
    case AccurateFn::Tanh: return simd::tanh_f32;
    case AccurateFn::Log: return simd::log_f32;
    default: return nullptr;
  }
}

// The vectorised f32 loops of simd.h, split over the machine's cores; false when `fn` has
// none.
bool run_vectorised(AccurateFn fn, const mx::array& in, mx::array& out) {
  const VectorLoop loop = vector_loop(fn);
  if (loop == nullptr) return false;
  const float* src = in.data<float>();
  float* dst = out.data<float>();
  parallel_for(in.data_size(), kParallelGrain,
               [src, dst, loop](size_t begin, size_t end) { loop(src + begin, dst + begin, end - begin); });
  return true;
}

// The same loops for f16 and bf16: blocks widened to float, computed, rounded back (within
// 1 ulp of the half type: the float result is within 0.6 of its own ulp). libm's double
// functions one element at a time took 3.7% of a bf16 encoder block on 2 vCPUs.
template <typename T>
bool run_vectorised_half(AccurateFn fn, const mx::array& in, mx::array& out) {
  const VectorLoop loop = vector_loop(fn);
  if (loop == nullptr) return false;
  const T* src = in.data<T>();
  T* dst = out.data<T>();
  parallel_for(in.data_size(), kParallelGrain, [src, dst, loop](size_t begin, size_t end) {
    constexpr size_t block = 1024;
    float buf[block];
    for (size_t at = begin; at < end; at += block) {
      const size_t n = std::min(block, end - at);
      for (size_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[at + i]);
      loop(buf, buf, n);
      for (size_t i = 0; i < n; ++i) dst[at + i] = static_cast<T>(buf[i]);
    }
  });
  return true;
}

template <typename T>
void run(AccurateFn fn, const mx::array& in, mx::array& out) {
  if constexpr (std::is_same_v<T, float>) {
    if (run_vectorised(fn, in, out)) {
      return;
    }
  }
  if constexpr (std::is_same_v<T, mx::float16_t> || std::is_same_v<T, mx::bfloat16_t>) {
    if (run_vectorised_half<T>(fn, in, out)) {
      return;
    }
  }
  switch (fn) {
    case AccurateFn::Exp:
      return map_contiguous<T>(in, out, [](double x) { return std::exp(x); });
    case AccurateFn::Sigmoid:
      return map_contiguous<T>(in, out, [](double x) { return sigmoid(x); });
    case AccurateFn::Erf:
      return map_contiguous<T>(in, out, [](double x) { return std::erf(x); });
    case AccurateFn::ErfInv:
      return map_contiguous<T>(in, out, [](double x) { return erfinv(x); });
    case AccurateFn::Sin:
      return map_contiguous<T>(in, out, [](double x) { return std::sin(x); });
    case AccurateFn::Cos:
      return map_contiguous<T>(in, out, [](double x) { return std::cos(x); });
    case AccurateFn::Rsqrt:
      return map_contiguous<T>(in, out, [](double x) { return 1.0 / std::sqrt(x); });
    case AccurateFn::Erfc:
      return map_contiguous<T>(in, out, [](double x) { return std::erfc(x); });
    case AccurateFn::Cbrt:
      return map_contiguous<T>(in, out, [](double x) { return std::cbrt(x); });
    case AccurateFn::Gelu:
      return map_contiguous<T>(in, out,
                               [](double x) { return 0.5 * x * std::erfc(-x * M_SQRT1_2); });
    case AccurateFn::Tanh:
      return map_contiguous<T>(in, out, [](double x) { return std::tanh(x); });
    case AccurateFn::Log:
      return map_contiguous<T>(in, out, [](double x) { return std::log(x); });
  }
}

const char* fn_name(AccurateFn fn) {
  switch (fn) {
    case AccurateFn::Exp: return "exp";
    case AccurateFn::Sigmoid: return "sigmoid";
    case AccurateFn::Erf: return "erf";
    case AccurateFn::ErfInv: return "erfinv";
    case AccurateFn::Sin: return "sin";
    case AccurateFn::Cos: return "cos";
    case AccurateFn::Rsqrt: return "rsqrt";
    case AccurateFn::Erfc: return "erfc";
    case AccurateFn::Cbrt: return "cbrt";
    case AccurateFn::Gelu: return "gelu";
    case AccurateFn::Tanh: return "tanh";
    case AccurateFn::Log: return "log";
  }
  return "?";
}

class AccurateUnary : public mx::UnaryPrimitive {
 public:
  AccurateUnary(mx::Stream stream, AccurateFn fn) : mx::UnaryPrimitive(stream), fn_(fn) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& in = inputs[0];
    if (!in.flags().contiguous) {
      throw std::runtime_error(std::string("[nx_mlx accurate ") + fn_name(fn_) +
                               "] input is not contiguous");
    }
    mx::set_unary_output_data(in, out);
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(in);
    encoder.set_output_array(out);
    encoder.dispatch([in = mx::array::unsafe_weak_copy(in),
                      out = mx::array::unsafe_weak_copy(out), fn = fn_]() mutable {
      switch (out.dtype()) {
        case mx::float16: return run<mx::float16_t>(fn, in, out);
        case mx::bfloat16: return run<mx::bfloat16_t>(fn, in, out);
        case mx::float32: return run<float>(fn, in, out);
        case mx::float64: return run<double>(fn, in, out);
        default:
          throw std::runtime_error(std::string("[nx_mlx accurate ") + fn_name(fn) +
                                   "] takes real floating-point arrays");
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(std::string("[nx_mlx accurate ") + fn_name(fn_) +
                             "] has no GPU kernel");
  }

  const char* name() const override { return "NxMlxAccurateUnary"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const AccurateUnary*>(&other);
    return o != nullptr && o->fn_ == fn_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  AccurateFn fn_;
};

// Sums: the input, row-major, is seen as [outer, k, inner] and reduced over k. Each task
// sums one [k, chunk of inner] slab into double accumulators (four interleaved ones along
// a contiguous row); when there are fewer slabs than cores, k is split too and the partial
// sums are added at the end.
constexpr size_t kInnerChunk = 1024;

template <typename T>
struct Accumulator {
  using type = double;
};

template <>
struct Accumulator<mx::complex64_t> {
  using type = std::complex<double>;
};

template <typename T>
inline typename Accumulator<T>::type widen_acc(T x) {
  if constexpr (std::is_same_v<T, mx::complex64_t>) {
    return {static_cast<double>(x.real()), static_cast<double>(x.imag())};
  } else {
    return widen<T>(x);
  }
}

template <typename T>
inline T narrow_acc(typename Accumulator<T>::type x) {
  if constexpr (std::is_same_v<T, mx::complex64_t>) {
    return T(static_cast<float>(x.real()), static_cast<float>(x.imag()));
  } else {
    return narrow<T>(x);
  }
}

// acc[0..width) = sum over rows [0, rows) of src[row * stride + j].
template <typename T, typename A>
void sum_slab(const T* src, size_t rows, size_t stride, size_t width, A* acc) {
  if constexpr (std::is_same_v<T, float>) {
    if (width == 1 && stride == 1) {
      acc[0] = simd::sum_f32(src, rows);
      return;
    }
  }
  if (width == 1 && stride == 1) {
    A a0{}, a1{}, a2{}, a3{};
    size_t i = 0;
    for (; i + 4 <= rows; i += 4) {
      a0 += widen_acc(src[i]);
      a1 += widen_acc(src[i + 1]);
      a2 += widen_acc(src[i + 2]);
      a3 += widen_acc(src[i + 3]);
    }
    for (; i < rows; ++i) {
      a0 += widen_acc(src[i]);
    }
    acc[0] = (a0 + a1) + (a2 + a3);
    return;
  }
  std::fill(acc, acc + width, A{});
  for (size_t r = 0; r < rows; ++r) {
    const T* row = src + r * stride;
    for (size_t j = 0; j < width; ++j) {
      acc[j] += widen_acc(row[j]);
    }
  }
}

template <typename T>
void sum_axis(const T* in, T* out, size_t outer, size_t k, size_t inner) {
  using A = typename Accumulator<T>::type;
  if (outer == 0 || inner == 0) {
    return;
  }
  const size_t chunks = (inner + kInnerChunk - 1) / kInnerChunk;
  const size_t slabs = outer * chunks;
  const size_t workers = std::max<size_t>(1, std::thread::hardware_concurrency());
  const size_t slab_items = std::max<size_t>(1, k * std::min(inner, kInnerChunk));
  const size_t splits =
      (slabs < workers && k >= 2 * workers && slab_items >= kParallelGrain) ? workers : 1;

  auto slab = [&](size_t s, size_t k_begin, size_t k_end, A* acc) {
    size_t o = s / chunks;
    size_t j0 = (s % chunks) * kInnerChunk;
    size_t width = std::min(inner - j0, kInnerChunk);
    sum_slab(in + (o * k + k_begin) * inner + j0, k_end - k_begin, inner, width, acc);
    return std::pair<size_t, size_t>{o * inner + j0, width};
  };

  if (splits == 1) {
    parallel_for(slabs, std::max<size_t>(1, kParallelGrain / slab_items),
                 [&](size_t begin, size_t end) {
                   std::vector<A> acc(std::min(inner, kInnerChunk));
                   for (size_t s = begin; s < end; ++s) {
                     auto [at, width] = slab(s, 0, k, acc.data());
                     for (size_t j = 0; j < width; ++j) {
                       out[at + j] = narrow_acc<T>(acc[j]);
                     }
                   }
                 });
    return;
  }

  // Few slabs: each of `splits` tasks sums a range of k for every slab.
  const size_t width_max = std::min(inner, kInnerChunk);
  std::vector<A> partial(splits * slabs * width_max);
  const size_t k_step = (k + splits - 1) / splits;
  parallel_for(splits, 1, [&](size_t begin, size_t end) {
    for (size_t c = begin; c < end; ++c) {
      size_t k_begin = std::min(k, c * k_step);
      size_t k_end = std::min(k, k_begin + k_step);
      for (size_t s = 0; s < slabs; ++s) {
        slab(s, k_begin, k_end, partial.data() + (c * slabs + s) * width_max);
      }
    }
  });
  std::vector<A> acc(width_max);
  for (size_t s = 0; s < slabs; ++s) {
    std::fill(acc.begin(), acc.end(), A{});
    size_t width = 0;
    for (size_t c = 0; c < splits; ++c) {
      const A* p = partial.data() + (c * slabs + s) * width_max;
      size_t j0 = (s % chunks) * kInnerChunk;
      width = std::min(inner - j0, kInnerChunk);
      for (size_t j = 0; j < width; ++j) {
        acc[j] += p[j];
      }
    }
    size_t at = (s / chunks) * inner + (s % chunks) * kInnerChunk;
    for (size_t j = 0; j < width; ++j) {
      out[at + j] = narrow_acc<T>(acc[j]);
    }
  }
}

class AccurateSum : public mx::UnaryPrimitive {
 public:
  AccurateSum(mx::Stream stream, int axis) : mx::UnaryPrimitive(stream), axis_(axis) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& in = inputs[0];
    if (!in.flags().row_contiguous) {
      throw std::runtime_error("[nx_mlx accurate sum] input is not row-contiguous");
    }
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(in);
    encoder.set_output_array(out);
    size_t outer = 1, inner = 1;
    for (int d = 0; d < axis_; ++d) {
      outer *= static_cast<size_t>(in.shape(d));
    }
    for (int d = axis_ + 1; d < static_cast<int>(in.ndim()); ++d) {
      inner *= static_cast<size_t>(in.shape(d));
    }
    size_t k = static_cast<size_t>(in.shape(axis_));
    encoder.dispatch([in = mx::array::unsafe_weak_copy(in),
                      out = mx::array::unsafe_weak_copy(out), outer, k, inner]() mutable {
      switch (out.dtype()) {
        case mx::float16:
          return sum_axis(in.data<mx::float16_t>(), out.data<mx::float16_t>(), outer, k, inner);
        case mx::bfloat16:
          return sum_axis(in.data<mx::bfloat16_t>(), out.data<mx::bfloat16_t>(), outer, k,
                          inner);
        case mx::float32:
          return sum_axis(in.data<float>(), out.data<float>(), outer, k, inner);
        case mx::float64:
          return sum_axis(in.data<double>(), out.data<double>(), outer, k, inner);
        case mx::complex64:
          return sum_axis(in.data<mx::complex64_t>(), out.data<mx::complex64_t>(), outer, k,
                          inner);
        default:
          throw std::runtime_error("[nx_mlx accurate sum] takes float and complex64 arrays");
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[nx_mlx accurate sum] has no GPU kernel");
  }

  const char* name() const override { return "NxMlxAccurateSum"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const AccurateSum*>(&other);
    return o != nullptr && o->axis_ == axis_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape[axis_] = 1;
    return {shape};
  }

 private:
  int axis_;
};

// best, or b when b beats it or is NaN (a NaN, once in, stays).
inline float pick_extremum(bool max, float best, float b) {
  return ((max ? b > best : b < best) || b != b) ? b : best;
}

// The max or min of each row of a row-contiguous [rows, k] float32 array, k >= 1, as
// [rows, 1]: rows split over the cores, or, when there are fewer rows than cores, each row
// split into one piece per core and the pieces' results combined.
class FastExtremum : public mx::UnaryPrimitive {
 public:
  FastExtremum(mx::Stream stream, bool max) : mx::UnaryPrimitive(stream), max_(max) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& in = inputs[0];
    if (!in.flags().row_contiguous || in.ndim() != 2 || in.shape(1) < 1 ||
        in.dtype() != mx::float32) {
      throw std::runtime_error("[nx_mlx max/min] takes a row-contiguous float32 matrix");
    }
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(in);
    encoder.set_output_array(out);
    size_t rows = static_cast<size_t>(in.shape(0));
    size_t k = static_cast<size_t>(in.shape(1));
    encoder.dispatch([in = mx::array::unsafe_weak_copy(in),
                      out = mx::array::unsafe_weak_copy(out), rows, k, max = max_]() mutable {
      const float* src = in.data<float>();
      float* dst = out.data<float>();
      auto extremum = max ? simd::max_f32 : simd::min_f32;
      const size_t workers = std::max<size_t>(1, std::thread::hardware_concurrency());
      const size_t splits = (rows < workers && k >= 2 * kParallelGrain) ? workers : 1;
      if (splits == 1) {
        parallel_for(rows, std::max<size_t>(1, kParallelGrain / k), [&](size_t begin, size_t end) {
          for (size_t r = begin; r < end; ++r) {
            dst[r] = extremum(src + r * k, k);
          }
        });
        return;
      }
      const size_t step = (k + splits - 1) / splits;
      std::vector<float> partial(rows * splits);
      parallel_for(rows * splits, 1, [&](size_t begin, size_t end) {
        for (size_t p = begin; p < end; ++p) {
          size_t from = std::min(k, (p % splits) * step);
          size_t to = std::min(k, from + step);
          // An empty piece repeats the row's first element, which changes nothing.
          partial[p] = to > from ? extremum(src + (p / splits) * k + from, to - from)
                                 : src[(p / splits) * k];
        }
      });
      for (size_t r = 0; r < rows; ++r) {
        float best = partial[r * splits];
        for (size_t c = 1; c < splits; ++c) {
          best = pick_extremum(max, best, partial[r * splits + c]);
        }
        dst[r] = best;
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[nx_mlx max/min] has no GPU kernel");
  }

  const char* name() const override { return max_ ? "NxMlxFastMax" : "NxMlxFastMin"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const FastExtremum*>(&other);
    return o != nullptr && o->max_ == max_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), 1}};
  }

 private:
  bool max_;
};

// Softmax along the rows of a row-contiguous [rows, k] float32 array, k >= 1: per row the
// max, exp(x - max) with its sum in double, and the scaling by 1 / sum, while the row is
// in cache (MLX's CPU softmax runs on one thread and its composed form reads and writes the
// array five times). Within about 1 ulp of the exact value; a row holding NaN or +inf is
// NaN, as the composed form.
class FastSoftmax : public mx::UnaryPrimitive {
 public:
  explicit FastSoftmax(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& in = inputs[0];
    if (!in.flags().row_contiguous || in.ndim() != 2 || in.shape(1) < 1 ||
        in.dtype() != mx::float32) {
      throw std::runtime_error("[nx_mlx softmax] takes a row-contiguous float32 matrix");
    }
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(in);
    encoder.set_output_array(out);
    size_t rows = static_cast<size_t>(in.shape(0));
    size_t k = static_cast<size_t>(in.shape(1));
    encoder.dispatch([in = mx::array::unsafe_weak_copy(in),
                      out = mx::array::unsafe_weak_copy(out), rows, k]() mutable {
      const float* src = in.data<float>();
      float* dst = out.data<float>();
      const size_t workers = std::max<size_t>(1, std::thread::hardware_concurrency());
      const size_t splits = (rows < workers && k >= 2 * kParallelGrain) ? workers : 1;
      if (splits == 1) {
        parallel_for(rows, std::max<size_t>(1, kParallelGrain / k), [&](size_t begin, size_t end) {
          for (size_t r = begin; r < end; ++r) {
            double m = simd::max_f32(src + r * k, k);
            double sum = simd::exp_shifted_f32(src + r * k, dst + r * k, k, m);
            simd::scale_f32(dst + r * k, k, 1.0 / sum);
          }
        });
        return;
      }
      // Few long rows: each pass split over the cores.
      const size_t step = (k + splits - 1) / splits;
      auto piece = [&](size_t p) {
        size_t from = std::min(k, (p % splits) * step);
        return std::pair<size_t, size_t>{(p / splits) * k + from, std::min(k, from + step) - from};
      };
      std::vector<float> maxes(rows * splits);
      parallel_for(rows * splits, 1, [&](size_t begin, size_t end) {
        for (size_t p = begin; p < end; ++p) {
          auto [at, len] = piece(p);
          maxes[p] = len > 0 ? simd::max_f32(src + at, len) : src[(p / splits) * k];
        }
      });
      std::vector<double> row_max(rows), sums(rows * splits);
      for (size_t r = 0; r < rows; ++r) {
        float best = maxes[r * splits];
        for (size_t c = 1; c < splits; ++c) {
          best = pick_extremum(true, best, maxes[r * splits + c]);
        }
        row_max[r] = best;
      }
      parallel_for(rows * splits, 1, [&](size_t begin, size_t end) {
        for (size_t p = begin; p < end; ++p) {
          auto [at, len] = piece(p);
          sums[p] = simd::exp_shifted_f32(src + at, dst + at, len, row_max[p / splits]);
        }
      });
      std::vector<double> inverse(rows);
      for (size_t r = 0; r < rows; ++r) {
        double sum = 0.0;
        for (size_t c = 0; c < splits; ++c) {
          sum += sums[r * splits + c];
        }
        inverse[r] = 1.0 / sum;
      }
      parallel_for(rows * splits, 1, [&](size_t begin, size_t end) {
        for (size_t p = begin; p < end; ++p) {
          auto [at, len] = piece(p);
          simd::scale_f32(dst + at, len, inverse[p / splits]);
        }
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[nx_mlx softmax] has no GPU kernel");
  }

  const char* name() const override { return "NxMlxFastSoftmax"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const FastSoftmax*>(&other) != nullptr;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
};

// Layer norm (or, with `rms`, RMS norm) along the rows of a row-contiguous [rows, k] float32
// array with [k] scale (and, for layer norm, shift): per row the mean and variance (the mean
// square) in double, two passes while the row is in cache, then (x - mean) / sqrt(variance +
// eps) * g + b (x / sqrt(mean square + eps) * g) rounded once; rows split over the cores. A
// row holding NaN or an infinity is NaN, as the composed form.
class FastLayerNorm : public mx::UnaryPrimitive {
 public:
  FastLayerNorm(mx::Stream stream, double eps, bool rms = false)
      : mx::UnaryPrimitive(stream), eps_(eps), rms_(rms) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    const auto& g = inputs[1];
    bool ok = inputs.size() == (rms_ ? 2u : 3u) && x.ndim() == 2 && x.shape(1) >= 1;
    for (size_t i = 0; ok && i < inputs.size(); ++i) {
      const auto& a = inputs[i];
      ok = a.dtype() == mx::float32 && a.flags().row_contiguous &&
           (i == 0 || (a.ndim() == 1 && a.shape(0) == x.shape(1)));
    }
    if (!ok) {
      throw std::runtime_error(
          "[nx_mlx layer_norm] takes a row-contiguous float32 matrix and vectors of its rows");
    }
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) {
      encoder.set_input_array(a);
    }
    encoder.set_output_array(out);
    size_t rows = static_cast<size_t>(x.shape(0));
    size_t k = static_cast<size_t>(x.shape(1));
    const float* bp = rms_ ? nullptr : inputs[2].data<float>();
    encoder.dispatch([x = mx::array::unsafe_weak_copy(x), g = mx::array::unsafe_weak_copy(g),
                      out = mx::array::unsafe_weak_copy(out), bp, rows, k, eps = eps_,
                      rms = rms_]() mutable {
      const float* src = x.data<float>();
      const float* gp = g.data<float>();
      float* dst = out.data<float>();
      parallel_for(rows, std::max<size_t>(1, kParallelGrain / k), [&](size_t begin, size_t end) {
        for (size_t r = begin; r < end; ++r) {
          if (rms) {
            double mean_square = simd::sum_squares_f32(src + r * k, k) / static_cast<double>(k);
            simd::normalize_scale_f32(src + r * k, dst + r * k, k,
                                      1.0 / std::sqrt(mean_square + eps), gp);
            continue;
          }
          double mean, variance;
          simd::moments_f32(src + r * k, k, &mean, &variance);
          simd::normalize_affine_f32(src + r * k, dst + r * k, k, mean,
                                     1.0 / std::sqrt(variance + eps), gp, bp);
        }
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[nx_mlx layer_norm] has no GPU kernel");
  }

  const char* name() const override {
    return rms_ ? "NxMlxFastRmsNorm" : "NxMlxFastLayerNorm";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const FastLayerNorm*>(&other);
    return o != nullptr && o->eps_ == eps_ && o->rms_ == rms_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  double eps_;
  bool rms_;
};

// Affine quantized matmuls on the CPU (MLX's CPU quantized_matmul is one scalar loop: 1 x 2048
// times 4-bit 2048 x 2048 took 5.9 ms in f32 and 55 ms in bf16 on 2 vCPUs, against 0.77 ms
// for the f32 sgemv). x [m, k] (m <= 16 per pass; more rows take several) times the
// transpose of w [n, k * bits / 32] with per-group scales and biases [n, k / group], all
// float32 but w; rows of w split over the cores, each row unpacked once per pass.
class QuantizedMatmulCpu : public mx::UnaryPrimitive {
 public:
  QuantizedMatmulCpu(mx::Stream stream, int bits, int group)
      : mx::UnaryPrimitive(stream), bits_(bits), group_(group) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    const auto& w = inputs[1];
    const auto& sc = inputs[2];
    const auto& bi = inputs[3];
    const size_t m = static_cast<size_t>(x.shape(0));
    const size_t k = static_cast<size_t>(x.shape(1));
    const size_t n = static_cast<size_t>(w.shape(0));
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([x = mx::array::unsafe_weak_copy(x), w = mx::array::unsafe_weak_copy(w),
                      sc = mx::array::unsafe_weak_copy(sc), bi = mx::array::unsafe_weak_copy(bi),
                      out = mx::array::unsafe_weak_copy(out), m, k, n, bits = bits_,
                      group = static_cast<size_t>(group_)]() mutable {
      const size_t groups = k / group;
      std::vector<float> xp(m * k);
      std::vector<float> xsum(m * groups);
      const float* xs = x.data<float>();
      for (size_t i = 0; i < m; ++i) {
        simd::qmm_permute_f32(xs + i * k, xp.data() + i * k, k, bits);
        for (size_t g = 0; g < groups; ++g) {
          float acc = 0.0f;
          for (size_t c = 0; c < group; ++c) acc += xs[i * k + g * group + c];
          xsum[i * groups + g] = acc;
        }
      }
      const uint32_t* wp = w.data<uint32_t>();
      const float* sp = sc.data<float>();
      const float* bp = bi.data<float>();
      float* yp = out.data<float>();
      const size_t words = k * static_cast<size_t>(bits) / 32;
      const size_t grain = std::max<size_t>(1, kParallelGrain / std::max<size_t>(1, k / 8));
      parallel_for(n, grain, [&](size_t begin, size_t end) {
        for (size_t i0 = 0; i0 < m; i0 += 16) {
          const size_t rows_m = std::min<size_t>(16, m - i0);
          simd::qmm_rows_f32(xp.data() + i0 * k, xsum.data() + i0 * groups, rows_m, k,
                             wp + begin * words, sp + begin * groups, bp + begin * groups,
                             end - begin, group, bits, yp + i0 * n + begin, n);
        }
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[nx_mlx quantized matmul] has no GPU kernel");
  }

  const char* name() const override { return "NxMlxQuantizedMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const QuantizedMatmulCpu*>(&other);
    return o != nullptr && o->bits_ == bits_ && o->group_ == group_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[1].shape(0)}};
  }

 private:
  int bits_;
  int group_;
};

// The float32 values [n, k] of affine quantized rows (as QuantizedMatmulCpu reads them),
// rows split over the cores.
class DequantizeCpu : public mx::UnaryPrimitive {
 public:
  DequantizeCpu(mx::Stream stream, int bits, int group)
      : mx::UnaryPrimitive(stream), bits_(bits), group_(group) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& w = inputs[0];
    const size_t n = static_cast<size_t>(out.shape(0));
    const size_t k = static_cast<size_t>(out.shape(1));
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([w = mx::array::unsafe_weak_copy(w),
                      sc = mx::array::unsafe_weak_copy(inputs[1]),
                      bi = mx::array::unsafe_weak_copy(inputs[2]),
                      out = mx::array::unsafe_weak_copy(out), n, k, bits = bits_,
                      group = static_cast<size_t>(group_)]() mutable {
      const size_t words = k * static_cast<size_t>(bits) / 32;
      const size_t groups = k / group;
      parallel_for(n, std::max<size_t>(1, kParallelGrain / std::max<size_t>(1, k)),
                   [&](size_t begin, size_t end) {
                     simd::dequantize_rows_f32(w.data<uint32_t>() + begin * words,
                                               sc.data<float>() + begin * groups,
                                               bi.data<float>() + begin * groups, end - begin,
                                               k, group, bits, out.data<float>() + begin * k);
                   });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[nx_mlx dequantize] has no GPU kernel");
  }

  const char* name() const override { return "NxMlxDequantize"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const DequantizeCpu*>(&other);
    return o != nullptr && o->bits_ == bits_ && o->group_ == group_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[1].shape(1) * group_}};
  }

 private:
  int bits_;
  int group_;
};

// cblas_sgemv as the process resolves it (the BLAS libmlx's matmul binds to), or null.
using Sgemv = void (*)(int order, int trans, int m, int n, float alpha, const float* a, int lda,
                       const float* x, int incx, float beta, float* y, int incy);

Sgemv sgemv() {
  static const Sgemv fn = reinterpret_cast<Sgemv>(dlsym(RTLD_DEFAULT, "cblas_sgemv"));
  return fn;
}

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// out[r] = sum_c m[r, c] * v[c] for a float32 matrix m of any strides (a transposed view
// included) and a contiguous vector v, through cblas_sgemv: MLX's CPU matmul calls sgemm
// for every shape, and OpenBLAS's sgemm with one row ran at 7 GFLOP/s where its sgemv ran
// at 66 (768x3072, 2 vCPUs).
class MatVec : public mx::UnaryPrimitive {
 public:
  explicit MatVec(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& m = inputs[0];
    const auto& v = inputs[1];
    if (m.ndim() != 2 || v.ndim() != 1 || m.shape(1) != v.shape(0) || m.dtype() != mx::float32 ||
        v.dtype() != mx::float32 || !v.flags().row_contiguous || sgemv() == nullptr) {
      throw std::runtime_error("[nx_mlx matvec] takes a float32 matrix and a contiguous vector");
    }
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(m);
    encoder.set_input_array(v);
    encoder.set_output_array(out);
    encoder.dispatch([m = mx::array::unsafe_weak_copy(m), v = mx::array::unsafe_weak_copy(v),
                      out = mx::array::unsafe_weak_copy(out)]() mutable {
      const int rows = static_cast<int>(m.shape(0));
      const int cols = static_cast<int>(m.shape(1));
      const int64_t s0 = m.strides()[0], s1 = m.strides()[1];
      const float* a = m.data<float>();
      float* y = out.data<float>();
      constexpr int64_t int_max = std::numeric_limits<int>::max();
      if (s1 == 1 && s0 >= cols && s0 <= int_max) {
        sgemv()(kRowMajor, kNoTrans, rows, cols, 1.0f, a, static_cast<int>(s0), v.data<float>(),
                1, 0.0f, y, 1);
      } else if (s0 == 1 && s1 >= rows && s1 <= int_max) {
        // The transpose of a row-major [cols, rows] matrix.
        sgemv()(kRowMajor, kTrans, cols, rows, 1.0f, a, static_cast<int>(s1), v.data<float>(),
                1, 0.0f, y, 1);
      } else {
        // Broadcast or otherwise strided: a row-major copy first.
        std::vector<float> packed(static_cast<size_t>(rows) * cols);
        for (int r = 0; r < rows; ++r) {
          for (int c = 0; c < cols; ++c) {
            packed[static_cast<size_t>(r) * cols + c] = a[r * s0 + c * s1];
          }
        }
        sgemv()(kRowMajor, kNoTrans, rows, cols, 1.0f, packed.data(), cols, v.data<float>(), 1,
                0.0f, y, 1);
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[nx_mlx matvec] has no GPU kernel");
  }

  const char* name() const override { return "NxMlxMatVec"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const MatVec*>(&other) != nullptr;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0)}};
  }
};

// cblas_sgemm_batch (OpenBLAS 0.3.28+, oneMKL: one signature) as the process resolves it,
// or null.
using SgemmBatch = void (*)(int order, const int* trans_a, const int* trans_b, const int* m,
                            const int* n, const int* k, const float* alpha, const float** a,
                            const int* lda, const float** b, const int* ldb, const float* beta,
                            float** c, const int* ldc, int group_count, const int* group_size);

SgemmBatch sgemm_batch() {
  static const SgemmBatch fn =
      reinterpret_cast<SgemmBatch>(dlsym(RTLD_DEFAULT, "cblas_sgemm_batch"));
  return fn;
}

// How a BLAS reads the [rows, cols] matrices of a batched operand in place: `trans` when
// they are stored column by column, `ld` the distance between stored rows. False when the
// strides fit neither layout (the caller packs a copy).
bool blas_layout(const mx::array& x, bool& trans, int& ld) {
  const size_t nd = x.ndim();
  const int64_t rows = x.shape(nd - 2), cols = x.shape(nd - 1);
  const int64_t s0 = x.strides()[nd - 2], s1 = x.strides()[nd - 1];
  constexpr int64_t int_max = std::numeric_limits<int>::max();
  if ((s1 == 1 || cols == 1) && (s0 >= cols || rows == 1)) {
    trans = false;
    ld = static_cast<int>(rows == 1 ? cols : s0);
    return (rows == 1 ? cols : s0) <= int_max;
  }
  if ((s0 == 1 || rows == 1) && (s1 >= rows || cols == 1)) {
    trans = true;
    ld = static_cast<int>(cols == 1 ? rows : s1);
    return (cols == 1 ? rows : s1) <= int_max;
  }
  return false;
}

// The offset of batch item `i` (row-major over the leading nd - 2 axes) in x's storage.
int64_t batch_offset(const mx::array& x, size_t i) {
  int64_t offset = 0;
  for (size_t d = x.ndim() - 2; d-- > 0;) {
    const size_t extent = static_cast<size_t>(x.shape(static_cast<int>(d)));
    offset += static_cast<int64_t>(i % extent) * x.strides()[d];
    i /= extent;
  }
  return offset;
}

// A row-major copy of the strided array x.
std::vector<float> pack_row_major(const mx::array& x) {
  std::vector<float> packed(x.size());
  const float* src = x.data<float>();
  const size_t nd = x.ndim();
  std::vector<int64_t> index(nd, 0);
  for (size_t i = 0; i < packed.size(); ++i) {
    int64_t at = 0;
    for (size_t d = 0; d < nd; ++d) {
      at += index[d] * x.strides()[d];
    }
    packed[i] = src[at];
    for (size_t d = nd; d-- > 0;) {
      if (++index[d] < x.shape(static_cast<int>(d))) {
        break;
      }
      index[d] = 0;
    }
  }
  return packed;
}

// a [..., m, k] times b [..., k, n] over equal batch axes, through one cblas_sgemm_batch
// call: the BLAS spreads the items over its threads and runs each on one. MLX's CPU matmul
// calls sgemm once per item, each call threading a small product (12 attention heads of
// 128x64x128: 37-85 GFLOP/s looped, 115-157 batched, 2 vCPUs, OpenBLAS 0.3.29). Operands
// are read in place when their matrices are row- or column-major (a transposed view of
// heads included), packed first otherwise.
class BatchedMatmul : public mx::UnaryPrimitive {
 public:
  explicit BatchedMatmul(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& a = inputs[0];
    const auto& b = inputs[1];
    if (a.ndim() < 3 || b.ndim() != a.ndim() || a.dtype() != mx::float32 ||
        b.dtype() != mx::float32 || sgemm_batch() == nullptr) {
      throw std::runtime_error("[nx_mlx batched matmul] takes float32 arrays of equal rank");
    }
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(a);
    encoder.set_input_array(b);
    encoder.set_output_array(out);
    encoder.dispatch([a = mx::array::unsafe_weak_copy(a), b = mx::array::unsafe_weak_copy(b),
                      out = mx::array::unsafe_weak_copy(out)]() mutable {
      const size_t nd = a.ndim();
      const int m = static_cast<int>(a.shape(nd - 2));
      const int k = static_cast<int>(a.shape(nd - 1));
      const int n = static_cast<int>(b.shape(nd - 1));
      const size_t items = out.size() / (static_cast<size_t>(m) * n);
      std::vector<float> a_packed, b_packed;
      std::vector<const float*> a_items(items), b_items(items);
      std::vector<float*> c_items(items);
      auto operand = [items](const mx::array& x, std::vector<float>& packed,
                             std::vector<const float*>& at, bool& trans, int& ld) {
        if (blas_layout(x, trans, ld)) {
          for (size_t i = 0; i < items; ++i) {
            at[i] = x.data<float>() + batch_offset(x, i);
          }
          return;
        }
        packed = pack_row_major(x);
        const size_t nd = x.ndim();
        const size_t step = static_cast<size_t>(x.shape(nd - 2)) * x.shape(nd - 1);
        trans = false;
        ld = static_cast<int>(x.shape(nd - 1));
        for (size_t i = 0; i < items; ++i) {
          at[i] = packed.data() + i * step;
        }
      };
      bool a_trans = false, b_trans = false;
      int lda = 0, ldb = 0;
      operand(a, a_packed, a_items, a_trans, lda);
      operand(b, b_packed, b_items, b_trans, ldb);
      for (size_t i = 0; i < items; ++i) {
        c_items[i] = out.data<float>() + i * static_cast<size_t>(m) * n;
      }
      const int ta = a_trans ? kTrans : kNoTrans, tb = b_trans ? kTrans : kNoTrans;
      const float alpha = 1.0f, beta = 0.0f;
      const int ldc = n, group = static_cast<int>(items);
      sgemm_batch()(kRowMajor, &ta, &tb, &m, &n, &k, &alpha, a_items.data(), &lda,
                    b_items.data(), &ldb, &beta, c_items.data(), &ldc, 1, &group);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[nx_mlx batched matmul] has no GPU kernel");
  }

  const char* name() const override { return "NxMlxBatchedMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const BatchedMatmul*>(&other) != nullptr;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = inputs[1].shape(-1);
    return {shape};
  }
};

}  // namespace

bool has_matvec(const mx::Stream& stream, mx::Dtype dtype) {
  return stream.device.type == mx::Device::cpu && dtype == mx::float32 && sgemv() != nullptr;
}

mx::array matvec(const mx::array& m, const mx::array& v, const mx::Stream& stream) {
  if (!has_matvec(stream, m.dtype()) || v.dtype() != m.dtype() || m.ndim() != 2 ||
      v.ndim() != 1 || m.shape(1) != v.shape(0) || m.shape(0) < 1 || m.shape(1) < 1) {
    throw std::invalid_argument(
        "[nx_mlx matvec] takes a non-empty float32 matrix [r, c] and vector [c] on a CPU "
        "stream");
  }
  return mx::array({m.shape(0)}, mx::float32, std::make_shared<MatVec>(stream),
                   {m, mx::contiguous(v, false, stream)});
}

mx::array fast_layer_norm(const mx::array& x, const mx::array& g, const mx::array& b, double eps,
                          const mx::Stream& stream) {
  if (!has_fast_extremum(stream, x.dtype()) || g.dtype() != x.dtype() || b.dtype() != x.dtype() ||
      x.ndim() != 2 || x.shape(1) < 1 || g.ndim() != 1 || b.ndim() != 1 ||
      g.shape(0) != x.shape(1) || b.shape(0) != x.shape(1)) {
    throw std::invalid_argument(
        "[nx_mlx layer_norm] takes a float32 matrix [r, k] and vectors [k] on a CPU stream");
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<FastLayerNorm>(stream, eps),
                   {mx::contiguous(x, false, stream), mx::contiguous(g, false, stream),
                    mx::contiguous(b, false, stream)});
}

mx::array fast_rms_norm(const mx::array& x, const mx::array& g, double eps,
                        const mx::Stream& stream) {
  if (!has_fast_extremum(stream, x.dtype()) || g.dtype() != x.dtype() || x.ndim() != 2 ||
      x.shape(1) < 1 || g.ndim() != 1 || g.shape(0) != x.shape(1)) {
    throw std::invalid_argument(
        "[nx_mlx rms_norm] takes a float32 matrix [r, k] and a vector [k] on a CPU stream");
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<FastLayerNorm>(stream, eps, true),
                   {mx::contiguous(x, false, stream), mx::contiguous(g, false, stream)});
}

bool has_accurate_sum(const mx::Stream& stream, mx::Dtype dtype) {
  return stream.device.type == mx::Device::cpu &&
         (dtype == mx::float16 || dtype == mx::bfloat16 || dtype == mx::float32 ||
          dtype == mx::float64 || dtype == mx::complex64);
}

mx::array accurate_sum(const mx::array& a, int axis, const mx::Stream& stream) {
  if (!has_accurate_sum(stream, a.dtype()) || axis < 0 || axis >= static_cast<int>(a.ndim())) {
    throw std::invalid_argument(
        "[nx_mlx accurate sum] takes a float or complex64 array on a CPU stream and one of "
        "its axes");
  }
  auto input = mx::contiguous(a, false, stream);
  auto shape = input.shape();
  shape[axis] = 1;
  return mx::array(shape, input.dtype(), std::make_shared<AccurateSum>(stream, axis), {input});
}

bool has_fast_extremum(const mx::Stream& stream, mx::Dtype dtype) {
  return stream.device.type == mx::Device::cpu && dtype == mx::float32;
}

mx::array fast_extremum(bool max, const mx::array& a, const mx::Stream& stream) {
  if (!has_fast_extremum(stream, a.dtype()) || a.ndim() != 2 || a.shape(1) < 1) {
    throw std::invalid_argument(
        "[nx_mlx max/min] takes a float32 matrix with at least one column on a CPU stream");
  }
  auto input = mx::contiguous(a, false, stream);
  return mx::array({input.shape(0), 1}, mx::float32,
                   std::make_shared<FastExtremum>(stream, max), {input});
}

mx::array fast_softmax(const mx::array& a, const mx::Stream& stream) {
  if (!has_fast_extremum(stream, a.dtype()) || a.ndim() != 2 || a.shape(1) < 1) {
    throw std::invalid_argument(
        "[nx_mlx softmax] takes a float32 matrix with at least one column on a CPU stream");
  }
  auto input = mx::contiguous(a, false, stream);
  return mx::array(input.shape(), mx::float32, std::make_shared<FastSoftmax>(stream), {input});
}

bool has_accurate_unary(const mx::Stream& stream, mx::Dtype dtype) {
  return stream.device.type == mx::Device::cpu &&
         (dtype == mx::float16 || dtype == mx::bfloat16 || dtype == mx::float32 ||
          dtype == mx::float64);
}

mx::array accurate_unary(AccurateFn fn, const mx::array& a, const mx::Stream& stream) {
  if (!has_accurate_unary(stream, a.dtype())) {
    throw std::invalid_argument(std::string("[nx_mlx accurate ") + fn_name(fn) +
                                "] takes real floating-point arrays on a CPU stream");
  }
  auto input = mx::contiguous(a, false, stream);
  return mx::array(input.shape(), input.dtype(), std::make_shared<AccurateUnary>(stream, fn),
                   {input});
}

bool has_quantized_cpu(const mx::Stream& stream, int bits, int group) {
  return stream.device.type == mx::Device::cpu && (bits == 2 || bits == 4 || bits == 8) &&
         (group == 32 || group == 64 || group == 128);
}

namespace {

// The checks both quantized kernels share: w [n, k * bits / 32] uint32, scales and biases
// [n, k / group] float32.
void check_quantized_parts(const char* op, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int64_t k, int bits, int group) {
  bool ok = w.dtype() == mx::uint32 && scales.dtype() == mx::float32 &&
            biases.dtype() == mx::float32 && w.ndim() == 2 && scales.ndim() == 2 &&
            biases.ndim() == 2 && k > 0 && k % group == 0 && w.shape(1) * 32 == k * bits &&
            scales.shape(0) == w.shape(0) && biases.shape(0) == w.shape(0) &&
            scales.shape(1) * group == k && biases.shape(1) * group == k;
  if (!ok) {
    throw std::invalid_argument(std::string("[nx_mlx ") + op +
                                "] takes uint32 rows [n, k * bits / 32] with float32 scales and "
                                "biases [n, k / group]");
  }
}

}  // namespace

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int bits, int group,
                           const mx::Stream& stream) {
  if (!has_quantized_cpu(stream, bits, group) || x.dtype() != mx::float32 || x.ndim() != 2 ||
      x.shape(0) < 1) {
    throw std::invalid_argument(
        "[nx_mlx quantized matmul] takes a float32 matrix on a CPU stream, 2, 4 or 8 bits and "
        "a group size that is a multiple of 32");
  }
  check_quantized_parts("quantized matmul", w, scales, biases, x.shape(1), bits, group);
  return mx::array({x.shape(0), w.shape(0)}, mx::float32,
                   std::make_shared<QuantizedMatmulCpu>(stream, bits, group),
                   {mx::contiguous(x, false, stream), mx::contiguous(w, false, stream),
                    mx::contiguous(scales, false, stream), mx::contiguous(biases, false, stream)});
}

mx::array dequantize(const mx::array& w, const mx::array& scales, const mx::array& biases,
                     int bits, int group, const mx::Stream& stream) {
  if (!has_quantized_cpu(stream, bits, group) || scales.ndim() != 2) {
    throw std::invalid_argument(
        "[nx_mlx dequantize] takes 2, 4 or 8 bits and a group size that is a multiple of 32 on "
        "a CPU stream");
  }
  const int64_t k = scales.shape(1) * group;
  check_quantized_parts("dequantize", w, scales, biases, k, bits, group);
  return mx::array({w.shape(0), static_cast<int>(k)}, mx::float32,
                   std::make_shared<DequantizeCpu>(stream, bits, group),
                   {mx::contiguous(w, false, stream), mx::contiguous(scales, false, stream),
                    mx::contiguous(biases, false, stream)});
}

bool has_batched_matmul(const mx::Stream& stream, mx::Dtype dtype) {
  return stream.device.type == mx::Device::cpu && dtype == mx::float32 &&
         sgemm_batch() != nullptr;
}

mx::array batched_matmul(const mx::array& a, const mx::array& b, const mx::Stream& stream) {
  constexpr int64_t int_max = std::numeric_limits<int>::max();
  const size_t nd = a.ndim();
  bool fits = has_batched_matmul(stream, a.dtype()) && b.dtype() == a.dtype() && nd >= 3 &&
              b.ndim() == nd;
  for (size_t d = 0; fits && d + 2 < nd; ++d) {
    fits = a.shape(static_cast<int>(d)) == b.shape(static_cast<int>(d));
  }
  fits = fits && a.shape(-1) == b.shape(-2) && a.shape(-2) >= 1 && a.shape(-1) >= 1 &&
         b.shape(-1) >= 1 && a.shape(-2) <= int_max && a.shape(-1) <= int_max &&
         b.shape(-1) <= int_max && a.size() / (a.shape(-2) * a.shape(-1)) <= int_max;
  if (!fits) {
    throw std::invalid_argument(
        "[nx_mlx batched matmul] takes non-empty float32 arrays [..., m, k] and [..., k, n] "
        "with equal batch axes on a CPU stream");
  }
  auto shape = a.shape();
  shape.back() = b.shape(-1);
  return mx::array(shape, mx::float32, std::make_shared<BatchedMatmul>(stream), {a, b});
}

}  // namespace nxmlx::kernels
