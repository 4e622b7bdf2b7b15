#include <gtest/gtest.h>

#include "core/error.h"

TEST(Error, FailConcatenatesParts) {
  try {
    duo::fail("file.json: field '", "x", "': expected ", 3);
    FAIL() << "fail() returned";
  } catch (const duo::Error& e) {
    EXPECT_STREQ(e.what(), "file.json: field 'x': expected 3");
  }
}
