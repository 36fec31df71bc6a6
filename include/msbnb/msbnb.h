// msbnb: k-bit quantization for the PyTorch C++ frontend. The whole public API.
#pragma once
#include "msbnb/functional/matmul.h"
#include "msbnb/functional/quantize.h"
#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/kernel_table.h"
#include "msbnb/nn/embedding.h"
#include "msbnb/nn/linear.h"
#include "msbnb/nn/quantized_module.h"
#include "msbnb/nn/state_dict.h"
#include "msbnb/optim/optim8bit.h"
#include "msbnb/train/distributed.h"
#include "msbnb/train/checkpoint.h"
#include "msbnb/train/memory.h"
