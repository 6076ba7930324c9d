// Included first by the CPU kernel sources that must round every multiply and add to fp32 exactly as the
// reference's separate torch ops do: no fma contraction except where a kernel writes one explicitly (Vec::fma).
// The pragma applies to the rest of the including translation unit.
#pragma once

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
