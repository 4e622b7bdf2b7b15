// What the CUDA runtime reports about the GPUs of this machine (`duo devices`).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace duo::cuda {

struct DeviceInfo {
  int index = 0;
  std::string name;
  int sm_major = 0;
  int sm_minor = 0;
  int multiprocessors = 0;
  int64_t total_memory_bytes = 0;
  int64_t free_memory_bytes = 0;
};

// Empty when the driver reports no device (e.g. CI without a GPU); never throws for that case.
std::vector<DeviceInfo> list_devices();

}  // namespace duo::cuda
