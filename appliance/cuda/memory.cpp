// The CUDA caching allocator's statistics for one device, for the per-inference
// `vla_inference_gpu_memory_delta_bytes` (appliance/src/cuda_memory.rs). tch exposes none of
// them, so this reads them through c10's device-generic allocator interface, which needs no
// CUDA headers: it builds against any libtorch and answers "no CUDA" on CPU-only ones.
//
// Every function returns 0 on success, 1 when CUDA memory is not tracked (no CUDA allocator
// registered, or CUDA never initialised in this process), 2 when libtorch threw.

#include <c10/core/Allocator.h>
#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>

namespace {

c10::DeviceAllocator* cuda_allocator() {
  // Throws when no CUDA allocator is registered (a CPU-only libtorch).
  auto* allocator = dynamic_cast<c10::DeviceAllocator*>(c10::GetAllocator(c10::DeviceType::CUDA));
  return allocator != nullptr && allocator->initialized() ? allocator : nullptr;
}

constexpr size_t kAggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);

}  // namespace

// Starts a measurement: resets the device's peak to what is allocated now and returns that.
extern "C" int vla_cuda_memory_begin(int32_t device, int64_t* allocated) {
  try {
    auto* allocator = cuda_allocator();
    if (allocator == nullptr) return 1;
    auto index = static_cast<c10::DeviceIndex>(device);
    allocator->resetPeakStats(index);
    *allocated = allocator->getDeviceStats(index).allocated_bytes[kAggregate].current;
    return 0;
  } catch (...) {
    return 2;
  }
}

// The most allocated on the device since the last `vla_cuda_memory_begin`.
extern "C" int vla_cuda_memory_peak(int32_t device, int64_t* peak) {
  try {
    auto* allocator = cuda_allocator();
    if (allocator == nullptr) return 1;
    *peak = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device)).allocated_bytes[kAggregate].peak;
    return 0;
  } catch (...) {
    return 2;
  }
}
