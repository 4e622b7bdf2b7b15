// `duo info -m DIR`: what a model directory holds, validated (config, weights, tokenizer).
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace duo::cli {

namespace {

struct InfoArgs {
  std::string model_dir;
  bool json = false;
};

std::string tokenizer_kind(const std::filesystem::path& dir) {
  if (std::filesystem::exists(dir / "tokenizer.json")) return "tokenizer.json";
  if (std::filesystem::exists(dir / "tokenizer.model")) return "tokenizer.model (SentencePiece)";
  return "none";
}

void run_info(const InfoArgs& a) {
  const std::filesystem::path dir = a.model_dir;
  const ModelConfig c = ModelConfig::load(dir);
  const WeightStore ws = WeightStore::open(dir);
  const int64_t params = c.parameter_count();
  const WeightDType dt = ws.main_dtype();
  const int64_t kv_bf16 = c.kv_bytes_per_token(2);
  if (a.json) {
    nlohmann::json j = {
        {"model_dir", dir.string()},
        {"model_type", c.model_type},
        {"layers", c.num_layers},
        {"hidden_size", c.hidden_size},
        {"intermediate_size", c.intermediate_size},
        {"heads", c.num_heads},
        {"kv_heads", c.num_kv_heads},
        {"head_dim", c.head_dim},
        {"vocab_size", c.vocab_size},
        {"parameters", params},
        {"weights_dtype", weight_dtype_name(dt)},
        {"weights_bytes", ws.total_bytes()},
        {"kv_bytes_per_token_bf16", kv_bf16},
        {"max_position_embeddings", c.max_position_embeddings},
        {"rope_theta", c.rope_theta},
        {"rope_type", rope_type_name(c.rope.type)},
        {"rope_factor", c.rope.factor},
        {"tie_word_embeddings", c.tie_word_embeddings},
        {"tokenizer", tokenizer_kind(dir)},
    };
    std::cout << j.dump(2) << "\n";
    return;
  }
  std::printf("model        %s\n", dir.c_str());
  std::printf("architecture %s: %lld layers, hidden %lld, MLP %lld, vocab %lld\n",
              c.model_type.c_str(), static_cast<long long>(c.num_layers),
              static_cast<long long>(c.hidden_size), static_cast<long long>(c.intermediate_size),
              static_cast<long long>(c.vocab_size));
  std::printf("attention    %lld query heads, %lld KV heads (%s), head_dim %lld%s\n",
              static_cast<long long>(c.num_heads), static_cast<long long>(c.num_kv_heads),
              c.num_heads == c.num_kv_heads
                  ? "MHA"
                  : ("GQA " + std::to_string(c.group_size()) + ":1").c_str(),
              static_cast<long long>(c.head_dim), c.qkv_bias ? ", q/k/v bias" : "");
  std::printf("parameters   %s (%lld)%s\n", human_count(params).c_str(),
              static_cast<long long>(params), c.tie_word_embeddings ? ", tied embeddings" : "");
  std::printf("weights      %s, %s on disk\n", weight_dtype_name(dt),
              human_bytes(ws.total_bytes()).c_str());
  std::printf("rope         theta %g, %s", c.rope_theta, rope_type_name(c.rope.type));
  if (c.rope.type != RopeType::kDefault) std::printf(" (factor %g)", c.rope.factor);
  std::printf("\n");
  std::printf("max context  %lld tokens (max_position_embeddings)\n",
              static_cast<long long>(c.max_position_embeddings));
  std::printf("KV cache     %s per token in bf16 (%s at max context, full attention)\n",
              human_bytes(kv_bf16).c_str(),
              human_bytes(kv_bf16 * c.max_position_embeddings).c_str());
  std::printf("tokenizer    %s\n", tokenizer_kind(dir).c_str());
}

}  // namespace

void add_info_command(CLI::App& app) {
  auto args = std::make_shared<InfoArgs>();
  CLI::App* cmd =
      app.add_subcommand("info", "Describe a model directory (config, weights, KV bytes)");
  cmd->add_option("-m,--model", args->model_dir, "Hugging Face model directory")->required();
  cmd->add_flag("--json", args->json, "Print one JSON object");
  cmd->callback([args] { run_info(*args); });
}

}  // namespace duo::cli
