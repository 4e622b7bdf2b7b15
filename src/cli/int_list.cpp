#include "cli/int_list.h"

#include <sstream>
#include <stdexcept>

#include "core/error.h"

namespace duo::cli {

std::vector<int64_t> parse_positive_int_list(const std::string& flag, const std::string& text) {
  check(!text.empty(), flag, ": no values given");
  check(text.back() != ',', flag, ": '", text, "' ends with a comma");
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    // Digits only: no signs, spaces or empty items.
    check(!item.empty() && item.find_first_not_of("0123456789") == std::string::npos, flag, ": '",
          item, "' is not a positive integer");
    int64_t v = 0;
    try {
      v = std::stoll(item);
    } catch (const std::out_of_range&) {
      fail(flag, ": '", item, "' is too large");
    }
    check(v > 0, flag, ": '", item, "' is not a positive integer");
    out.push_back(v);
  }
  return out;
}

}  // namespace duo::cli
