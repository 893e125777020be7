// A stand-in for the CUDA runtime pieces a CPU-only PyTorch build lacks, so that code holding
// FakeTensorMode tensors on device "cuda" (shapes and dtypes only, no memory) can run through the
// autograd engine, copy_ and indexing. Nothing here touches a GPU or allocates device memory; no
// kernel is registered, so a real (non-fake) CUDA tensor still cannot be created.
//
// Two registrations, both made by static initialisers when the library is loaded:
//  * a device guard for DeviceType::CUDA (one device, one default stream, events that do nothing):
//    the autograd engine, copy_ and TensorIterator ask c10::impl::getDeviceGuardImpl(CUDA) for it;
//  * CUDA hooks whose isBuilt() and hasCUDA() say yes: at::getAccelerator(), which the autograd
//    engine calls when a graph holds CUDA tensors, decides from them whether CUDA exists.
//    at::detail::getCUDAHooks() consults its registry once, on first use, and `import torch`
//    makes that first use, so the library must be loaded before torch is imported
//    (shim.preload_shim does that); loaded later, only the guard takes effect.
//
// It changes what the process believes about CUDA: load it only in a process of its own.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace {

constexpr c10::DeviceIndex kFakeDeviceCount = 1;
const c10::Device kFakeDevice(c10::DeviceType::CUDA, 0);

struct FakeCudaGuardImpl final : public c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return c10::DeviceType::CUDA; }
  c10::Device exchangeDevice(c10::Device /*device*/) const override { return kFakeDevice; }
  c10::Device getDevice() const override { return kFakeDevice; }
  void setDevice(c10::Device /*device*/) const override {}
  void uncheckedSetDevice(c10::Device /*device*/) const noexcept override {}
  c10::Stream getStream(c10::Device /*device*/) const override {
    return c10::Stream(c10::Stream::DEFAULT, kFakeDevice);
  }
  c10::Stream exchangeStream(c10::Stream /*stream*/) const override {
    return c10::Stream(c10::Stream::DEFAULT, kFakeDevice);
  }
  c10::DeviceIndex deviceCount() const noexcept override { return kFakeDeviceCount; }
  // Events and stream synchronisation: the interface's defaults raise; there is no work to wait for.
  void record(void** /*event*/, const c10::Stream& /*stream*/, const c10::DeviceIndex /*device_index*/,
              const c10::EventFlag /*flag*/) const override {}
  void block(void* /*event*/, const c10::Stream& /*stream*/) const override {}
  bool queryEvent(void* /*event*/) const override { return true; }
  void destroyEvent(void* /*event*/, const c10::DeviceIndex /*device_index*/) const noexcept override {}
  bool queryStream(const c10::Stream& /*stream*/) const override { return true; }
  void synchronizeStream(const c10::Stream& /*stream*/) const override {}
};

}  // namespace

namespace at {

// Must live in namespace at (Registry.h); registered under the key getCUDAHooks() asks for.
struct FakeCudaHooks final : public CUDAHooksInterface {
  explicit FakeCudaHooks(CUDAHooksArgs /*args*/) {}
  void init() const override {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasCUDA() const override { return true; }
  // No primary context: the autograd engine's device threads then skip setting a device.
  bool hasPrimaryContext(DeviceIndex /*device_index*/) const override { return false; }
  DeviceIndex deviceCount() const override { return kFakeDeviceCount; }
  DeviceIndex current_device() const override { return kFakeDevice.index(); }
  int getNumGPUs() const override { return kFakeDeviceCount; }
};

C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", FakeCudaHooks)

}  // namespace at

C10_REGISTER_GUARD_IMPL(CUDA, FakeCudaGuardImpl);
