// Head identification: the multi-passkey data of duoattention.md section 4, the attention probe
// behind the heuristic, and `duo identify --method heuristic` end to end.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "core/error.h"
#include "duo/head_pattern.h"
#include "engine/backend.h"
#include "eval/multi_passkey.h"
#include "eval/niah.h"
#include "test_util.h"

namespace duo {
namespace {

using testing::fixture;

TEST(MultiPasskey, SampleFollowsTheRecipe) {
  auto tok = Tokenizer::load(fixture("models/llama3_gqa"));
  auto hay = haystack_tokens(*tok, "", 3000);
  std::mt19937_64 rng(42);
  PasskeyOptions o;
  o.haystack_tokens = 2000;
  PasskeySample s = make_multi_passkey_sample(*tok, hay, o, rng);
  ASSERT_EQ(s.passkeys.size(), 10u);
  const std::set<std::string> nato = {
      "alpha",  "bravo", "charlie", "delta",  "echo",     "foxtrot", "golf",   "hotel",  "india",
      "juliet", "kilo",  "lima",    "mike",   "november", "oscar",   "papa",   "quebec", "romeo",
      "sierra", "tango", "uniform", "victor", "whiskey",  "xray",    "yankee", "zulu"};
  for (const auto& k : s.passkeys) {
    std::istringstream is(k);
    std::string w;
    int count = 0;
    while (is >> w) {
      EXPECT_TRUE(nato.count(w)) << w;
      ++count;
    }
    EXPECT_EQ(count, 32);
  }
  EXPECT_TRUE(std::is_sorted(s.needle_positions.begin(), s.needle_positions.end()));
  const std::string qa = tok->decode(
      std::span<const int32_t>(s.ids).subspan(static_cast<size_t>(s.label_begin)), true);
  EXPECT_EQ(
      qa.rfind(
          "Based on the content of the book, what is the first passkey to the vault?\nPasskey: " +
              s.passkeys[0],
          0),
      0u);
  const std::string all = tok->decode(s.ids, true);
  EXPECT_NE(all.find("it's the tenth passkey to the vault: " + s.passkeys[9]), std::string::npos);
  // Needles lie between 5% and 95% of the haystack.
  EXPECT_GT(s.needle_positions.front(), 1 + 2000 * 5 / 100 - 1);
}

TEST(MultiPasskey, QaStyleUsesTheDemoModelsFormat) {
  auto tok = Tokenizer::load(fixture("models/llama3_gqa"));
  auto hay = haystack_tokens(*tok, "", 3000);
  std::mt19937_64 rng(1);
  PasskeyOptions o;
  o.style = PasskeyStyle::kQa;
  o.num_passkeys = 4;
  o.haystack_tokens = 1000;
  PasskeySample s = make_multi_passkey_sample(*tok, hay, o, rng);
  ASSERT_EQ(s.passkeys.size(), 4u);
  const std::string qa = tok->decode(
      std::span<const int32_t>(s.ids).subspan(static_cast<size_t>(s.label_begin)), true);
  EXPECT_EQ(qa, "\n\nQuestion: What is the pass key?\nAnswer: " + s.passkeys[0] +
                    "\n\nQuestion: What is the secret passkey?\nAnswer: " + s.passkeys[1] +
                    "\n\nQuestion: What is the access code?\nAnswer: " + s.passkeys[2] +
                    "\n\nQuestion: What is the magic number?\nAnswer: " + s.passkeys[3] + "\n");
  EXPECT_NE(tok->decode(s.ids, true)
                .find("\nThe pass key is " + s.passkeys[0] + ". Remember it. " + s.passkeys[0] +
                      " is the pass key.\n"),
            std::string::npos);
  o.num_passkeys = 5;
  EXPECT_THROW(make_multi_passkey_sample(*tok, hay, o, rng), Error);
  // Too few token depths for distinct passkeys: an error (this looped forever before). 4 passkeys
  // at depths 0.05..0.95 need 2 x 4 / 0.9 -> 9 tokens.
  o.num_passkeys = 4;
  o.haystack_tokens = 8;
  try {
    make_multi_passkey_sample(*tok, hay, o, rng);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("too short for 4 passkeys"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("need at least 9 tokens"), std::string::npos) << e.what();
  }
  o.haystack_tokens = 9;
  EXPECT_EQ(make_multi_passkey_sample(*tok, hay, o, rng).passkeys.size(), 4u);
}

// The probe's long-range mass equals the softmax mass outside the window, computed directly.
TEST(LongRangeProbe, MatchesDirectComputation) {
  const int64_t N = 40, d = 8, heads = 2, S = 3, R = 5, qb = 30;
  for (CpuMode mode : {CpuMode::kReference, CpuMode::kFast}) {
    auto be = make_cpu_backend(mode);
    auto cache = be->create_cache(CacheSpec{1, 1, d, N, {1}, 0, 0, StreamingPrefill::kExact});
    std::mt19937_64 rng(5);
    std::normal_distribution<float> nd;
    std::vector<float> Q(N * heads * d), K(N * d), V(N * d);
    for (auto* v : {&Q, &K, &V})
      for (float& x : *v) x = 2 * nd(rng);
    LongRangeProbe probe;
    probe.query_begin = qb;
    probe.sink = S;
    probe.recent = R;
    probe.mass.assign(1, 0.0);
    probe.weight.assign(1, 0.0);
    probe.deviation.assign(1, 0.0);
    be->set_long_range_probe(&probe);
    Tensor q = be->upload(Q.data(), N, heads * d), k = be->upload(K.data(), N, d),
           v = be->upload(V.data(), N, d);
    Tensor o = be->alloc(N, heads * d);
    be->attention(*cache, 0, q, k, v, heads, o);
    be->set_long_range_probe(nullptr);
    double want = 0, want_dev = 0;
    for (int64_t t = qb; t < N; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        std::vector<double> s(static_cast<size_t>(t + 1));
        double mx = -1e300, sum = 0;
        for (int64_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (int64_t e = 0; e < d; ++e) dot += Q[(t * heads + h) * d + e] * K[j * d + e];
          s[j] = dot / std::sqrt(static_cast<double>(d));
          mx = std::max(mx, s[j]);
        }
        for (double& x : s) sum += (x = std::exp(x - mx));
        for (int64_t j = S; j <= t - R; ++j) want += s[j] / sum;
        // Output over all keys vs output renormalised over the window (j < S or j > t - R).
        double wmass = 0, diff = 0, norm = 0;
        for (int64_t j = 0; j <= t; ++j)
          if (j < S || j > t - R) wmass += s[j] / sum;
        for (int64_t e = 0; e < d; ++e) {
          double full = 0, win = 0;
          for (int64_t j = 0; j <= t; ++j) {
            full += s[j] / sum * V[j * d + e];
            if (j < S || j > t - R) win += s[j] / sum * V[j * d + e];
          }
          diff += (full - win / wmass) * (full - win / wmass);
          norm += full * full;
        }
        want_dev += diff / norm;
      }
    EXPECT_NEAR(probe.deviation[0], want_dev, 1e-3 * want_dev);
    EXPECT_GT(want_dev, 0.1);
    EXPECT_NEAR(probe.mass[0], want, 1e-4);
    EXPECT_EQ(probe.weight[0], static_cast<double>((N - qb) * heads));
    EXPECT_GT(want, 1.0);  // the test means something: there is mass outside the window
  }
}

TEST(Identify, HeuristicWritesAPattern) {
  testing::TempDir t("identify");
  const std::string corpus = (testing::source_dir() / "data/haystack").string();
  auto r = testing::run_duo("identify --method heuristic -m " +
                            fixture("models/llama3_gqa").string() + " --corpus " + corpus +
                            " --samples 2 --ctx-min 150 --ctx-max 300 --sink 4 --recent 16 -o " +
                            (t / "pat").string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  HeadPattern p = load_head_pattern(t / "pat");
  EXPECT_EQ(p.num_layers, 2);
  EXPECT_EQ(p.num_kv_heads, 2);
  EXPECT_EQ(*std::max_element(p.gates.begin(), p.gates.end()), 1.0);
  EXPECT_EQ(p.sink_size, 4);
  EXPECT_EQ(p.config["method"], "heuristic");
}

nlohmann::json read_json(const std::filesystem::path& p) {
  return nlohmann::json::parse(testing::read_file(p));
}

std::string gate_args(const testing::TempDir& t, const std::string& extra) {
  return "identify -m " + fixture("models/llama3_gqa").string() + " --corpus " +
         (testing::source_dir() / "data/haystack").string() +
         " --ctx-min 150 --ctx-max 300 --sink 4 --recent 16 --passkeys 2 -o " +
         (t / "pat").string() + " " + extra;
}

TEST(Identify, GateWritesAPatternLogAndResumes) {
  testing::TempDir t("identify_gate");
  auto r = testing::run_duo(gate_args(t, "--steps 6 --save-every 4"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("step 6/6"), std::string::npos) << r.err;
  HeadPattern p = load_head_pattern(t / "pat");
  EXPECT_EQ(p.num_layers, 2);
  EXPECT_EQ(p.num_kv_heads, 2);
  for (double g : p.gates) {
    EXPECT_GE(g, 0.0);
    EXPECT_LE(g, 1.0);
  }
  EXPECT_EQ(p.config["method"], "gate");
  EXPECT_EQ(p.sink_size, 4);
  EXPECT_EQ(p.recent_size, 16);
  EXPECT_EQ(p.config["steps_done"], 6);
  auto log = read_json(t / "pat/train_log.json")["steps"];
  ASSERT_EQ(log.size(), 6u);
  for (const auto& e : log) {
    EXPECT_TRUE(std::isfinite(e["loss"].get<double>()));
    EXPECT_GE(e["loss"].get<double>(), e["distill_loss"].get<double>());
  }
  EXPECT_EQ(log[0]["distill_loss"].get<double>(), 0.0);  // gates start at 1: student == teacher
  // Resume to 8 steps: continues from step 6 (the checkpoint), keeps the first 6 log entries.
  auto r2 = testing::run_duo(gate_args(t, "--steps 8 --resume"));
  ASSERT_EQ(r2.exit_code, 0) << r2.err;
  EXPECT_EQ(r2.err.find("step 1/8"), std::string::npos) << r2.err;
  EXPECT_NE(r2.err.find("step 7/8"), std::string::npos) << r2.err;
  auto log2 = read_json(t / "pat/train_log.json")["steps"];
  ASSERT_EQ(log2.size(), 8u);
  EXPECT_EQ(log2[5], log[5]);
  EXPECT_EQ(read_json(t / "pat/gate_checkpoint.json")["optimizer"]["step"], 8);
  // The data stream does not depend on --steps: an uninterrupted 8-step run sees the same
  // samples, so the resumed run restored the data RNG. (Gates differ: the schedule follows
  // --steps.)
  testing::TempDir t2("identify_gate2");
  auto a = testing::run_duo(gate_args(t2, "--steps 8 --save-every 3"));
  ASSERT_EQ(a.exit_code, 0) << a.err;
  auto full = read_json(t2 / "pat/train_log.json")["steps"];
  ASSERT_EQ(full.size(), 8u);
  EXPECT_EQ(full[0]["tokens"], log[0]["tokens"]);   // same seeded data
  EXPECT_EQ(full[7]["tokens"], log2[7]["tokens"]);  // resume restored the data RNG
}

// --labels picks the rows the loss averages over: the question-and-answer block (the paper), or
// every row from sink + recent on (4 + 16 here). Same seed, so both runs see the same samples.
TEST(Identify, GateLabelsChooseTheLossRows) {
  testing::TempDir qa("identify_gate_labels_qa"), all("identify_gate_labels_all");
  ASSERT_EQ(testing::run_duo(gate_args(qa, "--steps 3")).exit_code, 0);
  auto r = testing::run_duo(gate_args(all, "--steps 3 --labels all"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto log_qa = read_json(qa / "pat/train_log.json")["steps"];
  auto log_all = read_json(all / "pat/train_log.json")["steps"];
  ASSERT_EQ(log_qa.size(), 3u);
  ASSERT_EQ(log_all.size(), 3u);
  for (size_t s = 0; s < 3; ++s) {
    const int64_t n = log_qa[s]["tokens"];
    ASSERT_EQ(log_all[s]["tokens"], n);
    EXPECT_EQ(log_all[s]["labelled_tokens"], n - 20);
    const int64_t qa_rows = log_qa[s]["labelled_tokens"];
    EXPECT_GT(qa_rows, 0);
    EXPECT_LT(qa_rows, n / 2);  // the QA block of 2 passkeys, after a 150..300-token haystack
  }
  // After the first update the gates are below 1 and the two losses average different rows.
  EXPECT_NE(log_all[1]["distill_loss"], log_qa[1]["distill_loss"]);
  EXPECT_EQ(load_head_pattern(all / "pat").config["labels"],
            "every row from sink_size + recent_size on");
  EXPECT_EQ(load_head_pattern(qa / "pat").config["labels"], "question-and-answer block");
  auto other = testing::run_duo(gate_args(qa, "--steps 4 --resume --labels all"));
  EXPECT_NE(other.exit_code, 0);
  EXPECT_NE(other.err.find("labels"), std::string::npos) << other.err;
  // A checkpoint written before --labels existed (no "labels" in its config) trained on the QA
  // block: resuming it with --labels all is refused too, with --labels qa it goes on.
  auto ck = read_json(qa / "pat/gate_checkpoint.json");
  ck["config"].erase("labels");
  {
    std::ofstream out(qa / "pat/gate_checkpoint.json");
    out << ck.dump(1);
  }
  auto old_all = testing::run_duo(gate_args(qa, "--steps 4 --resume --labels all"));
  EXPECT_NE(old_all.exit_code, 0);
  EXPECT_NE(old_all.err.find("labels"), std::string::npos) << old_all.err;
  auto old_qa = testing::run_duo(gate_args(qa, "--steps 4 --resume"));
  EXPECT_EQ(old_qa.exit_code, 0) << old_qa.err;
  auto bad = testing::run_duo(gate_args(qa, "--labels everything"));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--labels"), std::string::npos) << bad.err;
}

TEST(Identify, GateHighRegularisationPushesGatesDown) {
  testing::TempDir t("identify_gate_reg");
  auto r = testing::run_duo(gate_args(t, "--steps 5 --reg 10 --lr 0.05"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto ck = read_json(t / "pat/gate_checkpoint.json");
  for (double g : ck["optimizer"]["gates"].get<std::vector<double>>()) EXPECT_LT(g, 0.99);
}

TEST(Identify, GateRejectsBadFlags) {
  testing::TempDir t("identify_gate_bad");
  for (const std::string& bad :
       {std::string("--steps 0"), std::string("--ctx-min 300 --ctx-max 100"),
        std::string("--mask block --block 128"), std::string("--save-every 0"),
        std::string("--lr -1"), std::string("--resume")}) {
    auto r = testing::run_duo(gate_args(t, bad));
    EXPECT_NE(r.exit_code, 0) << bad;
    EXPECT_FALSE(r.err.empty()) << bad;
  }
  auto blk = testing::run_duo(gate_args(t, "--mask block --block 128"));
  EXPECT_NE(blk.err.find("multiples of the block size"), std::string::npos) << blk.err;
  auto res = testing::run_duo(gate_args(t, "--resume"));
  EXPECT_NE(res.err.find("no checkpoint"), std::string::npos) << res.err;
  // A checkpoint from other settings is refused.
  ASSERT_EQ(testing::run_duo(gate_args(t, "--steps 1")).exit_code, 0);
  auto other = testing::run_duo(gate_args(t, "--steps 2 --resume --reg 0.1"));
  EXPECT_NE(other.exit_code, 0);
  EXPECT_NE(other.err.find("reg_weight"), std::string::npos) << other.err;
}

// Flags of one mode are refused in the other, with the flag's name.
TEST(Identify, ModeSpecificFlagsAreRefusedElsewhere) {
  testing::TempDir t("identify_mode_flags");
  const std::string heuristic =
      "identify --method heuristic -m " + fixture("models/llama3_gqa").string() + " --corpus " +
      (testing::source_dir() / "data/haystack").string() + " -o " + (t / "pat").string() + " ";
  for (const std::string flag : {"--steps 5", "--lr 0.1", "--resume", "--json x.json",
                                 "--profile-contexts 1000,2000,4000"}) {
    auto r = testing::run_duo(heuristic + flag);
    EXPECT_EQ(r.exit_code, 1) << flag;
    EXPECT_NE(r.err.find("only goes with --method gate"), std::string::npos) << flag << r.err;
  }
  for (const std::string flag : {"--json x.json", "--profile-steps 2", "--config c.json"}) {
    auto r = testing::run_duo(gate_args(t, "--backend cpu " + flag));
    EXPECT_EQ(r.exit_code, 1) << flag;
    EXPECT_NE(r.err.find("only goes with --profile-contexts"), std::string::npos) << r.err;
  }
  auto ref = testing::run_duo(gate_args(t, "--backend cpu-reference --steps 1"));
  EXPECT_EQ(ref.exit_code, 1);
  EXPECT_NE(ref.err.find("no reference CPU engine"), std::string::npos) << ref.err;
}

TEST(Identify, GateBlockMaskRuns) {
  testing::TempDir t("identify_gate_block");
  auto r = testing::run_duo(gate_args(t, "--steps 2 --mask block --block 4"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(load_head_pattern(t / "pat").config["streaming_attn_mask"], "block");
}

}  // namespace
}  // namespace duo
