// alphadpo_kernels._C_cuda: CUDA epilogues for backend="cublas" (GEMMs through torch/cuBLAS, everything else
// here). pybind11 with raw pointers and a stream handle; cudart is linked statically, so the module imports on
// machines without a GPU and fails only when called.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "epilogue_math.h"

namespace py = pybind11;

namespace {

constexpr int kThreads = 256;

__device__ float block_reduce_max(float x, float* shared) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = x;
  __syncthreads();
  if (threadIdx.x < 32) {
    x = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : -3.0e38f;
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    if (threadIdx.x == 0) shared[0] = x;
  }
  __syncthreads();
  float r = shared[0];
  __syncthreads();
  return r;
}

__device__ float block_reduce_sum(float x, float* shared) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = x;
  __syncthreads();
  if (threadIdx.x < 32) {
    x = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    if (threadIdx.x == 0) shared[0] = x;
  }
  __syncthreads();
  float r = shared[0];
  __syncthreads();
  return r;
}

// One block per row: soft-cap in place, row max, rescaled sum of exponentials, target logit.
__global__ void lse_update_kernel(float* logits, int64_t v, int64_t ld, const int64_t* targets, int64_t v_offset,
                                  float c, float* m, float* s, float* tz) {
  __shared__ float shared[32];
  const int64_t i = blockIdx.x;
  float* row = logits + i * ld;
  float mx = -3.0e38f;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    float z = row[j];
    if (c > 0.0f) row[j] = z = epi::softcap(z, c);
    mx = fmaxf(mx, z);
  }
  mx = block_reduce_max(mx, shared);
  const float m_new = fmaxf(m[i], mx);
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) sum += __expf(row[j] - m_new);
  sum = block_reduce_sum(sum, shared);
  if (threadIdx.x == 0) {
    s[i] = s[i] * __expf(m[i] - m_new) + sum;
    m[i] = m_new;
    const int64_t t = targets[i] - v_offset;
    if (t >= 0 && t < v) tz[i] += row[t];
  }
}

// Elementwise over the chunk: dz = g·(onehot − softmax)·softcap'.
__global__ void grad_logits_kernel(float* logits, int64_t n, int64_t v, int64_t ld, const int64_t* targets,
                                   int64_t v_offset, float c, const float* lse, const float* g) {
  const int64_t total = n * v;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = k / v, j = k % v;
    float* z = logits + i * ld + j;
    float zc = *z, deriv = 1.0f;
    if (c > 0.0f) {
      zc = epi::softcap(zc, c);
      deriv = 1.0f - (zc / c) * (zc / c);
    }
    const float onehot = (targets[i] - v_offset == j) ? 1.0f : 0.0f;
    *z = g[i] * (onehot - __expf(zc - lse[i])) * deriv;
  }
}

__device__ __forceinline__ void store_as(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store_as(__half* p, float x) { *p = __float2half_rn(x); }

// The chunked backward's dz: one row per blockIdx.x, kThreads * kColsPerThread columns per blockIdx.y (no
// division per element). The gradient is written once in the GEMM operand's dtype `Out` (rounded to nearest
// even from float32); with `keep`, the float32 value also overwrites the logits (the bias gradient sums it).
constexpr int kColsPerThread = 4;

template <typename Out>
__global__ void grad_logits_to_kernel(float* logits, int64_t v, int64_t ld, const int64_t* targets, int64_t v_offset,
                                      float c, const float* lse, const float* g, Out* out, int64_t out_ld, bool keep) {
  const int64_t i = blockIdx.x;
  const int64_t t = targets[i] - v_offset;
  const float li = lse[i], gi = g[i];
  float* row = logits + i * ld;
  Out* orow = out + i * out_ld;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * (kThreads * kColsPerThread) + threadIdx.x;
#pragma unroll
  for (int r = 0; r < kColsPerThread; ++r) {
    const int64_t j = j0 + static_cast<int64_t>(r) * kThreads;
    if (j >= v) break;
    float zc = row[j], deriv = 1.0f;
    if (c > 0.0f) {
      zc = epi::softcap(zc, c);
      deriv = 1.0f - (zc / c) * (zc / c);
    }
    const float dz = gi * ((j == t ? 1.0f : 0.0f) - __expf(zc - li)) * deriv;
    store_as(orow + j, dz);
    if (keep) row[j] = dz;
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <typename T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

void lse_update(std::uintptr_t logits, int64_t n, int64_t v, int64_t ld, std::uintptr_t targets, int64_t v_offset,
                double softcap, std::uintptr_t m, std::uintptr_t s, std::uintptr_t tz, std::uintptr_t stream) {
  if (n == 0) return;
  lse_update_kernel<<<static_cast<unsigned>(n), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      ptr<float>(logits), v, ld, ptr<const int64_t>(targets), v_offset, static_cast<float>(softcap), ptr<float>(m),
      ptr<float>(s), ptr<float>(tz));
  check(cudaGetLastError(), "lse_update_kernel launch");
}

void grad_logits(std::uintptr_t logits, int64_t n, int64_t v, int64_t ld, std::uintptr_t targets, int64_t v_offset,
                 double softcap, std::uintptr_t lse, std::uintptr_t g, std::uintptr_t stream) {
  if (n == 0 || v == 0) return;
  const int64_t blocks = std::min<int64_t>((n * v + kThreads - 1) / kThreads, 65535LL * 16);
  grad_logits_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      ptr<float>(logits), n, v, ld, ptr<const int64_t>(targets), v_offset, static_cast<float>(softcap),
      ptr<const float>(lse), ptr<const float>(g));
  check(cudaGetLastError(), "grad_logits_kernel launch");
}

// dtype codes shared with _extension.py
constexpr int kBFloat16 = 0, kFloat16 = 1;

void grad_logits_to(std::uintptr_t logits, int64_t n, int64_t v, int64_t ld, std::uintptr_t targets, int64_t v_offset,
                    double softcap, std::uintptr_t lse, std::uintptr_t g, std::uintptr_t out, int64_t out_ld,
                    int out_dtype, bool keep, std::uintptr_t stream) {
  if (n == 0 || v == 0) return;
  if (n > 0x7fffffffLL) throw std::invalid_argument("grad_logits_to: more than 2^31 - 1 rows");
  const int64_t col_blocks = (v + kThreads * kColsPerThread - 1) / (kThreads * kColsPerThread);
  if (col_blocks > 65535) throw std::invalid_argument("grad_logits_to: chunk wider than 65535 * 1024 columns");
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(col_blocks));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const float c = static_cast<float>(softcap);
  if (out_dtype == kBFloat16) {
    grad_logits_to_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(
        ptr<float>(logits), v, ld, ptr<const int64_t>(targets), v_offset, c, ptr<const float>(lse),
        ptr<const float>(g), ptr<__nv_bfloat16>(out), out_ld, keep);
  } else if (out_dtype == kFloat16) {
    grad_logits_to_kernel<__half><<<grid, kThreads, 0, s>>>(
        ptr<float>(logits), v, ld, ptr<const int64_t>(targets), v_offset, c, ptr<const float>(lse),
        ptr<const float>(g), ptr<__half>(out), out_ld, keep);
  } else {
    throw std::invalid_argument("grad_logits_to: out_dtype must be 0 (bfloat16) or 1 (float16)");
  }
  check(cudaGetLastError(), "grad_logits_to_kernel launch");
}

int device_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "CUDA logit epilogues for alphadpo_kernels' cublas backend";
  m.def("lse_update", &lse_update, py::arg("logits"), py::arg("n"), py::arg("v"), py::arg("ld"), py::arg("targets"),
        py::arg("v_offset"), py::arg("softcap"), py::arg("m"), py::arg("s"), py::arg("tz"), py::arg("stream"));
  m.def("grad_logits", &grad_logits, py::arg("logits"), py::arg("n"), py::arg("v"), py::arg("ld"),
        py::arg("targets"), py::arg("v_offset"), py::arg("softcap"), py::arg("lse"), py::arg("g"), py::arg("stream"));
  m.def("grad_logits_to", &grad_logits_to, py::arg("logits"), py::arg("n"), py::arg("v"), py::arg("ld"),
        py::arg("targets"), py::arg("v_offset"), py::arg("softcap"), py::arg("lse"), py::arg("g"), py::arg("out"),
        py::arg("out_ld"), py::arg("out_dtype"), py::arg("keep"), py::arg("stream"));
  m.def("device_count", &device_count);
}
