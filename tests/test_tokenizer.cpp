#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/file_util.h"
#include "tokenizer/streaming_decoder.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode_nfc.h"
#include "tokenizer/utf8.h"

namespace fs = std::filesystem;

namespace {

fs::path fixtures() {
  return fs::path(DUO_SOURCE_DIR) / "tests/fixtures/tokenizers";
}

const nlohmann::json& cases() {
  static const nlohmann::json j = duo::read_json_file(fixtures() / "cases.json");
  return j;
}

const duo::Tokenizer& tokenizer(const std::string& name) {
  static std::map<std::string, std::unique_ptr<duo::Tokenizer>> cache;
  auto& p = cache[name];
  if (!p) p = duo::Tokenizer::load(fixtures() / name);
  return *p;
}

std::string show(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? ", " : "") + std::to_string(ids[i]);
  return s + "]";
}

class FixtureTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FixtureTest, MatchesHuggingFace) {
  const std::string name = GetParam();
  const auto& tok = tokenizer(name);
  EXPECT_EQ(tok.vocab_size(), cases()["vocab_sizes"][name].get<int32_t>());
  const auto& list = cases()["cases"][name];
  ASSERT_GT(list.size(), 10u);
  for (const auto& c : list) {
    const std::string text = c["text"];
    SCOPED_TRACE("text: \"" + text + "\"");
    auto ids = c["ids"].get<std::vector<int32_t>>();
    auto ids_ns = c["ids_no_special"].get<std::vector<int32_t>>();
    auto got = tok.encode(text);
    auto got_ns = tok.encode(text, false);
    EXPECT_EQ(got, ids) << "got " << show(got) << " want " << show(ids);
    EXPECT_EQ(got_ns, ids_ns) << "got " << show(got_ns) << " want " << show(ids_ns);
    EXPECT_EQ(tok.decode(ids), c["decode"].get<std::string>());
    EXPECT_EQ(tok.decode(ids, true), c["decode_skip_special"].get<std::string>());
    EXPECT_EQ(tok.decode(ids_ns), c["decode_no_special"].get<std::string>());
  }
}

TEST_P(FixtureTest, RoundTripWithoutSpecials) {
  // decode(encode(s, false)) == s for every case where HF itself round-trips. HF does not where
  // the text holds added tokens (legacy SentencePiece adds a "▁" after each; lstrip/rstrip tokens
  // eat whitespace), a literal "▁" (decoded as a space), or, for Metaspace(prepend_scheme=first),
  // a leading space (not doubled on encode, stripped on decode). Those decodes are compared with
  // HF's in MatchesHuggingFace instead.
  const auto& tok = tokenizer(GetParam());
  int checked = 0;
  for (const auto& c : cases()["cases"][GetParam()]) {
    const std::string text = c["text"];
    if (c["decode_no_special"].get<std::string>() != text) continue;
    EXPECT_EQ(tok.decode(tok.encode(text, false)), text) << "text: \"" << text << "\"";
    ++checked;
  }
  EXPECT_GT(checked, 80);
}

TEST_P(FixtureTest, StreamingMatchesDecode) {
  const auto& tok = tokenizer(GetParam());
  for (const auto& c : cases()["cases"][GetParam()]) {
    const std::string text = c["text"];
    auto ids = c["ids"].get<std::vector<int32_t>>();
    for (bool skip : {false, true}) {
      duo::StreamingDecoder dec(tok, skip);
      std::string all;
      for (int32_t id : ids) {
        std::string piece = dec.push(id);
        EXPECT_TRUE(duo::utf8::is_valid(piece)) << "text: \"" << text << "\"";
        all += piece;
      }
      all += dec.flush();
      EXPECT_EQ(all, tok.decode(ids, skip)) << "text: \"" << text << "\" skip=" << skip;
    }
  }
}

// Random id sequences, many of them invalid UTF-8 (stray byte tokens): decode() and the streaming
// decoder must reproduce HF's U+FFFD placement exactly.
TEST_P(FixtureTest, RandomIdsDecodeAndStream) {
  const auto& tok = tokenizer(GetParam());
  const auto& list = cases()["random_ids"][GetParam()];
  ASSERT_GE(list.size(), 50u);
  for (const auto& c : list) {
    auto ids = c["ids"].get<std::vector<int32_t>>();
    SCOPED_TRACE("ids " + show(ids));
    for (bool skip : {false, true}) {
      const std::string want = c[skip ? "decode_skip_special" : "decode"];
      EXPECT_EQ(tok.decode(ids, skip), want);
      duo::StreamingDecoder dec(tok, skip);
      std::string all;
      for (int32_t id : ids) {
        std::string piece = dec.push(id);
        EXPECT_TRUE(duo::utf8::is_valid(piece));
        all += piece;
      }
      all += dec.flush();
      EXPECT_EQ(all, want) << "skip=" << skip;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Tokenizers, FixtureTest,
                         ::testing::Values("bytelevel", "bytelevel_chatml", "sentencepiece",
                                           "sentencepiece_json", "sentencepiece_metaspace",
                                           "sentencepiece_added"));

TEST(Tokenizer, SpecialIdsAndSources) {
  const auto& bl = tokenizer("bytelevel");
  EXPECT_EQ(bl.source_file(), "tokenizer.json");
  EXPECT_EQ(bl.bos_id(), 1019);
  EXPECT_EQ(bl.token_to_id("<|eot_id|>"), 1021);
  EXPECT_EQ(bl.id_to_token(1023), "<|end_header_id|>");
  EXPECT_TRUE(bl.is_special(1021));
  EXPECT_FALSE(bl.is_special(100));
  ASSERT_FALSE(bl.eos_ids().empty());
  EXPECT_EQ(bl.eos_ids()[0], 1021);
  EXPECT_TRUE(bl.has_chat_template());

  const auto& chatml = tokenizer("bytelevel_chatml");
  EXPECT_FALSE(chatml.bos_id().has_value());
  EXPECT_EQ(chatml.eos_ids()[0], chatml.token_to_id("<|im_end|>").value());
  EXPECT_TRUE(chatml.encode("hi", true) == chatml.encode("hi", false));

  const auto& sp = tokenizer("sentencepiece");
  EXPECT_EQ(sp.source_file(), "tokenizer.model");
  EXPECT_EQ(sp.bos_id(), 1);
  EXPECT_EQ(sp.eos_ids()[0], 2);
  EXPECT_EQ(sp.id_to_token(0), "<unk>");
  EXPECT_TRUE(sp.is_special(1));
  EXPECT_EQ(sp.id_to_token(3 + 0x41), "<0x41>");
}

TEST(Tokenizer, SentencePieceFilesAgree) {
  // tokenizer.model (libsentencepiece) and its HF conversion must agree on arbitrary text.
  const auto& a = tokenizer("sentencepiece");
  const auto& b = tokenizer("sentencepiece_json");
  std::string text = duo::read_text_file(fixtures() / "cases.json").substr(0, 20000);
  EXPECT_EQ(a.encode(text), b.encode(text));
}

TEST(Tokenizer, StreamingHoldsPartialCharacters) {
  const auto& sp = tokenizer("sentencepiece_json");
  // 😀 = F0 9F 98 80 as four byte-fallback tokens (after "▁"): held until the run ends.
  std::vector<int32_t> ids = sp.encode("\U0001F600!", false);
  ASSERT_GE(ids.size(), 5u);
  duo::StreamingDecoder dec(sp);
  std::string out;
  for (size_t i = 0; i + 1 < ids.size(); ++i) out += dec.push(ids[i]);
  EXPECT_EQ(out, "");
  EXPECT_EQ(dec.push(ids.back()), "\U0001F600!");
  EXPECT_EQ(dec.flush(), "");
  // A run that is not valid UTF-8 as a whole: one U+FFFD per byte, as HF's ByteFallback.
  const int32_t e2 = sp.token_to_id("<0xE2>").value(), x98 = sp.token_to_id("<0x98>").value(),
                x83 = sp.token_to_id("<0x83>").value(), xff = sp.token_to_id("<0xFF>").value();
  std::vector<int32_t> bad{e2, x98, x83, xff};
  duo::StreamingDecoder d0(sp);
  out.clear();
  for (int32_t id : bad) out += d0.push(id);
  out += d0.flush();
  EXPECT_EQ(out, sp.decode(bad));
  EXPECT_EQ(out, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");

  const auto& bl = tokenizer("bytelevel");
  ids = bl.encode("\xE2\x98\x83", false);  // ☃: three byte tokens in this small vocab
  ASSERT_EQ(ids.size(), 3u);
  duo::StreamingDecoder d2(bl);
  EXPECT_EQ(d2.push(ids[0]), "");
  EXPECT_EQ(d2.push(ids[1]), "");
  EXPECT_EQ(d2.push(ids[2]), "\xE2\x98\x83");
  // Truncated character: flush() gives U+FFFD like HF's errors="replace".
  duo::StreamingDecoder d3(bl);
  EXPECT_EQ(d3.push(ids[0]), "");
  EXPECT_EQ(d3.flush(), "\xEF\xBF\xBD");
  EXPECT_EQ(bl.decode(std::vector<int32_t>{ids[0], ids[1]}), "\xEF\xBF\xBD");
}

TEST(Tokenizer, SentencePieceStreamingStripsOnlyFirstSpace) {
  const auto& sp = tokenizer("sentencepiece_json");
  auto ids = sp.encode("Hello world, again", false);
  duo::StreamingDecoder dec(sp);
  std::string out;
  for (int32_t id : ids) out += dec.push(id);
  out += dec.flush();
  EXPECT_EQ(out, "Hello world, again");
  // With BOS skipped, the strip still applies to the first visible token.
  ids = sp.encode("Hello", true);
  duo::StreamingDecoder d2(sp, true);
  out.clear();
  for (int32_t id : ids) out += d2.push(id);
  EXPECT_EQ(out, "Hello");
}

TEST(Tokenizer, EncodeLargeTextFast) {
  for (const auto* name : {"bytelevel", "sentencepiece_json", "sentencepiece_metaspace"}) {
    const auto& tok = tokenizer(name);
    std::string text;
    const std::string para =
        "It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife.\n  However little known the feelings or views of "
        "such a man may be on his first entering a neighbourhood, 1813 -- caf\xC3\xA9!\n";
    while (text.size() < 100000) text += para;
    auto t0 = std::chrono::steady_clock::now();
    auto ids = tok.encode(text, false);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_LT(secs, 1.0) << name;
    EXPECT_EQ(tok.decode(ids), text) << name;
  }
}

// Bytes that are not UTF-8 (a binary file, Latin-1 text) encode as their lossy conversion, on
// every tokenizer kind; random bytes (NULs, lone continuation bytes, truncated and overlong
// sequences) crashed the byte-level pre-tokenizer before.
TEST(Tokenizer, InvalidUtf8EncodesAsItsLossyConversion) {
  for (const auto* name : {"bytelevel", "bytelevel_chatml", "sentencepiece", "sentencepiece_added",
                           "sentencepiece_json", "sentencepiece_metaspace"}) {
    const auto& tok = tokenizer(name);
    EXPECT_EQ(tok.encode("caf\xE9 au lait", false),
              tok.encode("caf\xEF\xBF\xBD au lait", false))  // Latin-1 e-acute -> U+FFFD
        << name;
    std::mt19937 rng(17);
    for (int trial = 0; trial < 40; ++trial) {
      std::string bytes(1 + static_cast<size_t>(rng() % 3000), '\0');
      for (auto& c : bytes) c = static_cast<char>(rng() % 256);
      bytes[rng() % bytes.size()] = '\xFF';  // never valid UTF-8
      ASSERT_FALSE(duo::utf8::is_valid(bytes));
      EXPECT_EQ(tok.encode(bytes, false), tok.encode(duo::utf8::lossy(bytes), false))
          << name << ", trial " << trial;
    }
  }
}

void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no duo::Error thrown";
  } catch (const duo::Error& e) {
    std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << msg << " lacks " << p;
  }
}

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("duo_tok_test_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
             "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }
  void write(const std::string& name, const std::string& text) const {
    std::ofstream(path_ / name, std::ios::binary) << text;
  }

 private:
  fs::path path_;
};

TEST(TokenizerErrors, MissingDirectory) {
  expect_error([] { duo::Tokenizer::load("/nonexistent/duo/model"); },
               {"/nonexistent/duo/model", "directory"});
}

TEST(TokenizerErrors, NoTokenizerFile) {
  TempDir d;
  d.write("config.json", "{}");
  expect_error([&] { duo::Tokenizer::load(d.path()); },
               {d.path().string(), "tokenizer.json", "tokenizer.model"});
}

TEST(TokenizerErrors, CorruptJson) {
  TempDir d;
  d.write("tokenizer.json", "{\"model\": {\"type\": \"BPE\", ");
  expect_error([&] { duo::Tokenizer::load(d.path()); }, {"tokenizer.json", "invalid JSON"});
}

TEST(TokenizerErrors, MissingModel) {
  TempDir d;
  d.write("tokenizer.json", "{\"version\": \"1.0\"}");
  expect_error([&] { duo::Tokenizer::load(d.path()); }, {"tokenizer.json", "'model'"});
}

TEST(TokenizerErrors, UnknownModelType) {
  TempDir d;
  for (const char* type : {"Unigram", "WordPiece"}) {
    d.write("tokenizer.json",
            std::string("{\"model\": {\"type\": \"") + type + "\", \"vocab\": []}}");
    expect_error([&] { duo::Tokenizer::load(d.path()); }, {"tokenizer.json", "model.type", type});
  }
}

TEST(TokenizerErrors, UnknownPreTokenizer) {
  TempDir d;
  d.write("tokenizer.json",
          R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
              "pre_tokenizer": {"type": "BertPreTokenizer"}})");
  expect_error([&] { duo::Tokenizer::load(d.path()); },
               {"tokenizer.json", "pre_tokenizer", "BertPreTokenizer"});
}

TEST(TokenizerErrors, BadMerge) {
  TempDir d;
  d.write("tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})");
  expect_error([&] { duo::Tokenizer::load(d.path()); }, {"tokenizer.json", "model.merges[0]"});
}

// Ids that index the tables must be in range (a negative added-token id corrupted the heap), and a
// Metaspace pre-tokenizer needs a replacement (an empty one looped forever).
TEST(TokenizerErrors, BadIdsAndEmptyMetaspaceReplacement) {
  TempDir d;
  d.write("tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
      "added_tokens": [{"id": -1, "content": "<x>", "special": true}]})");
  expect_error([&] { duo::Tokenizer::load(d.path()); },
               {"tokenizer.json", "added_tokens[].id", "-1 is outside"});
  d.write("tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 1099511627776},
      "merges": []}})");
  expect_error([&] { duo::Tokenizer::load(d.path()); },
               {"tokenizer.json", "model.vocab[\"a\"]", "outside"});
  d.write("tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
      "pre_tokenizer": {"type": "Metaspace", "replacement": "", "prepend_scheme": "always"}})");
  expect_error([&] { duo::Tokenizer::load(d.path()); },
               {"tokenizer.json", "Metaspace", "empty 'replacement'"});
}

TEST(TokenizerErrors, DecodeOutOfRange) {
  for (const auto* name : {"bytelevel", "sentencepiece"}) {
    const auto& tok = tokenizer(name);
    std::vector<int32_t> ids{5, tok.vocab_size()};
    expect_error([&] { tok.decode(ids); }, {"token id", std::to_string(tok.vocab_size())});
    std::vector<int32_t> neg{-1};
    expect_error([&] { tok.decode(neg); }, {"token id -1"});
  }
}

}  // namespace

namespace {

TEST(Unicode, Nfc) {
  using duo::utf8::nfc;
  EXPECT_EQ(nfc("plain ascii"), "plain ascii");
  EXPECT_EQ(nfc("cafe\xCC\x81"), "caf\xC3\xA9");                           // e + U+0301 -> é
  EXPECT_EQ(nfc("\xE2\x84\xAB"), "\xC3\x85");                              // U+212B ANGSTROM -> Å
  EXPECT_EQ(nfc("\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8"), "\xEA\xB0\x81");  // L V T -> 각
  // a + U+0301 (230) + U+0328 (202): reordered to a + ogonek + acute, then ą + acute.
  EXPECT_EQ(nfc("a\xCC\x81\xCC\xA8"), "\xC4\x85\xCC\x81");
  EXPECT_EQ(nfc("\xE1\xB8\x8B\xCC\xA3"), "\xE1\xB8\x8D\xCC\x87");  // ḋ + dot below -> ḍ + dot above
  EXPECT_EQ(nfc("x\xFFy\xC3\xA9"), "x\xFFy\xC3\xA9");              // invalid byte passes through
}

}  // namespace

namespace {

// Split behaviours / invert, Digits, ByteLevel(use_regex), Metaspace schemes and the Metaspace
// decoder, as patches to a fixture tokenizer.json, against `tokenizers`.
TEST(Tokenizer, ComponentVariantsMatchTokenizers) {
  const auto doc = duo::read_json_file(fixtures() / "variants.json");
  const fs::path dir = fs::temp_directory_path() / "duo_tok_variant";
  int checked = 0;
  for (const auto& v : doc.at("variants")) {
    auto spec = duo::read_json_file(fixtures() / v["base"].get<std::string>() / "tokenizer.json");
    for (const auto& [k, val] : v["patch"].items()) spec[k] = val;
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::ofstream(dir / "tokenizer.json") << spec.dump();
    auto tok = duo::Tokenizer::load(dir);
    for (const auto& c : v["cases"]) {
      const std::string text = c["text"];
      SCOPED_TRACE(v["patch"].dump() + " text: \"" + text + "\"");
      auto ids = c["ids"].get<std::vector<int32_t>>();
      EXPECT_EQ(tok->encode(text), ids);
      EXPECT_EQ(tok->decode(ids), c["decode"].get<std::string>());
      duo::StreamingDecoder dec(*tok, false);
      std::string all;
      for (int32_t id : ids) all += dec.push(id);
      all += dec.flush();
      EXPECT_EQ(all, c["decode"].get<std::string>());
      ++checked;
    }
  }
  fs::remove_all(dir);
  EXPECT_EQ(checked, 40 * 25);
}

}  // namespace
