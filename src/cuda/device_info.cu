#include "cuda/cuda_check.h"
#include "cuda/device_info.h"

namespace duo::cuda {

std::vector<DeviceInfo> list_devices() {
  std::vector<DeviceInfo> out;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return out;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    DUO_CUDA_CHECK(cudaGetDeviceProperties(&prop, i));
    DeviceInfo d;
    d.index = i;
    d.name = prop.name;
    d.sm_major = prop.major;
    d.sm_minor = prop.minor;
    d.multiprocessors = prop.multiProcessorCount;
    d.total_memory_bytes = static_cast<int64_t>(prop.totalGlobalMem);
    DUO_CUDA_CHECK(cudaSetDevice(i));
    size_t free_b = 0, total_b = 0;
    DUO_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    d.free_memory_bytes = static_cast<int64_t>(free_b);
    out.push_back(d);
  }
  return out;
}

}  // namespace duo::cuda
