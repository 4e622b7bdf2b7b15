#include "engine/model.h"

#include <algorithm>
#include <string>

#include "core/error.h"
#include "engine/random_fill.h"
#include "model/safetensors.h"

namespace duo {

HeadLayout HeadLayout::all_retrieval(const ModelConfig& c) {
  return from_partition(c, duo::all_retrieval(c.num_layers, c.num_kv_heads));
}

HeadLayout HeadLayout::from_partition(const ModelConfig& c, const HeadPartition& p) {
  check(p.num_layers == c.num_layers && p.num_kv_heads == c.num_kv_heads, "head partition of ",
        p.num_layers, " layers x ", p.num_kv_heads, " KV heads does not match the model (",
        c.num_layers, " x ", c.num_kv_heads, ")");
  HeadLayout h;
  for (int64_t l = 0; l < c.num_layers; ++l)
    h.layers.push_back(layer_head_order(p, l, c.group_size()));
  return h;
}

std::vector<int64_t> HeadLayout::num_retrieval() const {
  std::vector<int64_t> r;
  for (const auto& l : layers) r.push_back(l.num_retrieval);
  return r;
}

void HeadLayout::validate(const ModelConfig& c) const {
  check(static_cast<int64_t>(layers.size()) == c.num_layers, "head layout has ", layers.size(),
        " layers, the model has ", c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerHeadOrder& o = layers[l];
    std::vector<int32_t> sorted = o.kv_order;
    std::sort(sorted.begin(), sorted.end());
    bool ok = static_cast<int64_t>(sorted.size()) == c.num_kv_heads && o.num_retrieval >= 0 &&
              o.num_retrieval <= c.num_kv_heads &&
              static_cast<int64_t>(o.q_order.size()) == c.num_heads;
    for (int64_t i = 0; ok && i < c.num_kv_heads; ++i) ok = sorted[i] == i;
    for (int64_t i = 0; ok && i < c.num_heads; ++i)
      ok = o.q_order[i] == o.kv_order[i / c.group_size()] * c.group_size() + i % c.group_size();
    check(ok, "head layout: layer ", l, " is not a valid head permutation");
  }
}

namespace {

// Rows of a [heads * head_dim, cols] matrix (or a bias, cols == 1) reordered by head:
// new head p takes original head order[p].
std::vector<float> permute_head_rows(const std::vector<float>& w, const std::vector<int32_t>& order,
                                     int64_t head_dim, int64_t cols) {
  std::vector<float> out(w.size());
  const int64_t block = head_dim * cols;
  for (size_t p = 0; p < order.size(); ++p)
    std::copy(w.begin() + order[p] * block, w.begin() + (order[p] + 1) * block,
              out.begin() + p * block);
  return out;
}

// Columns of o_proj [rows, heads * head_dim] reordered the same way.
std::vector<float> permute_head_cols(const std::vector<float>& w, const std::vector<int32_t>& order,
                                     int64_t head_dim, int64_t rows) {
  std::vector<float> out(w.size());
  const int64_t cols = static_cast<int64_t>(order.size()) * head_dim;
  for (int64_t r = 0; r < rows; ++r)
    for (size_t p = 0; p < order.size(); ++p)
      std::copy(w.begin() + r * cols + order[p] * head_dim,
                w.begin() + r * cols + (order[p] + 1) * head_dim,
                out.begin() + r * cols + static_cast<int64_t>(p) * head_dim);
  return out;
}

}  // namespace

Model::Model(const std::filesystem::path& model_dir, Backend& backend, const HeadLayout& layout,
             WeightSource source, uint64_t seed)
    : config_(ModelConfig::load(model_dir)), backend_(&backend), layout_(layout), rope_(config_) {
  layout_.validate(config_);
  if (source == WeightSource::kCheckpoint) {
    load_checkpoint(model_dir);
  } else {
    load_random(seed);
  }
}

Model::Model(const ModelConfig& config, Backend& backend, const HeadLayout& layout, uint64_t seed)
    : config_(config), backend_(&backend), layout_(layout), rope_(config_) {
  layout_.validate(config_);
  load_random(seed);
}

void Model::load_checkpoint(const std::filesystem::path& model_dir) {
  const ModelConfig& c = config_;
  WeightStore ws = WeightStore::open(model_dir);
  Backend& b = *backend_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, d = c.head_dim;
  auto up2 = [&](const std::vector<float>& w, int64_t rows, int64_t cols) {
    return b.upload(w.data(), rows, cols);
  };
  embed_ = up2(ws.load_f32("model.embed_tokens.weight", {c.vocab_size, H}), c.vocab_size, H);
  final_norm_ = up2(ws.load_f32("model.norm.weight", {H}), 1, H);
  if (c.tie_word_embeddings) {
    lm_head_ = embed_;
  } else {
    lm_head_ = up2(ws.load_f32("lm_head.weight", {c.vocab_size, H}), c.vocab_size, H);
  }
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const auto& kvo = layout_.layers[l].kv_order;
    const auto& qo = layout_.layers[l].q_order;
    LayerWeights w;
    w.attn_norm = up2(ws.load_f32(p + "input_layernorm.weight", {H}), 1, H);
    w.mlp_norm = up2(ws.load_f32(p + "post_attention_layernorm.weight", {H}), 1, H);
    auto concat = [](std::vector<std::vector<float>> parts) {
      std::vector<float> all;
      for (const auto& v : parts) all.insert(all.end(), v.begin(), v.end());
      return all;
    };
    const int64_t qkv_rows = c.q_dim() + 2 * c.kv_dim();
    w.wqkv =
        up2(concat({permute_head_rows(ws.load_f32(p + "self_attn.q_proj.weight", {c.q_dim(), H}),
                                      qo, d, H),
                    permute_head_rows(ws.load_f32(p + "self_attn.k_proj.weight", {c.kv_dim(), H}),
                                      kvo, d, H),
                    permute_head_rows(ws.load_f32(p + "self_attn.v_proj.weight", {c.kv_dim(), H}),
                                      kvo, d, H)}),
            qkv_rows, H);
    w.wo =
        up2(permute_head_cols(ws.load_f32(p + "self_attn.o_proj.weight", {H, c.q_dim()}), qo, d, H),
            H, c.q_dim());
    if (c.qkv_bias) {
      w.bqkv = up2(
          concat(
              {permute_head_rows(ws.load_f32(p + "self_attn.q_proj.bias", {c.q_dim()}), qo, d, 1),
               permute_head_rows(ws.load_f32(p + "self_attn.k_proj.bias", {c.kv_dim()}), kvo, d, 1),
               permute_head_rows(ws.load_f32(p + "self_attn.v_proj.bias", {c.kv_dim()}), kvo, d,
                                 1)}),
          1, qkv_rows);
    }
    // The o_proj bias lives in the output (hidden) space: it is never permuted.
    if (c.o_bias) w.bo = up2(ws.load_f32(p + "self_attn.o_proj.bias", {H}), 1, H);
    w.w_gate_up = up2(concat({ws.load_f32(p + "mlp.gate_proj.weight", {I, H}),
                              ws.load_f32(p + "mlp.up_proj.weight", {I, H})}),
                      2 * I, H);
    w.w_down = up2(ws.load_f32(p + "mlp.down_proj.weight", {H, I}), H, I);
    check(!c.mlp_bias, model_dir.string(), ": mlp_bias=true is not supported");
    set_weight_views(w);
    layers_.push_back(w);
  }
}

void Model::load_random(uint64_t seed) {
  const ModelConfig& c = config_;
  Backend& b = *backend_;
  // Every weight ~ N(0, 0.02^2), norms 1.0; drawn on the backend (engine/random_fill.h), one
  // independent counter-based stream per tensor, so a 7-8B model needs no host copy.
  uint64_t tensor_index = 0;
  auto rand = [&](int64_t rows, int64_t cols) {
    return b.random_normal(rows, cols, 0.02f, tensor_seed(seed, tensor_index++));
  };
  auto ones = [&](int64_t n) { return b.constant(1, n, 1.0f); };
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  embed_ = rand(c.vocab_size, H);
  final_norm_ = ones(H);
  lm_head_ = c.tie_word_embeddings ? embed_ : rand(c.vocab_size, H);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    LayerWeights w;
    w.attn_norm = ones(H);
    w.mlp_norm = ones(H);
    w.wqkv = rand(c.q_dim() + 2 * c.kv_dim(), H);
    w.wo = rand(H, c.q_dim());
    if (c.qkv_bias) w.bqkv = rand(1, c.q_dim() + 2 * c.kv_dim());
    if (c.o_bias) w.bo = rand(1, H);
    w.w_gate_up = rand(2 * I, H);
    w.w_down = rand(H, I);
    set_weight_views(w);
    layers_.push_back(w);
  }
}

void Model::set_weight_views(LayerWeights& w) {
  Backend& b = *backend_;
  const int64_t qd = config_.q_dim(), kvd = config_.kv_dim(), I = config_.intermediate_size;
  w.wq = b.view_rows(w.wqkv, 0, qd);
  w.wk = b.view_rows(w.wqkv, qd, qd + kvd);
  w.wv = b.view_rows(w.wqkv, qd + kvd, qd + 2 * kvd);
  if (w.bqkv.data != nullptr) {
    w.bq = b.view_cols(w.bqkv, 0, qd);
    w.bk = b.view_cols(w.bqkv, qd, qd + kvd);
    w.bv = b.view_cols(w.bqkv, qd + kvd, qd + 2 * kvd);
  }
  w.w_gate = b.view_rows(w.w_gate_up, 0, I);
  w.w_up = b.view_rows(w.w_gate_up, I, 2 * I);
}

std::unique_ptr<KVCache> Model::make_cache(int64_t capacity, int64_t sink, int64_t recent,
                                           StreamingPrefill prefill) const {
  // Mistral v0.1 attends over a sliding window, which duo does not implement: within the window
  // full attention is the same thing, beyond it the answers would silently differ.
  check(!config_.sliding_window || capacity <= *config_.sliding_window,
        "this model uses sliding-window attention over ", config_.sliding_window.value_or(0),
        " tokens (config.json sliding_window), which duo does not implement: contexts up to that "
        "length only, got ",
        capacity);
  CacheSpec s;
  s.num_layers = config_.num_layers;
  s.num_kv_heads = config_.num_kv_heads;
  s.head_dim = config_.head_dim;
  s.capacity = capacity;
  s.num_retrieval = layout_.num_retrieval();
  s.sink = sink;
  s.recent = recent;
  s.prefill = prefill;
  return backend_->create_cache(s);
}

void Model::set_decode_graphs(bool on) {
  decode_graphs_ = on;
  if (!on) decode_graph_.reset();
}

void Model::reserve(int64_t rows) {
  if (rows <= reserved_) return;
  Backend& b = *backend_;
  const ModelConfig& c = config_;
  if (reserved_ == 0) {
    qkv1_ = b.alloc(1, c.q_dim() + 2 * c.kv_dim());
    gate_up1_ = b.alloc(1, 2 * c.intermediate_size);
  }
  x_ = b.alloc(rows, c.hidden_size);
  xn_ = b.alloc(rows, c.hidden_size);
  q_ = b.alloc(rows, c.q_dim());
  k_ = b.alloc(rows, c.kv_dim());
  v_ = b.alloc(rows, c.kv_dim());
  attn_ = b.alloc(rows, c.q_dim());
  proj_ = b.alloc(rows, c.hidden_size);
  gate_ = b.alloc(rows, c.intermediate_size);
  up_ = b.alloc(rows, c.intermediate_size);
  act_ = b.alloc(rows, c.intermediate_size);
  reserved_ = rows;
  ++scratch_generation_;
}

void Model::reserve_logits(int64_t rows) {
  if (rows <= logits_reserved_) return;  // sized by the rows asked for, not by the chunk
  logits_ = backend_->alloc(rows, config_.vocab_size);
  logits_reserved_ = rows;
  ++scratch_generation_;
}

void Model::run(std::span<const int32_t> tokens, int64_t p0, int64_t logit_rows,
                const RopeFrequencies& freqs, KVCache& cache) {
  const ModelConfig& c = config_;
  Backend& b = *backend_;
  const int64_t n = static_cast<int64_t>(tokens.size());
  std::vector<int64_t> positions(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) positions[i] = p0 + i;

  auto rows = [&](const Tensor& t) { return b.view_rows(t, 0, n); };
  Tensor x = rows(x_), xn = rows(xn_), q = rows(q_), k = rows(k_), v = rows(v_);
  Tensor attn = rows(attn_), proj = rows(proj_), gate = rows(gate_), up = rows(up_),
         act = rows(act_);

  const float eps = static_cast<float>(c.rms_norm_eps);
  const int64_t I = c.intermediate_size;
  b.embed(embed_, tokens, x);  // x [n, hidden]
  b.rmsnorm(x, layers_[0].attn_norm, eps, xn);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& w = layers_[l];
    // Attention block: x += o_proj(attention(rope(q), rope(k), v)); xn = rmsnorm(x) on entry.
    if (n == 1) {  // one GEMM for q, k, v; RoPE and attention in one call (fusable)
      Tensor qkv = qkv1_;
      b.linear(xn, w.wqkv, w.bqkv.data ? &w.bqkv : nullptr, qkv);            // [1, q + 2 kv]
      b.rope_attention(cache, l, qkv, c.num_heads, positions, freqs, attn);  // [1, heads * d]
    } else {
      b.linear(xn, w.wq, w.bq.data ? &w.bq : nullptr, q);  // [n, heads * d]
      b.linear(xn, w.wk, w.bk.data ? &w.bk : nullptr, k);  // [n, kv_heads * d]
      b.linear(xn, w.wv, w.bv.data ? &w.bv : nullptr, v);  // [n, kv_heads * d]
      b.rope(q, c.num_heads, c.head_dim, positions, freqs);
      b.rope(k, c.num_kv_heads, c.head_dim, positions, freqs);
      b.attention(cache, l, q, k, v, c.num_heads, attn);  // [n, heads * d]
    }
    b.linear(attn, w.wo, w.bo.data ? &w.bo : nullptr, proj);  // [n, hidden]
    b.add_rmsnorm(x, proj, w.mlp_norm, eps, xn);              // x += proj; xn = rmsnorm(x)
    // MLP block: x += down(silu(gate(xn)) * up(xn))
    if (n == 1) {
      Tensor gu = gate_up1_;
      b.linear(xn, w.w_gate_up, nullptr, gu);  // [1, 2 intermediate]
      gate = b.view_cols(gu, 0, I);
      up = b.view_cols(gu, I, 2 * I);
    } else {
      b.linear(xn, w.w_gate, nullptr, gate);  // [n, intermediate]
      b.linear(xn, w.w_up, nullptr, up);      // [n, intermediate]
    }
    b.swiglu(gate, up, act);
    b.linear(act, w.w_down, nullptr, proj);  // [n, hidden]
    if (l + 1 < c.num_layers) {
      b.add_rmsnorm(x, proj, layers_[l + 1].attn_norm, eps, xn);
    } else if (logit_rows > 0) {
      // Only the rows that get logits need the last residual: x += proj; xn = final_norm(x).
      Tensor last = b.view_rows(x_, n - logit_rows, n);
      Tensor last_proj = b.view_rows(proj_, n - logit_rows, n);
      Tensor last_n = b.view_rows(xn_, 0, logit_rows);
      b.add_rmsnorm(last, last_proj, final_norm_, eps, last_n);
      Tensor logits = b.view_rows(logits_, 0, logit_rows);
      b.linear(last_n, lm_head_, nullptr, logits);  // [logit_rows, vocab]
    }
  }
}

void Model::forward_device(std::span<const int32_t> tokens, KVCache& cache, int64_t logit_rows) {
  Backend& b = *backend_;
  const int64_t n = static_cast<int64_t>(tokens.size());
  check(n > 0, "forward: no tokens");
  check(logit_rows >= 0 && logit_rows <= n, "forward: logit_rows ", logit_rows, " outside 0..", n);
  const int64_t p0 = cache.length();
  check(p0 + n <= cache.spec().capacity, "context length exceeded: ", p0 + n,
        " tokens, but the context (-c) is ", cache.spec().capacity);
  reserve(n);
  reserve_logits(logit_rows);
  const RopeFrequencies& freqs = rope_.for_call(p0 + n - 1);
  const bool graph_step = decode_graphs_ && n == 1 && logit_rows == 1;
  if (graph_step && decode_graph_ && graph_generation_ == scratch_generation_ &&
      decode_graph_->usable_for(cache, freqs)) {
    decode_graph_->replay(tokens[0], cache, freqs);
    b.advance(cache, 1);
    return;
  }
  run(tokens, p0, logit_rows, freqs, cache);
  b.advance(cache, n);
  if (!graph_step) return;
  // This uncaptured step sized every buffer a step needs: record the next steps' graph now
  // (capture runs nothing; the token and position placeholders are replaced at replay).
  decode_graph_.reset();
  if (cache.length() < cache.spec().capacity) {
    decode_graph_ = b.capture_decode_step(cache, [&] { run(tokens, p0 + 1, 1, freqs, cache); });
    graph_generation_ = scratch_generation_;
  }
}

std::vector<float> Model::forward(std::span<const int32_t> tokens, KVCache& cache,
                                  int64_t logit_rows) {
  forward_device(tokens, cache, logit_rows);
  if (logit_rows == 0) return {};
  return backend_->download(logits_, 0, logit_rows);
}

int32_t Model::forward_greedy(std::span<const int32_t> tokens, KVCache& cache) {
  forward_device(tokens, cache, 1);
  return backend_->argmax_rows(logits_, 0, 1)[0];
}

}  // namespace duo
