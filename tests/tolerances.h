// Every numeric tolerance used by the tests, in one place.
#pragma once

namespace duo::tolerances {

// fp32 CPU engine vs transformers fp32 logits (max |diff|), issue bar.
constexpr float kLogitsVsTransformers = 1e-4f;
// Fast CPU path (BLAS, blocked attention) vs the reference path, fp32 logits.
constexpr float kFastVsReference = 2e-5f;

}  // namespace duo::tolerances
