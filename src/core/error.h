// One exception type for every host-side validation failure. Messages name the file or field,
// what was found and what was expected; the CLI prints the message on one line and exits non-zero.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace duo {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// fail("config.json: field 'x': expected integer, got ", v) — concatenates with operator<<.
template <class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  throw Error(os.str());
}

// check(cond, parts...) throws Error(parts...) when cond is false.
template <class... Parts>
void check(bool cond, Parts&&... parts) {
  if (!cond) fail(std::forward<Parts>(parts)...);
}

}  // namespace duo
