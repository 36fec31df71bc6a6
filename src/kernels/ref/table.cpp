// The scalar reference implements every entry of kernels.def.
#include "kernels/isa_table.h"
