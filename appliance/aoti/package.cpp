// Runs AOTInductor packages (`model.pt2`, from torch.export + aoti_compile_and_package), which
// tch does not load: libtorch's own AOTIModelPackageLoader behind three C functions for
// src/aoti.rs. Tensors cross as `at::Tensor*`, the handle tch's tensors wrap; outputs are new
// heap tensors that tch takes ownership of (and frees with `delete`, as its own are).
// Every C++ exception is caught here and returned as a message.

#include <dlfcn.h>

#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <ATen/Tensor.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

namespace {
void copy_message(const char* what, char* error, size_t error_len) {
  if (error == nullptr || error_len == 0) return;
  std::strncpy(error, what, error_len - 1);
  error[error_len - 1] = '\0';
}
}  // namespace

extern "C" {

// A loader for the package at `path` (one model runner, on `device_index`: -1 for the package's
// own device). Null on failure, with the reason in `error`.
void* vla_aoti_load(const char* path, int device_index, char* error, size_t error_len) {
  // The package's compiled model needs libtorch.so, which the appliance does not link (tch
  // links libtorch_cpu and libc10 only). Loaded here from the appliance's own run path, so the
  // model's dependency resolves to the libtorch the appliance already runs with.
  static void* libtorch = dlopen("libtorch.so", RTLD_NOW | RTLD_GLOBAL);
  if (libtorch == nullptr) {
    const char* why = dlerror();
    copy_message((std::string("cannot load libtorch.so beside libtorch_cpu: ") + (why ? why : "?")).c_str(), error,
                 error_len);
    return nullptr;
  }
  try {
    return new torch::inductor::AOTIModelPackageLoader(
        path, "model", /*run_single_threaded=*/false, /*num_runners=*/1,
        static_cast<c10::DeviceIndex>(device_index));
  } catch (const std::exception& e) {
    copy_message(e.what(), error, error_len);
  } catch (...) {
    copy_message("unknown C++ exception", error, error_len);
  }
  return nullptr;
}

// One forward: `n_inputs` tensors in, at most `max_outputs` new tensors out (`*n_outputs` set).
// 0 on success; -1 with the reason in `error`.
int vla_aoti_run(void* loader, const at::Tensor* const* inputs, size_t n_inputs, at::Tensor** outputs,
                 size_t max_outputs, size_t* n_outputs, char* error, size_t error_len) {
  try {
    auto* l = static_cast<torch::inductor::AOTIModelPackageLoader*>(loader);
    std::vector<at::Tensor> in;
    in.reserve(n_inputs);
    for (size_t i = 0; i < n_inputs; ++i) in.push_back(*inputs[i]);
    std::vector<at::Tensor> out = l->run(in);
    if (out.size() > max_outputs) {
      copy_message(("the package returned " + std::to_string(out.size()) + " outputs, more than declared").c_str(),
                   error, error_len);
      return -1;
    }
    for (size_t i = 0; i < out.size(); ++i) outputs[i] = new at::Tensor(std::move(out[i]));
    *n_outputs = out.size();
    return 0;
  } catch (const std::exception& e) {
    copy_message(e.what(), error, error_len);
  } catch (...) {
    copy_message("unknown C++ exception", error, error_len);
  }
  return -1;
}

void vla_aoti_free(void* loader) {
  delete static_cast<torch::inductor::AOTIModelPackageLoader*>(loader);
}

}  // extern "C"
