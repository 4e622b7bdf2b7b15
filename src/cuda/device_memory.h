// Device allocations with in-use / peak accounting, shared by the CUDA backend and the CUDA gate
// trainer (both report peak device memory). Out of memory is one clear duo::Error naming what was
// being allocated, how much, what is free and what this owner already holds.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <utility>

#include "core/error.h"

namespace duo::cuda {

class DeviceMemory {
 public:
  explicit DeviceMemory(std::string owner) : owner_(std::move(owner)) {}
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    for (auto& [p, n] : sizes_) (void)cudaFree(p);
  }

  void* alloc(int64_t bytes, const char* what) {
    if (bytes <= 0) bytes = 16;  // a valid, distinct pointer for empty tensors
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, static_cast<size_t>(bytes));
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      (void)cudaMemGetInfo(&free_b, &total_b);
      auto mib = [](double b) { return b / (1 << 20); };
      fail(owner_, ": out of memory allocating ", what, ": requested ", bytes, " bytes (",
           mib(static_cast<double>(bytes)), " MiB), ", mib(static_cast<double>(free_b)),
           " MiB free of ", mib(static_cast<double>(total_b)), " MiB (", cudaGetErrorString(e),
           "); ", owner_, " holds ", mib(static_cast<double>(in_use_)), " MiB");
    }
    sizes_[p] = bytes;
    in_use_ += bytes;
    peak_ = std::max(peak_, in_use_);
    return p;
  }
  void free(void* p) {
    if (p == nullptr) return;
    auto it = sizes_.find(p);
    if (it != sizes_.end()) {
      in_use_ -= it->second;
      sizes_.erase(it);
    }
    (void)cudaFree(p);
  }
  int64_t in_use() const { return in_use_; }
  int64_t peak() const { return peak_; }
  void reset_peak() { peak_ = in_use_; }

 private:
  std::string owner_;
  std::map<void*, int64_t> sizes_;
  int64_t in_use_ = 0;
  int64_t peak_ = 0;
};

}  // namespace duo::cuda
