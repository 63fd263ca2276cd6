// Shared math of the logit epilogues (CUDA side; the CPU side includes epilogue_math.inc per ISA).
//
//   forward  (per row i over a chunk of vocabulary columns [v_offset, v_offset + v)):
//            zc = c·tanh(z/c) (if softcap c > 0);  m' = max(m, max_j zc);  s = s·e^(m − m') + Σ_j e^(zc − m');
//            tz += zc[target − v_offset] when the target falls in the chunk
//   backward (in place):  dz = g_i · (onehot(target) − e^(zc − lse_i)) · (1 − (zc/c)²)
#pragma once
#include <cstdint>

#define EPI_HD __device__ __forceinline__
#define EPI_EXP __expf

namespace epi {
#include "epilogue_math.inc"
}  // namespace epi
