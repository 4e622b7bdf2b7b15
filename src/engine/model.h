// A Llama-family decoder (llama, mistral, qwen2) on a Backend: weights, head layout, forward pass.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <vector>

#include "duo/head_pattern.h"
#include "engine/backend.h"
#include "engine/rope.h"
#include "model/config.h"

namespace duo {

// Per-layer physical order of heads after loading (duo/head_pattern.h, LayerHeadOrder): retrieval
// KV heads first, so each layer has two contiguous head ranges; query groups move with their KV
// head. Any order that keeps the retrieval heads in front gives the same outputs (tested).
struct HeadLayout {
  std::vector<LayerHeadOrder> layers;

  static HeadLayout all_retrieval(const ModelConfig& c);
  static HeadLayout from_partition(const ModelConfig& c, const HeadPartition& p);
  std::vector<int64_t> num_retrieval() const;
  // Throws Error unless every layer is a permutation of the model's heads with q_order following
  // kv_order by groups.
  void validate(const ModelConfig& c) const;
};

// q/k/v projections are one [q_dim + 2 kv_dim, hidden] matrix (and one bias) and gate/up one
// [2 intermediate, hidden] matrix, so that a decode step (one row) runs each as one GEMM; wq, wk,
// wv, w_gate, w_up (and bq, bk, bv) are views of their rows (columns for the biases).
struct LayerWeights {
  Tensor attn_norm, wqkv, bqkv, wq, wk, wv, wo, bq, bk, bv, bo;  // absent biases: data == nullptr
  Tensor mlp_norm, w_gate_up, w_gate, w_up, w_down;
};

class Model {
 public:
  enum class WeightSource { kCheckpoint, kRandom };

  // Loads config.json and the safetensors weights of model_dir onto the backend, permuting heads
  // per layout. kRandom builds weights from config.json alone (seeded) for benchmarks.
  Model(const std::filesystem::path& model_dir, Backend& backend, const HeadLayout& layout,
        WeightSource source = WeightSource::kCheckpoint, uint64_t seed = 0);
  Model(const ModelConfig& config, Backend& backend, const HeadLayout& layout, uint64_t seed);

  const ModelConfig& config() const { return config_; }
  const HeadLayout& layout() const { return layout_; }
  Backend& backend() { return *backend_; }

  // A cache sized for `capacity` tokens with this model's head layout.
  std::unique_ptr<KVCache> make_cache(int64_t capacity, int64_t sink, int64_t recent,
                                      StreamingPrefill prefill) const;

  // Runs tokens (at positions cache.length() ...) through the model, appending to the cache.
  // Returns logits [logit_rows x vocab] for the last `logit_rows` tokens (row-major).
  std::vector<float> forward(std::span<const int32_t> tokens, KVCache& cache,
                             int64_t logit_rows = 1);
  // forward() with one logit row, returning its argmax (the greedy next token; lowest id among
  // equal logits), computed on the backend so that only the id crosses to the host.
  int32_t forward_greedy(std::span<const int32_t> tokens, KVCache& cache);

  // Single-token forward calls replay a captured decode step where the backend can
  // (Backend::capture_decode_step; on by default). The first single-token call on a cache runs
  // uncaptured and records the graph for the next ones; a different cache, a moved scratch buffer
  // or other RoPE settings record it again. Results are bit-identical either way.
  void set_decode_graphs(bool on);
  bool decode_graphs() const { return decode_graphs_; }

 private:
  void load_checkpoint(const std::filesystem::path& model_dir);
  void load_random(uint64_t seed);
  // Sets the views of LayerWeights (wq .. from wqkv, w_gate / w_up from w_gate_up).
  void set_weight_views(LayerWeights& w);
  void reserve(int64_t rows);
  void reserve_logits(int64_t rows);
  // Runs n tokens through the layers at positions p0.. (rope / attention take them from the
  // arguments, or from the decode graph's device inputs while capturing) and writes the logits of
  // the last logit_rows tokens to logits_ rows [0, logit_rows). Does not advance the cache.
  void run(std::span<const int32_t> tokens, int64_t p0, int64_t logit_rows,
           const RopeFrequencies& freqs, KVCache& cache);
  // forward() up to the logits in logits_ rows [0, logit_rows), through the decode graph when it
  // applies.
  void forward_device(std::span<const int32_t> tokens, KVCache& cache, int64_t logit_rows);

  ModelConfig config_;
  Backend* backend_;
  HeadLayout layout_;
  RopeState rope_;
  Tensor embed_, final_norm_, lm_head_;
  std::vector<LayerWeights> layers_;
  // Scratch activations, sized for reserved_ rows.
  int64_t reserved_ = 0;
  int64_t logits_reserved_ = 0;
  Tensor x_, xn_, q_, k_, v_, attn_, proj_, gate_, up_, act_, logits_;
  Tensor qkv1_, gate_up1_;  // one-row outputs of the fused projections (decode steps)
  // Decode graph and the scratch generation it was captured with (reserve() bumps it when the
  // scratch tensors move).
  bool decode_graphs_ = true;
  std::unique_ptr<DecodeGraph> decode_graph_;
  int64_t scratch_generation_ = 0;
  int64_t graph_generation_ = -1;
};

}  // namespace duo
