// SAFERLHF_CUDA_CHECK: turn a CUDA runtime error into a C++ exception (torch maps it to a Python RuntimeError)
// naming the call site.  Shared by the *_cuda.cu kernels.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define SAFERLHF_CUDA_CHECK(expr)                                                                          \
  do {                                                                                                     \
    const cudaError_t saferlhf_err_ = (expr);                                                              \
    if (saferlhf_err_ != cudaSuccess) {                                                                    \
      throw std::runtime_error(std::string("saferlhf CUDA error: ") + cudaGetErrorString(saferlhf_err_) + \
                               " (" __FILE__ ":" + std::to_string(__LINE__) + ")");                        \
    }                                                                                                      \
  } while (0)
