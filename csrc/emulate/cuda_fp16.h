// Host stand-in for <cuda_fp16.h> in the CPU emulation build (PF_EMULATE); see emu.h.
#pragma once
#include "emu_runtime.h"
