// The CUDA sources compiled as host C++ for the emulation build (PF_EMULATE); see emu.h.
#include "../conv/fwd.cu"
#include "../conv/dgrad.cu"
#include "../conv/wgrad.cu"
#include "../bn/bn.cu"
