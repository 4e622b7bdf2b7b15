#include "model/safetensors.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <tuple>
#include <vector>

#include "core/error.h"

namespace duo {

const char* weight_dtype_name(WeightDType t) {
  switch (t) {
    case WeightDType::kF32:
      return "F32";
    case WeightDType::kF16:
      return "F16";
    case WeightDType::kBF16:
      return "BF16";
  }
  return "?";
}

int64_t weight_dtype_bytes(WeightDType t) {
  return t == WeightDType::kF32 ? 4 : 2;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

std::string TensorView::shape_string() const {
  return shape_to_string(shape);
}

float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400) == 0);
      mant &= 0x3ff;
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | mant << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  uint32_t rounding = 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : file_(path) {
  const std::string where = path.string();
  const size_t size = file_.size();
  check(size >= 8, where, ": truncated safetensors file (", size,
        " bytes, expected an 8-byte header length)");
  uint64_t header_len = 0;
  std::memcpy(&header_len, file_.data(), 8);  // little-endian on every target we build for
  check(header_len <= size - 8, where, ": corrupt safetensors header: header length ", header_len,
        " exceeds the file size ", size);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(file_.data() + 8, file_.data() + 8 + header_len);
  } catch (const nlohmann::json::parse_error& e) {
    fail(where, ": corrupt safetensors header: invalid JSON (", e.what(), ")");
  }
  check(header.is_object(), where, ": corrupt safetensors header: expected a JSON object");
  const unsigned char* data_start = file_.data() + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  std::vector<std::tuple<uint64_t, uint64_t, std::string>> spans;  // [begin, end), name
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string tw = where + ": tensor '" + it.key() + "'";
    const auto& e = it.value();
    check(e.is_object() && e.contains("dtype") && e.contains("shape") && e.contains("data_offsets"),
          tw, ": expected dtype, shape and data_offsets");
    TensorView t;
    t.name = it.key();
    const std::string dt = e.at("dtype").is_string() ? e.at("dtype").get<std::string>() : "?";
    if (dt == "F32") {
      t.dtype = WeightDType::kF32;
    } else if (dt == "F16") {
      t.dtype = WeightDType::kF16;
    } else if (dt == "BF16") {
      t.dtype = WeightDType::kBF16;
    } else {
      fail(tw, ": unsupported dtype ", dt, " (expected F32, F16 or BF16)");
    }
    check(e.at("shape").is_array(), tw, ": shape must be a list");
    for (const auto& d : e.at("shape")) {
      check(d.is_number_integer() && d.get<int64_t>() >= 0, tw, ": bad shape entry ", d.dump());
      t.shape.push_back(d.get<int64_t>());
    }
    const auto& off = e.at("data_offsets");
    check(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() &&
              off[1].is_number_unsigned(),
          tw, ": data_offsets must be two non-negative integers");
    uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    check(begin <= end && end <= data_size, tw, ": data_offsets [", begin, ", ", end,
          "] fall outside the data section of ", data_size, " bytes (truncated file?)");
    // Element count and bytes without wrapping ([2^62, 4] must not pass as 0 bytes).
    uint64_t expected = weight_dtype_bytes(t.dtype);
    for (int64_t d : t.shape)
      check(!__builtin_mul_overflow(expected, static_cast<uint64_t>(d), &expected), tw, ": shape ",
            t.shape_string(), " of ", dt, " does not fit in 64-bit byte counts");
    check(end - begin == expected, tw, ": holds ", end - begin, " bytes but shape ",
          t.shape_string(), " of ", dt, " needs ", expected);
    t.data = data_start + begin;
    spans.emplace_back(begin, end, t.name);
    tensors_.emplace(t.name, std::move(t));
  }
  // Tensors may not share bytes (the format lays them out one after another).
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    check(std::get<0>(spans[i]) >= std::get<1>(spans[i - 1]), where, ": tensors '",
          std::get<2>(spans[i - 1]), "' and '", std::get<2>(spans[i]),
          "' overlap in the data section");
}

WeightStore WeightStore::open(const std::filesystem::path& model_dir) {
  WeightStore ws;
  std::error_code ec;
  check(std::filesystem::is_directory(model_dir, ec), model_dir.string(),
        ": model directory not found");
  const auto single = model_dir / "model.safetensors";
  const auto index = model_dir / "model.safetensors.index.json";
  std::vector<std::filesystem::path> shard_paths;
  std::map<std::string, std::string> weight_map;
  if (std::filesystem::exists(index, ec)) {
    auto j = read_json_file(index);
    check(j.is_object() && j.contains("weight_map") && j.at("weight_map").is_object(),
          index.string(), ": expected an object with a 'weight_map' object");
    std::set<std::string> files;
    for (auto it = j.at("weight_map").begin(); it != j.at("weight_map").end(); ++it) {
      check(it.value().is_string(), index.string(), ": weight_map['", it.key(),
            "'] must be a file name");
      weight_map[it.key()] = it.value().get<std::string>();
      files.insert(it.value().get<std::string>());
    }
    for (const auto& f : files) {
      check(f.find('/') == std::string::npos, index.string(), ": shard name '", f,
            "' must be a plain file name");
      shard_paths.push_back(model_dir / f);
    }
  } else if (std::filesystem::exists(single, ec)) {
    shard_paths.push_back(single);
  } else {
    fail(model_dir.string(),
         ": no weights found (expected model.safetensors or model.safetensors.index.json)");
  }
  for (const auto& p : shard_paths) {
    check(std::filesystem::exists(p, ec), p.string(), ": shard listed in the index is missing");
    ws.files_.push_back(std::make_unique<SafetensorsFile>(p));
    const SafetensorsFile* f = ws.files_.back().get();
    for (const auto& [name, view] : f->tensors()) {
      check(ws.index_.count(name) == 0, p.string(), ": tensor '", name, "' appears in two shards");
      ws.index_[name] = {f, &view};
    }
  }
  for (const auto& [name, file] : weight_map) {
    auto it = ws.index_.find(name);
    check(it != ws.index_.end(), index.string(), ": tensor '", name, "' is listed for ", file,
          " but not found there");
  }
  return ws;
}

const TensorView& WeightStore::get(const std::string& name,
                                   const std::vector<int64_t>& shape) const {
  auto it = index_.find(name);
  check(it != index_.end(), "weights: tensor '", name, "' not found in the checkpoint");
  const TensorView& t = *it->second.second;
  check(t.shape == shape, it->second.first->path().string(), ": tensor '", name,
        "': expected shape ", shape_to_string(shape), ", got ", t.shape_string());
  return t;
}

std::vector<float> WeightStore::load_f32(const std::string& name,
                                         const std::vector<int64_t>& shape) const {
  const TensorView& t = get(name, shape);
  const int64_t n = t.numel();
  std::vector<float> out(static_cast<size_t>(n));
  switch (t.dtype) {
    case WeightDType::kF32:
      std::memcpy(out.data(), t.data, static_cast<size_t>(n) * 4);
      break;
    case WeightDType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, t.data + 2 * i, 2);
        out[i] = bf16_to_f32(v);
      }
      break;
    case WeightDType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, t.data + 2 * i, 2);
        out[i] = f16_to_f32(v);
      }
      break;
  }
  // A NaN or Inf weight poisons every output (greedy decoding then picks token 0 forever): refuse
  // the checkpoint here, where every weight passes once. Branch-free so the pass vectorises.
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) finite &= std::fabs(out[i]) <= std::numeric_limits<float>::max();
  if (!finite) {
    int64_t i = 0;
    while (std::fabs(out[i]) <= std::numeric_limits<float>::max()) ++i;
    fail(index_.at(name).first->path().string(), ": tensor '", name, "' holds ", out[i],
         " at element ", i, ": the checkpoint is corrupt");
  }
  return out;
}

WeightDType WeightStore::main_dtype() const {
  std::map<WeightDType, int64_t> bytes;
  for (const auto& [name, ft] : index_) bytes[ft.second->dtype] += ft.second->numel();
  WeightDType best = WeightDType::kF32;
  int64_t most = -1;
  for (const auto& [dt, n] : bytes) {
    if (n > most) {
      most = n;
      best = dt;
    }
  }
  return best;
}

int64_t WeightStore::total_bytes() const {
  int64_t b = 0;
  for (const auto& [name, ft] : index_)
    b += ft.second->numel() * weight_dtype_bytes(ft.second->dtype);
  return b;
}

std::filesystem::path WeightStore::file_of(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? std::filesystem::path() : it->second.first->path();
}

std::vector<std::string> WeightStore::names() const {
  std::vector<std::string> out;
  for (const auto& [name, ft] : index_) out.push_back(name);
  return out;
}

}  // namespace duo
