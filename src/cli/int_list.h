// Comma-separated lists of positive integers on the command line ("1000,4000,16000").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace duo::cli {

// Parses `text`; throws duo::Error naming `flag` on an empty list or an item that is not a
// positive integer.
std::vector<int64_t> parse_positive_int_list(const std::string& flag, const std::string& text);

}  // namespace duo::cli
