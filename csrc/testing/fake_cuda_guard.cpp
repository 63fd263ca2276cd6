// Test tooling, not shipped: registers c10's no-op device guard for CUDA in a CPU-only torch build, so that
// FakeTensorMode can run ops on fake "cuda" tensors whose decompositions open a device guard (indexing,
// copy_, out= variants). Built by benchmarks/cuda_dryrun.py with torch.utils.cpp_extension.load_inline.
#include <c10/core/impl/DeviceGuardImplInterface.h>

C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::NoOpDeviceGuardImpl<c10::DeviceType::CUDA>);

// load_inline needs a module; nothing to export.
