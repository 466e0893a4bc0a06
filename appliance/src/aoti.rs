//! AOTInductor packages (`platform = "pytorch_aoti"`, `model.pt2`): libtorch's
//! `AOTIModelPackageLoader` through `aoti/package.cpp`, since tch loads TorchScript only
//! (tch-rs issue #979). The package was compiled for one device (`models/export.py --device`);
//! it runs there.
//!
//! One [`AotiModel`] is made, warmed up and used on one executor thread, like a TorchScript
//! module: it is not shared.

// The appliance's unsafe code, with `cuda_memory.rs`: three calls into `aoti/package.cpp`.
#![allow(unsafe_code)]

use std::ffi::{CString, c_char, c_void};
use std::path::Path;

use tch::{Device, Tensor};

unsafe extern "C" {
    fn vla_aoti_load(path: *const c_char, device_index: i32, error: *mut c_char, error_len: usize) -> *mut c_void;
    fn vla_aoti_run(
        loader: *mut c_void,
        inputs: *const *const torch_sys::C_tensor,
        n_inputs: usize,
        outputs: *mut *mut torch_sys::C_tensor,
        max_outputs: usize,
        n_outputs: *mut usize,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    fn vla_aoti_free(loader: *mut c_void);
}

/// Outputs a package may return at most.
const MAX_OUTPUTS: usize = 64;

/// A loaded AOTInductor package.
#[derive(Debug)]
pub struct AotiModel {
    loader: *mut c_void,
}

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let text = String::from_utf8_lossy(&buf[..end]);
    text.lines().next().unwrap_or("").trim().to_string()
}

impl AotiModel {
    /// Loads the package at `path` for `device`.
    pub fn load(path: &Path, device: Device) -> Result<AotiModel, String> {
        let c_path =
            CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| "the path holds a NUL byte".to_string())?;
        let index = match device {
            Device::Cuda(i) => i as i32,
            _ => -1,
        };
        let mut error = vec![0u8; 1024];
        // SAFETY: a C function given a NUL-terminated path and a buffer of the length passed;
        // it catches every C++ exception itself.
        let loader = unsafe { vla_aoti_load(c_path.as_ptr(), index, error.as_mut_ptr().cast(), error.len()) };
        if loader.is_null() {
            return Err(message(&error));
        }
        Ok(AotiModel { loader })
    }

    /// One forward.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
        let ptrs: Vec<*const torch_sys::C_tensor> = inputs.iter().map(Tensor::as_ptr).collect();
        let mut outs: Vec<*mut torch_sys::C_tensor> = vec![std::ptr::null_mut(); MAX_OUTPUTS];
        let mut n = 0usize;
        let mut error = vec![0u8; 1024];
        // SAFETY: `ptrs` are live tensors (borrowed from `inputs` for the call), `outs` has room
        // for MAX_OUTPUTS pointers; the function writes `n` of them, each a new tensor that is
        // ours to own.
        let rc = unsafe {
            vla_aoti_run(
                self.loader,
                ptrs.as_ptr(),
                ptrs.len(),
                outs.as_mut_ptr(),
                outs.len(),
                &mut n,
                error.as_mut_ptr().cast(),
                error.len(),
            )
        };
        if rc != 0 {
            return Err(message(&error));
        }
        // SAFETY: each of the first `n` pointers is a tensor allocated with `new` for us; tch
        // frees it with `delete` when the `Tensor` drops.
        Ok(outs[..n].iter().map(|&p| unsafe { Tensor::from_ptr(p) }).collect())
    }
}

impl Drop for AotiModel {
    fn drop(&mut self) {
        // SAFETY: the loader came from `vla_aoti_load` and is freed once.
        unsafe { vla_aoti_free(self.loader) }
    }
}
