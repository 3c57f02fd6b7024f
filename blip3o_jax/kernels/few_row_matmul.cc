// y = x @ w.T for a few-row x (rows, in) and a weight w (out, in) in fp32, as an XLA FFI custom call for CPUs.
//
// A decode step multiplies one token per sequence by every weight matrix, so it is bound by reading the weights
// once. XLA:CPU's GEMM reads them at ~2/3 of the memory's stream rate at 4 rows; this kernel streams each weight
// row once for all rows of x (x stays in L1), with a software prefetch into the last-level cache a few KB ahead,
// which is what brings the read rate to the stream rate on the machines we measured (docs/benchmarks.md).
// Output rows (the weight's rows) are split into contiguous blocks over XLA's intra-op thread pool; the calling
// thread works too, so the call never waits on a pool that is busy with other calls.
//
// Built at first use by blip3o_jax/kernels/__init__.py with the C++ compiler of the machine; one binary serves
// AVX-512 and AVX2 machines (chosen at run time), and machines with neither use XLA's dot instead.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPrefetchBytes = 8192;  // how far ahead of the weight row being read to prefetch (flat from ~6 KB)
constexpr int64_t kMinBlockBytes = 256 << 10;  // a thread's block of weight rows is at least this large

// ISA: 2 = AVX-512F, 1 = AVX2 + FMA, 0 = neither (the Python side then never calls the kernel)
int DetectIsa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

int g_isa_override = -1;

int Isa() {
  static const int detected = DetectIsa();
  return g_isa_override >= 0 ? std::min(g_isa_override, detected) : detected;
}

template <int R>
__attribute__((target("avx512f"))) void RowsAvx512(const float* x, const float* w, float* y, int64_t k_dim,
                                                   int64_t n_dim, int64_t n0, int64_t n1) {
  const int64_t k32 = k_dim & ~int64_t{31};
  const int64_t k16 = k_dim & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (k_dim - k16)) - 1u);
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * k_dim;
    __m512 a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < k32; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + k) + kPrefetchBytes, _MM_HINT_T2);
      _mm_prefetch(reinterpret_cast<const char*>(wr + k) + kPrefetchBytes + 64, _MM_HINT_T2);
      const __m512 w0 = _mm512_loadu_ps(wr + k);
      const __m512 w1 = _mm512_loadu_ps(wr + k + 16);
      for (int r = 0; r < R; ++r) {
        a[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * k_dim + k), a[r]);
        b[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * k_dim + k + 16), b[r]);
      }
    }
    if (k < k16) {
      const __m512 w0 = _mm512_loadu_ps(wr + k);
      for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * k_dim + k), a[r]);
      k += 16;
    }
    if (tail) {
      const __m512 w0 = _mm512_maskz_loadu_ps(tail, wr + k);
      for (int r = 0; r < R; ++r) b[r] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(tail, x + r * k_dim + k), b[r]);
    }
    for (int r = 0; r < R; ++r) y[r * n_dim + n] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
  }
}

__attribute__((target("avx2,fma"))) inline float HorizontalSum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

template <int R>
__attribute__((target("avx2,fma"))) void RowsAvx2(const float* x, const float* w, float* y, int64_t k_dim,
                                                  int64_t n_dim, int64_t n0, int64_t n1) {
  const int64_t k16 = k_dim & ~int64_t{15};
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * k_dim;
    __m256 a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < k16; k += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + k) + kPrefetchBytes, _MM_HINT_T2);
      const __m256 w0 = _mm256_loadu_ps(wr + k);
      const __m256 w1 = _mm256_loadu_ps(wr + k + 8);
      for (int r = 0; r < R; ++r) {
        a[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * k_dim + k), a[r]);
        b[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * k_dim + k + 8), b[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float s = HorizontalSum(_mm256_add_ps(a[r], b[r]));
      for (int64_t j = k; j < k_dim; ++j) s += x[r * k_dim + j] * wr[j];
      y[r * n_dim + n] = s;
    }
  }
}

using RowsFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);

// the widest row group each ISA keeps in registers (two accumulators per row)
template <template <int> class Pick>
RowsFn PickRows(int r) {
  switch (r) {
    case 1: return Pick<1>::fn;
    case 2: return Pick<2>::fn;
    case 3: return Pick<3>::fn;
    case 4: return Pick<4>::fn;
    case 5: return Pick<5>::fn;
    case 6: return Pick<6>::fn;
    case 7: return Pick<7>::fn;
    default: return Pick<8>::fn;
  }
}
template <int R> struct Avx512Rows { static constexpr RowsFn fn = RowsAvx512<R>; };
// AVX2 has 16 vector registers: groups of at most 4 rows (Block never asks for more; the clamp only keeps the
// unused instantiations small)
template <int R> struct Avx2Rows { static constexpr RowsFn fn = RowsAvx2<(R > 4 ? 4 : R)>; };

// y[:, n0:n1] for every row of x, in groups of at most `group` rows (each group reads the block of w once)
void Block(int isa, const float* x, const float* w, float* y, int64_t rows, int64_t k_dim, int64_t n_dim,
           int64_t n0, int64_t n1) {
  const int64_t group = isa == 2 ? 8 : 4;
  for (int64_t r0 = 0; r0 < rows; r0 += group) {
    const int r = static_cast<int>(std::min(group, rows - r0));
    RowsFn fn = isa == 2 ? PickRows<Avx512Rows>(r) : PickRows<Avx2Rows>(r);
    fn(x + r0 * k_dim, w, y + r0 * n_dim, k_dim, n_dim, n0, n1);
  }
}

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

ffi::Error FewRowMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("blip3o_few_row_matmul: expected x (rows, in) and w (out, in)");
  }
  const int isa = Isa();
  if (isa == 0) return ffi::Error::Internal("blip3o_few_row_matmul: this CPU has neither AVX-512F nor AVX2+FMA");
  const int64_t rows = xd[0], k_dim = xd[1], n_dim = wd[0];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  if (rows == 0 || n_dim == 0) return ffi::Error::Success();
  if (k_dim == 0) {
    std::fill(yp, yp + rows * n_dim, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t row_bytes = k_dim * static_cast<int64_t>(sizeof(float));
  const int64_t by_size = std::max<int64_t>(1, n_dim * row_bytes / kMinBlockBytes);
  const int64_t blocks = std::min({threads, by_size, n_dim});
  if (blocks == 1) {
    Block(isa, xp, wp, yp, rows, k_dim, n_dim, 0, n_dim);
    return ffi::Error::Success();
  }
  // contiguous blocks of weight rows, claimed from a counter by the calling thread and by pool tasks; tasks that
  // start after every block is claimed return at once (the state they share outlives the call)
  auto shared = std::make_shared<Shared>();
  auto work = [=]() {
    for (;;) {
      const int64_t b = shared->next.fetch_add(1, std::memory_order_relaxed);
      if (b >= blocks) return;
      const int64_t n0 = n_dim * b / blocks, n1 = n_dim * (b + 1) / blocks;
      Block(isa, xp, wp, yp, rows, k_dim, n_dim, n0, n1);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < blocks; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (shared->done.load(std::memory_order_acquire) < blocks) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Blip3oFewRowMatmul, FewRowMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int blip3o_few_row_matmul_isa() { return Isa(); }
extern "C" void blip3o_few_row_matmul_force_isa(int isa) { g_isa_override = isa; }
