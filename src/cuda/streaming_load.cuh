// 16-byte global loads for data read once per kernel (decode weights, KV rows): through the
// non-coherent path, not kept in L1 (which then serves what is reused), and with a 256-byte L2
// prefetch (rows are contiguous). Only for memory no kernel writes while the reader runs.
#pragma once

#include <cstdint>

namespace duo::cuda {

__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

}  // namespace duo::cuda
