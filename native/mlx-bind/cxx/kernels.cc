#include "mlx-bind/cxx/kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/common/unary.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace nxmlx::kernels {

namespace {

// Arrays smaller than this run on the stream's thread alone: starting a thread costs about
// as much as computing this many elements.
constexpr size_t kParallelGrain = size_t{1} << 15;

// Runs body(begin, end) over [0, n) in contiguous chunks, one per core. body must not throw.
// When a thread cannot be started, its chunk runs on the calling thread.
template <typename Body>
void parallel_for(size_t n, const Body& body) {
  size_t workers = std::max<size_t>(1, std::thread::hardware_concurrency());
  workers = std::max<size_t>(1, std::min(workers, n / kParallelGrain));
  if (workers == 1) {
    body(size_t{0}, n);
    return;
  }
  const size_t chunk = (n + workers - 1) / workers;
  auto range = [&](size_t w) {
    size_t begin = std::min(n, w * chunk);
    return std::pair<size_t, size_t>{begin, std::min(n, begin + chunk)};
  };
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  size_t started = 1;
  try {
    for (; started < workers; ++started) {
      auto [begin, end] = range(started);
      threads.emplace_back([&body, begin, end] { body(begin, end); });
    }
  } catch (const std::system_error&) {
    // Fewer threads than cores; the calling thread runs the rest.
  }
  auto [begin, end] = range(0);
  body(begin, end);
  for (size_t w = started; w < workers; ++w) {
    auto [b, e] = range(w);
    body(b, e);
  }
  for (auto& t : threads) {
    t.join();
  }
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
  parallel_for(in.data_size(), [src, dst, op](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      dst[i] = narrow<T>(op(widen<T>(src[i])));
    }
  });
}

template <typename T>
void run(AccurateFn fn, const mx::array& in, mx::array& out) {
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

}  // namespace

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

}  // namespace nxmlx::kernels
