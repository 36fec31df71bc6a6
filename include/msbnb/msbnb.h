// msbnb: k-bit quantization for the PyTorch C++ frontend. The whole public API.
#pragma once
#include "msbnb/functional/matmul.h"
#include "msbnb/functional/quantize.h"
#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/kernel_table.h"
