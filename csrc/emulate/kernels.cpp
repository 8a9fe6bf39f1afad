// The CUDA sources compiled as host C++ for the emulation build (PF_EMULATE); see emu.h.
#include "../conv/fwd.cu"
#include "../conv/dgrad.cu"
#include "../conv/wgrad.cu"
#include "../bn/bn.cu"

// The emulated kernel launches since the last reset (reset != 0 clears the count after reading it);
// called through ctypes by benchmarks/launches.py to count the kernels an op launches.
extern "C" unsigned long long pf_emu_launches(int reset) {
  const unsigned long long n = static_cast<unsigned long long>(emu::launches());
  if (reset != 0) emu::launches() = 0;
  return n;
}

// Kernels count as launched but do not run while skip != 0 (the host path alone, for
// benchmarks/host_overhead.py); called through ctypes.
extern "C" void pf_emu_skip_kernels(int skip) { emu::skip_kernels() = skip != 0; }
