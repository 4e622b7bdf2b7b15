#include "tokenizer/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <sentencepiece_processor.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "core/file_util.h"
#include "model/config.h"  // kMaxVocab
#include "tokenizer/bpe.h"
#include "tokenizer/unicode_nfc.h"
#include "tokenizer/utf8.h"

namespace duo {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Compiled PCRE2 pattern (UTF + Unicode properties), JIT-compiled when available.
class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (code_ == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      fail(where, ": cannot compile regex '", pattern, "' at offset ", off, ": ",
           reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // optional speed-up; failure is fine
    data_ = pcre2_match_data_create_from_pattern(code_, nullptr);
  }
  ~Regex() {
    pcre2_match_data_free(data_);
    pcre2_code_free(code_);
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Non-overlapping, non-empty matches as (start, end) byte ranges.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::pair<size_t, size_t>> out;
    size_t pos = 0;
    while (pos <= s.size()) {
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos,
                           PCRE2_NO_UTF_CHECK, data_, nullptr);
      if (rc < 0) break;
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(data_);
      size_t a = ov[0], b = ov[1];
      if (b > a) {
        out.emplace_back(a, b);
        pos = b;
      } else {
        if (a >= s.size()) break;
        pos = a + utf8::char_len(s, a);
      }
    }
    return out;
  }

 private:
  pcre2_code* code_ = nullptr;
  pcre2_match_data* data_ = nullptr;
  mutable std::mutex mutex_;
};

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  if (from.empty()) return std::string(s);
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (true) {
    size_t j = s.find(from, i);
    if (j == std::string_view::npos) break;
    out.append(s.substr(i, j - i));
    out.append(to);
    i = j + from.size();
  }
  out.append(s.substr(i));
  return out;
}

bool is_space_at(std::string_view s, size_t i, size_t* len) {
  unsigned char c = static_cast<unsigned char>(s[i]);
  if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f') {
    *len = 1;
    return true;
  }
  if (c < 0x80) return false;
  size_t j = i;
  uint32_t cp = utf8::next_code_point(s, j);
  *len = j - i;
  return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
         cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// Reads a token string given as "text" or {"content": "text"} (tokenizer_config.json styles).
std::optional<std::string> token_string(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string())
    return j["content"].get<std::string>();
  return std::nullopt;
}

// Boolean field of tokenizer_config.json; missing or null gives `def`.
bool config_flag(const json& config, const char* key, bool def, const fs::path& path) {
  if (!config.contains(key) || config[key].is_null()) return def;
  check(config[key].is_boolean(), path.string(), ": field '", key, "': expected true or false");
  return config[key].get<bool>();
}

std::string field_string(const json& j, const char* key, const std::string& where) {
  check(j.contains(key) && j[key].is_string(), where, ": field '", key, "': expected a string");
  return j[key].get<std::string>();
}

// "pattern": {"String": "x"} or {"Regex": "x"}; returns (text, is_regex).
std::pair<std::string, bool> pattern_of(const json& j, const std::string& where) {
  check(j.contains("pattern") && j["pattern"].is_object(), where,
        ": field 'pattern': expected {\"String\": ...} or {\"Regex\": ...}");
  const json& p = j["pattern"];
  if (p.contains("String") && p["String"].is_string())
    return {p["String"].get<std::string>(), false};
  if (p.contains("Regex") && p["Regex"].is_string()) return {p["Regex"].get<std::string>(), true};
  fail(where, ": field 'pattern': expected {\"String\": ...} or {\"Regex\": ...}");
}

struct AddedToken {
  int32_t id;
  std::string content;
  bool special;
  bool lstrip;
  bool rstrip;
  bool normalized;      // matched in the normalized text (else in the raw input)
  std::string match{};  // what is looked for: content, or normalize(content) when normalized
};

// Added tokens by first byte, longest content first (leftmost-longest matching).
using AddedIndex = std::array<std::vector<size_t>, 256>;

struct Normalizer {
  enum Kind { kPrepend, kReplace, kNfc } kind;
  std::string a, b;
};

enum class SplitBehavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizer {
  enum Kind { kSplit, kByteLevel, kMetaspace } kind;
  explicit PreTokenizer(Kind k) : kind(k) {}
  std::shared_ptr<Regex> regex;  // kSplit, kByteLevel with use_regex
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;
  std::string replacement;  // kMetaspace
  enum Prepend { kAlways, kFirst, kNever } prepend = kAlways;
  bool split = false;
};

struct Decoder {
  enum Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
  explicit Decoder(Kind k) : kind(k) {}
  std::string pattern, content;
  int start = 0, stop = 0;
  bool prepend = true;  // kMetaspace
};

struct Piece {
  std::string text;
  size_t offset;  // byte offset in the original input (approximate after normalization)
};

int parse_byte_token(std::string_view t) {
  if (t.size() != 6 || t[0] != '<' || t[1] != '0' || t[2] != 'x' || t[5] != '>') return -1;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  int h = hex(t[3]), l = hex(t[4]);
  return h < 0 || l < 0 ? -1 : h * 16 + l;
}

std::string byte_level_bytes(std::string_view token) {
  std::string out;
  size_t i = 0;
  while (i < token.size()) {
    uint32_t cp = utf8::next_code_point(token, i);
    int b = utf8::unicode_to_byte(cp);
    if (b < 0) return std::string(token);  // not a byte-level string: raw text (as tokenizers)
    out += static_cast<char>(b);
  }
  return out;
}

}  // namespace

struct TokenizerImpl {
  std::string source;  // file name used
  fs::path source_path;
  std::vector<std::string> id_to_token;
  std::unordered_map<std::string, int32_t> token_to_id;
  std::vector<bool> special;
  std::vector<AddedToken> added;
  AddedIndex raw_index;         // added tokens with normalized == false
  AddedIndex normalized_index;  // added tokens with normalized == true
  bool have_normalized_added = false;

  std::vector<Normalizer> normalizers;
  std::vector<PreTokenizer> pre_tokenizers;
  std::vector<Decoder> decoders;
  bool has_decoder = false;
  bool byte_fallback_decoder = false;           // decoders include ByteFallback
  std::vector<int32_t> prefix_ids, suffix_ids;  // added by the post-processor / add_bos_token

  std::unique_ptr<BpeModel> bpe;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp;

  std::optional<int32_t> bos;
  std::vector<int32_t> eos;
  bool chat_template = false;
  std::string chat_template_text;

  void index_added() {
    for (size_t k = 0; k < added.size(); ++k) {
      // tokenizer.model has no normalizer: everything is matched on the raw text. Normalized
      // tokens are looked for in their normalized form (HF: Prepend("▁") makes "<x>" match only
      // as "▁<x>", i.e. after a space or at the start of a segment).
      bool norm = added[k].normalized && !sp;
      added[k].match = norm ? normalize(added[k].content) : added[k].content;
      if (added[k].match.empty()) continue;
      // tokenizers also decodes such a token as its normalized form ("▁<x>" -> " <x>").
      if (norm) id_to_token[added[k].id] = added[k].match;
      have_normalized_added |= norm;
      (norm ? normalized_index : raw_index)[static_cast<unsigned char>(added[k].match[0])]
          .push_back(k);
    }
    for (AddedIndex* index : {&raw_index, &normalized_index})
      for (auto& v : *index)
        std::stable_sort(v.begin(), v.end(), [&](size_t a, size_t b) {
          return added[a].match.size() > added[b].match.size();
        });
  }

  void set_token(int32_t id, const std::string& tok) {
    if (id < 0) return;
    if (static_cast<size_t>(id) >= id_to_token.size()) {
      id_to_token.resize(id + 1);
      special.resize(id + 1, false);
    }
    id_to_token[id] = tok;
    token_to_id[tok] = id;
  }

  // Splits text into added-token matches (id >= 0) and plain segments (id == -1).
  struct Segment {
    size_t begin, end;
    int32_t id;
  };
  std::vector<Segment> split_added(std::string_view text, const AddedIndex& index) const {
    std::vector<Segment> out;
    size_t seg_start = 0;
    size_t i = 0;
    while (i < text.size()) {
      const auto& cands = index[static_cast<unsigned char>(text[i])];
      const AddedToken* hit = nullptr;
      for (size_t k : cands) {
        const auto& c = added[k].match;
        if (text.compare(i, c.size(), c) == 0) {
          hit = &added[k];
          break;
        }
      }
      if (hit == nullptr) {
        ++i;
        continue;
      }
      size_t seg_end = i;
      if (hit->lstrip) {
        while (seg_end > seg_start) {
          size_t p = seg_end - 1;
          while (p > seg_start && (static_cast<unsigned char>(text[p]) & 0xC0) == 0x80) --p;
          size_t len;
          if (!is_space_at(text, p, &len)) break;
          seg_end = p;
        }
      }
      if (seg_end > seg_start) out.push_back({seg_start, seg_end, -1});
      out.push_back({i, i + hit->match.size(), hit->id});
      i += hit->match.size();
      if (hit->rstrip) {
        size_t len;
        while (i < text.size() && is_space_at(text, i, &len)) i += len;
      }
      seg_start = i;
    }
    if (seg_start < text.size()) out.push_back({seg_start, text.size(), -1});
    return out;
  }

  std::string normalize(std::string_view s) const {
    std::string cur(s);
    for (const auto& n : normalizers) {
      switch (n.kind) {
        case Normalizer::kPrepend:
          if (!cur.empty()) cur = n.a + cur;
          break;
        case Normalizer::kReplace:
          cur = replace_all(cur, n.a, n.b);
          break;
        case Normalizer::kNfc:
          cur = utf8::nfc(cur);
          break;
      }
    }
    return cur;
  }

  static void split_pieces(const Regex& re, SplitBehavior behavior, bool invert, const Piece& p,
                           std::vector<Piece>& out) {
    struct Span {
      size_t a, b;
      bool delim;
    };
    std::vector<Span> spans;
    size_t last = 0;
    for (auto [a, b] : re.find_all(p.text)) {
      if (a > last) spans.push_back({last, a, invert});
      spans.push_back({a, b, !invert});
      last = b;
    }
    if (last < p.text.size()) spans.push_back({last, p.text.size(), invert});
    auto emit = [&](size_t a, size_t b) {
      if (b > a) out.push_back({p.text.substr(a, b - a), p.offset + a});
    };
    switch (behavior) {
      case SplitBehavior::kIsolated:
        for (const auto& s : spans) emit(s.a, s.b);
        break;
      case SplitBehavior::kRemoved:
        for (const auto& s : spans)
          if (!s.delim) emit(s.a, s.b);
        break;
      case SplitBehavior::kMergedWithPrevious: {
        size_t start = 0;
        bool open = false;
        for (const auto& s : spans) {
          if (s.delim) {
            emit(open ? start : s.a, s.b);
            open = false;
          } else {
            if (open) emit(start, s.a);
            start = s.a;
            open = true;
          }
        }
        if (open) emit(start, p.text.size());
        break;
      }
      case SplitBehavior::kMergedWithNext: {
        size_t start = 0;
        bool pending = false;
        for (const auto& s : spans) {
          if (s.delim) {
            if (pending) emit(start, s.a);
            start = s.a;
            pending = true;
          } else {
            emit(pending ? start : s.a, s.b);
            pending = false;
          }
        }
        if (pending) emit(start, p.text.size());
        break;
      }
      case SplitBehavior::kContiguous: {
        size_t i = 0;
        while (i < spans.size()) {
          // tokenizers merges every run of adjacent spans with the same flag (with invert, that
          // includes adjacent pattern matches).
          size_t j = i;
          while (j + 1 < spans.size() && spans[j + 1].delim == spans[i].delim) ++j;
          emit(spans[i].a, spans[j].b);
          i = j + 1;
        }
        break;
      }
    }
  }

  std::vector<Piece> pre_tokenize(std::string text, size_t offset) const {
    std::vector<Piece> pieces{{std::move(text), offset}};
    for (const auto& pt : pre_tokenizers) {
      std::vector<Piece> next;
      for (auto& p : pieces) {
        switch (pt.kind) {
          case PreTokenizer::kSplit:
            split_pieces(*pt.regex, pt.behavior, pt.invert, p, next);
            break;
          case PreTokenizer::kByteLevel: {
            std::vector<Piece> sub;
            Piece q = p;
            if (pt.add_prefix_space && (q.text.empty() || q.text[0] != ' ')) q.text = " " + q.text;
            if (pt.regex) {
              split_pieces(*pt.regex, SplitBehavior::kIsolated, false, q, sub);
            } else {
              sub.push_back(std::move(q));
            }
            const auto& table = utf8::byte_to_unicode();
            for (auto& s : sub) {
              std::string mapped;
              mapped.reserve(s.text.size() * 2);
              for (unsigned char c : s.text) mapped += table[c];
              next.push_back({std::move(mapped), s.offset});
            }
            break;
          }
          case PreTokenizer::kMetaspace: {
            Piece q{replace_all(p.text, " ", pt.replacement), p.offset};
            bool starts = q.text.compare(0, pt.replacement.size(), pt.replacement) == 0;
            if (!starts && (pt.prepend == PreTokenizer::kAlways ||
                            (pt.prepend == PreTokenizer::kFirst && q.offset == 0)))
              q.text = pt.replacement + q.text;
            if (pt.split) {
              // Split on the replacement, MergedWithNext.
              size_t start = 0;
              size_t pos = q.text.find(pt.replacement, pt.replacement.size());
              while (pos != std::string::npos) {
                next.push_back({q.text.substr(start, pos - start), q.offset + start});
                start = pos;
                pos = q.text.find(pt.replacement, pos + pt.replacement.size());
              }
              if (start < q.text.size()) next.push_back({q.text.substr(start), q.offset + start});
            } else {
              next.push_back(std::move(q));
            }
            break;
          }
        }
      }
      pieces = std::move(next);
    }
    return pieces;
  }

  void encode_segment(std::string_view seg, size_t offset, std::vector<int32_t>& out) const {
    if (sp) {
      std::vector<int> ids;
      auto status = sp->Encode(seg, &ids);
      check(status.ok(), source_path.string(),
            ": sentencepiece encode failed: ", status.ToString());
      out.insert(out.end(), ids.begin(), ids.end());
      return;
    }
    std::string norm = normalize(seg);
    if (norm.empty()) return;
    if (!have_normalized_added) {
      for (const auto& p : pre_tokenize(std::move(norm), offset)) bpe->encode_word(p.text, out);
      return;
    }
    // Added tokens flagged `normalized` are looked for in the normalized text (as HF does).
    for (const auto& part : split_added(norm, normalized_index)) {
      if (part.id >= 0) {
        out.push_back(part.id);
        continue;
      }
      for (const auto& p :
           pre_tokenize(norm.substr(part.begin, part.end - part.begin), offset + part.begin))
        bpe->encode_word(p.text, out);
    }
  }

  std::string run_decoders(std::vector<std::string> tokens) const {
    if (!has_decoder) {
      std::string out;
      for (size_t i = 0; i < tokens.size(); ++i) {
        if (i) out += ' ';
        out += tokens[i];
      }
      return out;
    }
    for (const auto& d : decoders) {
      switch (d.kind) {
        case Decoder::kByteLevel: {
          std::string bytes;
          for (const auto& t : tokens) bytes += byte_level_bytes(t);
          tokens.assign(1, utf8::lossy(bytes));
          break;
        }
        case Decoder::kReplace:
          for (auto& t : tokens) t = replace_all(t, d.pattern, d.content);
          break;
        case Decoder::kByteFallback: {
          std::vector<std::string> next;
          std::string pending;
          auto flush = [&] {
            if (pending.empty()) return;
            if (utf8::is_valid(pending)) {
              next.push_back(pending);
            } else {
              std::string r;
              for (size_t k = 0; k < pending.size(); ++k) r += utf8::kReplacement;
              next.push_back(r);
            }
            pending.clear();
          };
          for (auto& t : tokens) {
            int b = parse_byte_token(t);
            if (b >= 0) {
              pending += static_cast<char>(b);
            } else {
              flush();
              next.push_back(std::move(t));
            }
          }
          flush();
          tokens = std::move(next);
          break;
        }
        case Decoder::kFuse: {
          std::string all;
          for (const auto& t : tokens) all += t;
          tokens.assign(1, std::move(all));
          break;
        }
        case Decoder::kStrip:
          for (auto& t : tokens) {
            size_t a = 0, b = t.size();
            for (int k = 0; k < d.start && t.compare(a, d.content.size(), d.content) == 0; ++k)
              a += d.content.size();
            for (int k = 0; k < d.stop && b >= a + d.content.size() &&
                            t.compare(b - d.content.size(), d.content.size(), d.content) == 0;
                 ++k)
              b -= d.content.size();
            t = t.substr(a, b - a);
          }
          break;
        case Decoder::kMetaspace:
          for (size_t k = 0; k < tokens.size(); ++k) {
            tokens[k] = replace_all(tokens[k], d.pattern, " ");
            if (k == 0 && d.prepend && !tokens[k].empty() && tokens[k][0] == ' ')
              tokens[k].erase(0, 1);
          }
          break;
      }
    }
    std::string out;
    for (const auto& t : tokens) out += t;
    return out;
  }

  std::string raw_token_bytes(const std::string& tok) const {
    if (!has_decoder) return tok;
    std::string t = tok;
    for (const auto& d : decoders) {
      switch (d.kind) {
        case Decoder::kByteLevel:
          t = byte_level_bytes(t);
          break;
        case Decoder::kReplace:
          t = replace_all(t, d.pattern, d.content);
          break;
        case Decoder::kByteFallback: {
          int b = parse_byte_token(t);
          if (b >= 0) t.assign(1, static_cast<char>(b));
          break;
        }
        case Decoder::kMetaspace:
          t = replace_all(t, d.pattern, " ");
          break;
        case Decoder::kFuse:
        case Decoder::kStrip:
          break;
      }
    }
    return t;
  }

  int strip_count() const {
    int n = 0;
    for (const auto& d : decoders) {
      if (d.kind == Decoder::kStrip && d.content == " ") n += d.start;
      if (d.kind == Decoder::kMetaspace && d.prepend) n += 1;
    }
    return n;
  }

  void check_id(int32_t id) const {
    check(id >= 0 && static_cast<size_t>(id) < id_to_token.size(), source_path.string(),
          ": token id ", id, " is out of range [0, ", id_to_token.size(), ")");
  }
};

namespace {

void parse_normalizer(const json& j, const std::string& where, TokenizerImpl& t) {
  if (j.is_null()) return;
  std::string type = field_string(j, "type", where + " normalizer");
  if (type == "Sequence") {
    check(j.contains("normalizers") && j["normalizers"].is_array(), where,
          ": field 'normalizer.normalizers': expected an array");
    for (const auto& n : j["normalizers"]) parse_normalizer(n, where, t);
  } else if (type == "Prepend") {
    t.normalizers.push_back({Normalizer::kPrepend, field_string(j, "prepend", where), ""});
  } else if (type == "Replace") {
    auto [pat, is_regex] = pattern_of(j, where + " normalizer Replace");
    check(!is_regex, where, ": normalizer Replace with a Regex pattern is not supported");
    t.normalizers.push_back({Normalizer::kReplace, pat, field_string(j, "content", where)});
  } else if (type == "NFC") {
    t.normalizers.push_back({Normalizer::kNfc, "", ""});
  } else {
    fail(where, ": field 'normalizer.type': unsupported normalizer '", type,
         "' (supported: Sequence, Prepend, Replace, NFC)");
  }
}

SplitBehavior parse_behavior(const std::string& b, const std::string& where) {
  if (b == "Isolated") return SplitBehavior::kIsolated;
  if (b == "Removed") return SplitBehavior::kRemoved;
  if (b == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (b == "Contiguous") return SplitBehavior::kContiguous;
  fail(where, ": field 'pre_tokenizer.behavior': unknown split behavior '", b, "'");
}

std::string regex_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::string_view("\\^$.|?*+()[]{}").find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

void parse_pre_tokenizer(const json& j, const std::string& where, TokenizerImpl& t) {
  if (j.is_null()) return;
  std::string type = field_string(j, "type", where + " pre_tokenizer");
  if (type == "Sequence") {
    check(j.contains("pretokenizers") && j["pretokenizers"].is_array(), where,
          ": field 'pre_tokenizer.pretokenizers': expected an array");
    for (const auto& p : j["pretokenizers"]) parse_pre_tokenizer(p, where, t);
  } else if (type == "Split") {
    auto [pat, is_regex] = pattern_of(j, where + " pre_tokenizer Split");
    PreTokenizer p(PreTokenizer::kSplit);
    p.regex = std::make_shared<Regex>(is_regex ? pat : regex_escape(pat), where);
    p.behavior = parse_behavior(j.value("behavior", std::string("Isolated")), where);
    p.invert = j.value("invert", false);
    t.pre_tokenizers.push_back(std::move(p));
  } else if (type == "ByteLevel") {
    PreTokenizer p(PreTokenizer::kByteLevel);
    p.add_prefix_space = j.value("add_prefix_space", false);
    if (j.value("use_regex", true)) p.regex = std::make_shared<Regex>(kGpt2Pattern, where);
    t.pre_tokenizers.push_back(std::move(p));
  } else if (type == "Metaspace") {
    PreTokenizer p(PreTokenizer::kMetaspace);
    p.replacement = j.value("replacement", std::string("\u2581"));
    check(!p.replacement.empty(), where, ": Metaspace pre-tokenizer: empty 'replacement'");
    std::string scheme = j.value("prepend_scheme", std::string(""));
    if (scheme.empty()) scheme = j.value("add_prefix_space", true) ? "always" : "never";
    if (scheme == "always") {
      p.prepend = PreTokenizer::kAlways;
    } else if (scheme == "first") {
      p.prepend = PreTokenizer::kFirst;
    } else if (scheme == "never") {
      p.prepend = PreTokenizer::kNever;
    } else {
      fail(where, ": field 'pre_tokenizer.prepend_scheme': unknown value '", scheme, "'");
    }
    p.split = j.value("split", true);
    t.pre_tokenizers.push_back(std::move(p));
  } else if (type == "Digits") {
    PreTokenizer p(PreTokenizer::kSplit);
    p.regex =
        std::make_shared<Regex>(j.value("individual_digits", false) ? "\\p{N}" : "\\p{N}+", where);
    t.pre_tokenizers.push_back(std::move(p));
  } else {
    fail(where, ": field 'pre_tokenizer.type': unsupported pre-tokenizer '", type,
         "' (supported: Sequence, Split, ByteLevel, Metaspace, Digits)");
  }
}

void parse_decoder(const json& j, const std::string& where, TokenizerImpl& t) {
  if (j.is_null()) return;
  t.has_decoder = true;
  std::string type = field_string(j, "type", where + " decoder");
  if (type == "Sequence") {
    check(j.contains("decoders") && j["decoders"].is_array(), where,
          ": field 'decoder.decoders': expected an array");
    for (const auto& d : j["decoders"]) parse_decoder(d, where, t);
  } else if (type == "ByteLevel") {
    t.decoders.push_back(Decoder(Decoder::kByteLevel));
  } else if (type == "Replace") {
    auto [pat, is_regex] = pattern_of(j, where + " decoder Replace");
    check(!is_regex, where, ": decoder Replace with a Regex pattern is not supported");
    Decoder d(Decoder::kReplace);
    d.pattern = pat;
    d.content = field_string(j, "content", where);
    t.decoders.push_back(d);
  } else if (type == "ByteFallback") {
    t.decoders.push_back(Decoder(Decoder::kByteFallback));
    t.byte_fallback_decoder = true;
  } else if (type == "Fuse") {
    t.decoders.push_back(Decoder(Decoder::kFuse));
  } else if (type == "Strip") {
    Decoder d(Decoder::kStrip);
    d.content = field_string(j, "content", where);
    d.start = j.value("start", 0);
    d.stop = j.value("stop", 0);
    t.decoders.push_back(d);
  } else if (type == "Metaspace") {
    Decoder d(Decoder::kMetaspace);
    d.pattern = j.value("replacement", std::string("\u2581"));
    std::string scheme = j.value("prepend_scheme", std::string(""));
    d.prepend = scheme.empty() ? j.value("add_prefix_space", true) : scheme != "never";
    t.decoders.push_back(d);
  } else {
    fail(where, ": field 'decoder.type': unsupported decoder '", type,
         "' (supported: Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace)");
  }
}

int32_t special_token_id(const json& special_tokens, const std::string& name,
                         const std::string& where) {
  check(special_tokens.contains(name), where, ": post_processor: special token '", name,
        "' missing from special_tokens");
  const json& s = special_tokens[name];
  check(s.contains("ids") && s["ids"].is_array() && s["ids"].size() == 1, where,
        ": post_processor.special_tokens['", name, "'].ids: expected one id");
  return s["ids"][0].get<int32_t>();
}

void parse_post_processor(const json& j, const std::string& where, TokenizerImpl& t) {
  if (j.is_null()) return;
  std::string type = field_string(j, "type", where + " post_processor");
  if (type == "Sequence") {
    for (const auto& p : j.at("processors")) parse_post_processor(p, where, t);
  } else if (type == "ByteLevel") {
    // offsets only
  } else if (type == "TemplateProcessing") {
    check(j.contains("single") && j["single"].is_array(), where,
          ": field 'post_processor.single': expected an array");
    bool seen_seq = false;
    for (const auto& piece : j["single"]) {
      if (piece.contains("Sequence")) {
        seen_seq = true;
      } else if (piece.contains("SpecialToken")) {
        int32_t id = special_token_id(j.at("special_tokens"),
                                      piece["SpecialToken"].at("id").get<std::string>(), where);
        (seen_seq ? t.suffix_ids : t.prefix_ids).push_back(id);
      } else {
        fail(where, ": field 'post_processor.single': unexpected entry ", piece.dump());
      }
    }
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    t.prefix_ids.push_back(j.at("cls").at(1).get<int32_t>());
    t.suffix_ids.push_back(j.at("sep").at(1).get<int32_t>());
  } else {
    fail(where, ": field 'post_processor.type': unsupported post-processor '", type, "'");
  }
}

// A token id from tokenizer.json: an integer in [0, kMaxVocab) (the ids index the tables).
int32_t token_id(const json& v, const std::string& where, const std::string& field) {
  check(v.is_number_integer(), where, ": field '", field, "': expected an integer id, got ",
        v.dump());
  const int64_t id = v.get<int64_t>();
  check(id >= 0 && id < kMaxVocab, where, ": field '", field, "': token id ", id,
        " is outside [0, ", kMaxVocab, ")");
  return static_cast<int32_t>(id);
}

void load_tokenizer_json(const fs::path& path, TokenizerImpl& t) {
  const std::string where = path.string();
  json j = read_json_file(path);
  check(j.is_object(), where, ": expected a JSON object at top level");
  check(j.contains("model") && j["model"].is_object(), where,
        ": missing field 'model' (expected an object)");
  const json& m = j["model"];
  std::string type;
  if (m.contains("type")) {
    check(m["type"].is_string(), where, ": field 'model.type': expected a string");
    type = m["type"].get<std::string>();
  } else if (m.contains("merges")) {
    type = "BPE";
  } else {
    fail(where, ": field 'model.type' is missing (supported: BPE)");
  }
  check(type == "BPE", where, ": field 'model.type': unsupported tokenizer model type '", type,
        "' (supported: BPE)");
  check(m.contains("vocab") && m["vocab"].is_object(), where,
        ": field 'model.vocab': expected an object of token -> id");
  check(m.contains("merges") && m["merges"].is_array(), where,
        ": field 'model.merges': expected an array");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    check(!m.contains(k) || m[k].is_null() || m[k].get<std::string>().empty(), where,
          ": field 'model.", k, "' is not supported");
  }

  std::unordered_map<std::string, int32_t> vocab;
  vocab.reserve(m["vocab"].size());
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    check(it.value().is_number_integer(), where, ": field 'model.vocab[\"", it.key(),
          "\"]': expected an integer id");
    const int32_t id = token_id(it.value(), where, "model.vocab[\"" + it.key() + "\"]");
    vocab.emplace(it.key(), id);
    t.set_token(id, it.key());
  }
  std::vector<std::pair<std::string, std::string>> merges;
  merges.reserve(m["merges"].size());
  for (size_t k = 0; k < m["merges"].size(); ++k) {
    const json& e = m["merges"][k];
    if (e.is_string()) {
      const std::string s = e.get<std::string>();
      size_t sp = s.find(' ');
      check(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos, where,
            ": field 'model.merges[", k, "]': expected \"a b\", got \"", s, "\"");
      merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
    } else {
      fail(where, ": field 'model.merges[", k, "]': expected \"a b\" or [\"a\", \"b\"]");
    }
  }
  BpeOptions opt;
  if (m.contains("unk_token") && m["unk_token"].is_string())
    opt.unk_token = m["unk_token"].get<std::string>();
  opt.fuse_unk = m.value("fuse_unk", false);
  opt.byte_fallback = m.value("byte_fallback", false);
  opt.ignore_merges = m.value("ignore_merges", false);
  t.bpe = std::make_unique<BpeModel>(std::move(vocab), merges, opt, where);

  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const auto& a : j["added_tokens"]) {
      check(a.contains("id") && a.contains("content"), where,
            ": field 'added_tokens': each entry needs 'id' and 'content'");
      const bool special = a.value("special", false);
      check(a["content"].is_string(), where, ": field 'added_tokens': 'content' must be a string");
      AddedToken tok{token_id(a["id"], where, "added_tokens[].id"),
                     a["content"].get<std::string>(),
                     special,
                     a.value("lstrip", false),
                     a.value("rstrip", false),
                     a.value("normalized", !special)};
      t.set_token(tok.id, tok.content);
      if (tok.special) t.special[tok.id] = true;
      t.added.push_back(std::move(tok));
    }
  }
  parse_normalizer(j.value("normalizer", json()), where, t);
  parse_pre_tokenizer(j.value("pre_tokenizer", json()), where, t);
  parse_decoder(j.value("decoder", json()), where, t);
  parse_post_processor(j.value("post_processor", json()), where, t);
}

void load_sentencepiece(const fs::path& path, const json& config, const fs::path& config_path,
                        TokenizerImpl& t) {
  const std::string where = path.string();
  t.sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
  auto status = t.sp->Load(path.string());
  check(status.ok(), where, ": cannot load SentencePiece model: ", status.ToString());
  int n = t.sp->GetPieceSize();
  for (int id = 0; id < n; ++id) {
    t.set_token(id, t.sp->IdToPiece(id));
    bool control = t.sp->IsControl(id) || t.sp->IsUnknown(id);
    if (control) t.special[id] = true;
    // HF's converted tokenizer matches control pieces literally in the text (user-defined
    // pieces are handled by sentencepiece itself).
    if (control) t.added.push_back({id, t.id_to_token[id], control, false, false, false});
  }
  // Decoder of HF's LlamaConverter: Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0).
  t.has_decoder = true;
  Decoder rep(Decoder::kReplace);
  rep.pattern = "\u2581";
  rep.content = " ";
  t.decoders.push_back(rep);
  t.decoders.push_back(Decoder(Decoder::kByteFallback));
  t.byte_fallback_decoder = true;
  t.decoders.push_back(Decoder(Decoder::kFuse));
  Decoder strip(Decoder::kStrip);
  strip.content = " ";
  strip.start = 1;
  t.decoders.push_back(strip);
  if (config_flag(config, "add_bos_token", true, config_path) && t.sp->bos_id() >= 0)
    t.prefix_ids.push_back(t.sp->bos_id());
  if (config_flag(config, "add_eos_token", false, config_path) && t.sp->eos_id() >= 0)
    t.suffix_ids.push_back(t.sp->eos_id());
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<TokenizerImpl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::load(const fs::path& model_dir) {
  std::error_code ec;
  check(fs::is_directory(model_dir, ec), model_dir.string(),
        ": tokenizer directory not found (expected a directory with tokenizer.json or "
        "tokenizer.model)");
  auto impl = std::make_unique<TokenizerImpl>();
  json config = json::object();
  const fs::path config_path = model_dir / "tokenizer_config.json";
  if (fs::exists(config_path, ec)) {
    config = read_json_file(config_path);
    check(config.is_object(), config_path.string(), ": expected a JSON object");
  }
  json special_map = json::object();
  const fs::path map_path = model_dir / "special_tokens_map.json";
  if (fs::exists(map_path, ec)) {
    special_map = read_json_file(map_path);
    check(special_map.is_object(), map_path.string(), ": expected a JSON object");
  }

  if (fs::exists(model_dir / "tokenizer.json", ec)) {
    impl->source = "tokenizer.json";
    impl->source_path = model_dir / "tokenizer.json";
    try {
      load_tokenizer_json(impl->source_path, *impl);
    } catch (const nlohmann::json::exception& e) {  // a field of the wrong JSON type
      fail(impl->source_path.string(), ": unexpected structure (", e.what(), ")");
    }
  } else if (fs::exists(model_dir / "tokenizer.model", ec)) {
    impl->source = "tokenizer.model";
    impl->source_path = model_dir / "tokenizer.model";
    load_sentencepiece(impl->source_path, config, config_path, *impl);
  } else {
    fail(model_dir.string(), ": no tokenizer.json or tokenizer.model found");
  }
  impl->index_added();
  for (int32_t id : impl->prefix_ids) impl->check_id(id);
  for (int32_t id : impl->suffix_ids) impl->check_id(id);

  auto lookup = [&](const char* key) -> std::optional<int32_t> {
    std::optional<std::string> s;
    if (config.contains(key)) s = token_string(config[key]);
    if (!s && special_map.contains(key)) s = token_string(special_map[key]);
    if (!s) return std::nullopt;
    auto it = impl->token_to_id.find(*s);
    if (it == impl->token_to_id.end()) return std::nullopt;
    return it->second;
  };
  impl->bos = lookup("bos_token");
  if (impl->source == "tokenizer.json" &&
      (config.contains("add_bos_token") || config.contains("add_eos_token"))) {
    const bool add_bos = config_flag(config, "add_bos_token", false, config_path);
    const bool add_eos = config_flag(config, "add_eos_token", false, config_path);
    // transformers 5 (TokenizersBackend.update_post_processor): explicit add_bos_token /
    // add_eos_token in tokenizer_config.json replace the post-processor with
    // "[bos] $A [eos]".
    impl->prefix_ids.clear();
    impl->suffix_ids.clear();
    auto eos = lookup("eos_token");
    if (add_bos && impl->bos) impl->prefix_ids.push_back(*impl->bos);
    if (add_eos && eos) impl->suffix_ids.push_back(*eos);
  }
  if (!impl->bos && impl->sp && impl->sp->bos_id() >= 0) impl->bos = impl->sp->bos_id();
  if (auto e = lookup("eos_token")) impl->eos.push_back(*e);
  if (impl->eos.empty() && impl->sp && impl->sp->eos_id() >= 0)
    impl->eos.push_back(impl->sp->eos_id());
  for (const char* name :
       {"<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|eom_id|>"}) {
    auto it = impl->token_to_id.find(name);
    if (it != impl->token_to_id.end() &&
        std::find(impl->eos.begin(), impl->eos.end(), it->second) == impl->eos.end())
      impl->eos.push_back(it->second);
  }
  impl->chat_template = config.contains("chat_template") && !config["chat_template"].is_null();
  if (impl->chat_template) {
    const json& ct = config["chat_template"];
    if (ct.is_string()) {
      impl->chat_template_text = ct.get<std::string>();
    } else if (ct.is_array()) {  // [{"name": "default", "template": "..."}, ...]
      for (const auto& e : ct)
        if (e.is_object() && e.value("name", std::string()) == "default" &&
            e.contains("template") && e["template"].is_string())
          impl->chat_template_text = e["template"].get<std::string>();
    }
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  const auto& t = *impl_;
  // Bytes that are not UTF-8 (a binary file, Latin-1 text) become U+FFFD first, one per maximal
  // invalid subpart (what a Python caller's decode(errors="replace") hands HF); the pre-tokenizer
  // regex runs without PCRE2's own UTF check, which invalid input would turn into a crash.
  std::string repaired;
  if (!utf8::is_valid(text)) {
    repaired = utf8::lossy(text);
    text = repaired;
  }
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special_tokens) out.insert(out.end(), t.prefix_ids.begin(), t.prefix_ids.end());
  for (const auto& seg : t.split_added(text, t.raw_index)) {
    if (seg.id >= 0) {
      out.push_back(seg.id);
    } else {
      t.encode_segment(text.substr(seg.begin, seg.end - seg.begin), seg.begin, out);
    }
  }
  if (add_special_tokens) out.insert(out.end(), t.suffix_ids.begin(), t.suffix_ids.end());
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  const auto& t = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    t.check_id(id);
    if (skip_special_tokens && t.special[id]) continue;
    tokens.push_back(t.id_to_token[id]);
  }
  return t.run_decoders(std::move(tokens));
}

int32_t Tokenizer::vocab_size() const {
  return static_cast<int32_t>(impl_->id_to_token.size());
}
std::optional<int32_t> Tokenizer::bos_id() const {
  return impl_->bos;
}
std::vector<int32_t> Tokenizer::eos_ids() const {
  return impl_->eos;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  auto it = impl_->token_to_id.find(std::string(token));
  if (it == impl_->token_to_id.end()) return std::nullopt;
  return it->second;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  impl_->check_id(id);
  return impl_->id_to_token[id];
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->special.size() && impl_->special[id];
}

bool Tokenizer::has_chat_template() const {
  return impl_->chat_template;
}
const std::string& Tokenizer::chat_template_text() const {
  return impl_->chat_template_text;
}
const std::string& Tokenizer::source_file() const {
  return impl_->source;
}

std::string Tokenizer::token_bytes(int32_t id, bool skip_special_tokens) const {
  impl_->check_id(id);
  if (skip_special_tokens && impl_->special[id]) return {};
  return impl_->raw_token_bytes(impl_->id_to_token[id]);
}

int Tokenizer::leading_strip() const {
  return impl_->strip_count();
}

int Tokenizer::fallback_byte(int32_t id) const {
  impl_->check_id(id);
  if (!impl_->byte_fallback_decoder) return -1;
  return parse_byte_token(impl_->id_to_token[id]);
}

}  // namespace duo
