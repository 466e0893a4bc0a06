//! How much CUDA memory a batch needed: the per-inference `vla_inference_gpu_memory_delta_bytes`.
//!
//! Reads libtorch's CUDA caching allocator (the memory `torch.cuda.memory_allocated` reports)
//! through `cuda/memory.cpp`, since tch exposes none of its statistics. A measurement resets the
//! device's peak before the batch and reads it after: the delta is the most the batch's inputs,
//! activations and outputs held at once above what was allocated before it. Two executors on
//! one device overlap, so there each figure is approximate (one may reset the other's peak).

// The appliance's only unsafe code: two calls into `cuda/memory.cpp`.
#![allow(unsafe_code)]

use tch::Device;

unsafe extern "C" {
    fn vla_cuda_memory_begin(device: i32, allocated: *mut i64) -> i32;
    fn vla_cuda_memory_peak(device: i32, peak: *mut i64) -> i32;
}

/// A measurement under way on one CUDA device (see [`PeakProbe::start`]).
#[derive(Debug)]
pub struct PeakProbe {
    device: i32,
    before: i64,
}

impl PeakProbe {
    /// Starts measuring on `device`: `None` on the CPU, or when libtorch tracks no CUDA memory
    /// there (a CPU-only libtorch, or CUDA never initialised in this process).
    pub fn start(device: Device) -> Option<PeakProbe> {
        let Device::Cuda(index) = device else { return None };
        let index = i32::try_from(index).ok()?;
        let mut before = 0;
        // SAFETY: a plain C function writing one i64 through a valid pointer; it catches
        // every C++ exception itself.
        let rc = unsafe { vla_cuda_memory_begin(index, &mut before) };
        (rc == 0).then_some(PeakProbe { device: index, before })
    }

    /// Bytes allocated at the peak since [`PeakProbe::start`] above what was allocated then.
    pub fn finish(self) -> Option<u64> {
        let mut peak = 0;
        // SAFETY: as in `start`.
        let rc = unsafe { vla_cuda_memory_peak(self.device, &mut peak) };
        (rc == 0).then(|| peak.saturating_sub(self.before).max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_measured_on_the_cpu() {
        assert!(PeakProbe::start(Device::Cpu).is_none());
    }

    /// Here CUDA is never initialised, so even a CUDA-built libtorch answers "not tracked"
    /// rather than failing; on a GPU machine the probe measures a real allocation.
    #[test]
    fn a_cuda_probe_measures_an_allocation_or_says_there_is_none() {
        if !tch::Cuda::is_available() {
            assert!(PeakProbe::start(Device::Cuda(0)).is_none());
            return;
        }
        let device = Device::Cuda(0);
        let _init = tch::Tensor::zeros([1], (tch::Kind::Float, device));
        let probe = PeakProbe::start(device).expect("CUDA memory is tracked once CUDA is initialised");
        let block = tch::Tensor::zeros([4 << 20], (tch::Kind::Float, device)); // 16 MiB
        drop(block);
        let delta = probe.finish().expect("the peak is readable");
        assert!((16 << 20..64 << 20).contains(&delta), "{delta}");
    }
}
