// Memory-mapped safetensors checkpoints: a single model.safetensors or shards listed in
// model.safetensors.index.json. Tensors are validated (dtype, shape, byte range) when opened.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/file_util.h"

namespace duo {

enum class WeightDType { kF32, kF16, kBF16 };

const char* weight_dtype_name(WeightDType t);
int64_t weight_dtype_bytes(WeightDType t);

struct TensorView {
  std::string name;
  WeightDType dtype = WeightDType::kF32;
  std::vector<int64_t> shape;
  const unsigned char* data = nullptr;  // points into the memory map
  int64_t numel() const;
  std::string shape_string() const;  // "[4, 16]"
};

// One .safetensors file.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::filesystem::path& path() const { return file_.path(); }

 private:
  MappedFile file_;
  std::map<std::string, TensorView> tensors_;
};

// All tensors of a model directory, by name.
class WeightStore {
 public:
  static WeightStore open(const std::filesystem::path& model_dir);

  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // The tensor, checked against the expected shape; throws Error naming file, tensor and shapes.
  const TensorView& get(const std::string& name, const std::vector<int64_t>& shape) const;
  // Copies the tensor into fp32, converting from bf16/f16.
  std::vector<float> load_f32(const std::string& name, const std::vector<int64_t>& shape) const;
  // Dtype of the bulk of the weights (by bytes).
  WeightDType main_dtype() const;
  int64_t total_bytes() const;
  std::filesystem::path file_of(const std::string& name) const;
  std::vector<std::string> names() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<const SafetensorsFile*, const TensorView*>> index_;
};

// Numeric conversions shared by loaders and tests.
float bf16_to_f32(uint16_t v);
float f16_to_f32(uint16_t v);
uint16_t f32_to_bf16(float f);  // round to nearest even

}  // namespace duo
