// alphadpo_kernels._C: CPU epilogues for the chunked torch backend (pybind11, raw pointers, no libtorch ABI).
//
// The Python side (alphadpo_kernels/_extension.py) checks shapes, dtypes, contiguity and devices, then
// passes data_ptr()s. Each row of a logits chunk is read once from memory and processed while it is in
// cache, replacing the several full passes the pure-torch epilogue makes.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

// glibc's vector math library provides SIMD variants of expf (_ZGV{b,d,e}N{4,8,16}v_expf, at most 4 ulp);
// declaring them lets the vectoriser call the one for each ISA region below. Linked with -lmvec.
extern "C" __attribute__((simd("notinbranch"))) float expf(float) noexcept;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

// The row loops are compiled three times, for AVX-512, AVX2+FMA and baseline x86-64, each inside its own
// `#pragma GCC target` region so that the inline math is compiled (and inlined) for the same ISA; the widest
// one the CPU supports is picked once at import. One build runs everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
namespace isa_avx512 {
#include "cpu_rows.inc"
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "cpu_rows.inc"
}
#pragma GCC pop_options
#define EPI_HAVE_ISA_VARIANTS 1
#endif
namespace isa_base {
#include "cpu_rows.inc"
}

using LseRow = void (*)(float*, int64_t, float, float*, float*, float*, int64_t);
using GradRow = void (*)(float*, int64_t, float, float, float, int64_t);

struct RowKernels {
  LseRow lse;
  GradRow grad;
  const char* isa;
};

RowKernels pick_kernels() {
#ifdef EPI_HAVE_ISA_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"))
    return {isa_avx512::lse_row, isa_avx512::grad_row, "avx512"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return {isa_avx2::lse_row, isa_avx2::grad_row, "avx2"};
#endif
  return {isa_base::lse_row, isa_base::grad_row, "baseline"};
}

const RowKernels kRows = pick_kernels();

void lse_update(std::uintptr_t logits_p, int64_t n, int64_t v, int64_t ld, std::uintptr_t targets_p,
                int64_t v_offset, double softcap_d, std::uintptr_t m_p, std::uintptr_t s_p, std::uintptr_t tz_p,
                int num_threads) {
  float* logits = ptr<float>(logits_p);
  const int64_t* targets = ptr<const int64_t>(targets_p);
  float *m = ptr<float>(m_p), *s = ptr<float>(s_p), *tz = ptr<float>(tz_p);
  const float c = static_cast<float>(softcap_d);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t i = 0; i < n; ++i) kRows.lse(logits + i * ld, v, c, m + i, s + i, tz + i, targets[i] - v_offset);
}

void grad_logits(std::uintptr_t logits_p, int64_t n, int64_t v, int64_t ld, std::uintptr_t targets_p,
                 int64_t v_offset, double softcap_d, std::uintptr_t lse_p, std::uintptr_t g_p, int num_threads) {
  float* logits = ptr<float>(logits_p);
  const int64_t* targets = ptr<const int64_t>(targets_p);
  const float *lse = ptr<const float>(lse_p), *g = ptr<const float>(g_p);
  const float c = static_cast<float>(softcap_d);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t i = 0; i < n; ++i) kRows.grad(logits + i * ld, v, c, g[i], lse[i], targets[i] - v_offset);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CPU logit epilogues for alphadpo_kernels' chunked torch backend";
  m.def("lse_update", &lse_update, "online log-sum-exp + target capture over a float32 logits chunk (in place softcap)",
        py::arg("logits"), py::arg("n"), py::arg("v"), py::arg("ld"), py::arg("targets"), py::arg("v_offset"),
        py::arg("softcap"), py::arg("m"), py::arg("s"), py::arg("tz"), py::arg("num_threads"));
  m.def("grad_logits", &grad_logits, "in-place dz = g·(onehot − softmax)·softcap' over a float32 logits chunk",
        py::arg("logits"), py::arg("n"), py::arg("v"), py::arg("ld"), py::arg("targets"), py::arg("v_offset"),
        py::arg("softcap"), py::arg("lse"), py::arg("g"), py::arg("num_threads"));
  m.attr("isa") = kRows.isa;
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
