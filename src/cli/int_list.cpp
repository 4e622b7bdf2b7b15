#include "cli/int_list.h"

#include <sstream>
#include <stdexcept>

#include "core/error.h"

namespace duo::cli {

std::vector<int64_t> parse_positive_int_list(const std::string& flag, const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t pos = 0;
    int64_t v = 0;
    try {
      v = std::stoll(item, &pos);
    } catch (const std::exception&) {
      fail(flag, ": '", item, "' is not an integer");
    }
    check(pos == item.size() && v > 0, flag, ": '", item, "' is not a positive integer");
    out.push_back(v);
  }
  check(!out.empty(), flag, ": no values given");
  return out;
}

}  // namespace duo::cli
