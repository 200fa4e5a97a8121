// Host-memory extension of spin_kernels (see DESIGN.md, "Swap design").
//
// Three functions, the same in the CPU and the CUDA build (and `device_view`, CUDA only):
//   alloc_host(nbytes, pinned)        one exact-size host allocation as a uint8 tensor; every view
//                                     of it keeps it alive, the last one frees it.
//   copy_batch(dsts, srcs, stream, device)
//                                     dst[i] <- src[i] for a whole list, one call, GIL released.
//   stash_and_load(live, stash, bank, d2h_stream, h2d_stream, device)
//                                     stash[i] <- live[i], then live[i] <- bank[i], pipelined over
//                                     two streams so both PCIe directions run at once.
// The CUDA parts are behind WITH_CUDA and use only the CUDA runtime C API: cudaHostAlloc (the
// torch pinned allocator rounds sizes up to a power of two, we want exactly nbytes), and
// cudaMemcpyAsync on the caller's stream (a cudaStream_t passed as an integer, as
// torch.cuda.Stream.cuda_stream gives it).
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifdef WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace {

#ifdef WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// Page alignment of the pageable arena: the kernel can then hand out whole pages, and views at
// 256-byte offsets inside it stay aligned for any vectorised kernel.
constexpr size_t kHostAlignment = 4096;
// Below this a CPU copy is not worth splitting across threads.
constexpr int64_t kParallelCopyChunk = int64_t{8} << 20;

#ifdef WITH_CUDA
void check_cuda(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) {
    // Clear the (non-sticky) error so that later, unrelated CUDA calls do not report it again.
    cudaGetLastError();
    TORCH_CHECK(false, "spin_kernels._swap_ext: ", what, " failed: ", cudaGetErrorName(status), ": ",
                cudaGetErrorString(status));
  }
}

// Makes `device` current for the lifetime of the guard (CUDA calls on a stream must run on the
// stream's device), and restores the previous one after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int64_t device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device >= 0 && device != previous_) {
      check_cuda(cudaSetDevice(static_cast<int>(device)), "cudaSetDevice(" + std::to_string(device) + ")");
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) {
      cudaSetDevice(previous_);
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};
#endif

void free_host(void* ptr, bool pinned) {
  if (ptr == nullptr) {
    return;
  }
#ifdef WITH_CUDA
  if (pinned) {
    // A DMA on some stream may still read or write the block: drain the device first (freeing a
    // multi-GB arena is rare, a freed block under a running copy is memory corruption). A deleter
    // must not throw; at interpreter exit the runtime may already be unloaded, and then the process
    // is releasing the memory anyway.
    cudaDeviceSynchronize();
    cudaFreeHost(ptr);
    cudaGetLastError();
    return;
  }
#endif
  (void)pinned;
  std::free(ptr);
}

torch::Tensor alloc_host(int64_t nbytes, bool pinned) {
  TORCH_CHECK(nbytes >= 0, "alloc_host: nbytes must be >= 0, got ", nbytes);
  // A zero-byte request still gets a real pointer so that the deleter logic stays uniform.
  const size_t request = static_cast<size_t>(std::max<int64_t>(nbytes, 1));
  void* ptr = nullptr;
  if (pinned) {
#ifdef WITH_CUDA
    check_cuda(cudaHostAlloc(&ptr, request, cudaHostAllocDefault),
               "cudaHostAlloc(" + std::to_string(request) + " bytes)");
#else
    TORCH_CHECK(false, "alloc_host: pinned memory needs the CUDA build of spin_kernels._swap_ext "
                "(this one was built without CUDA)");
#endif
  } else {
    const int status = posix_memalign(&ptr, kHostAlignment, request);
    TORCH_CHECK(status == 0 && ptr != nullptr, "alloc_host: posix_memalign of ", request,
                " bytes failed (error ", status, ")");
  }
  auto deleter = [pinned](void* p) { free_host(p, pinned); };
  return torch::from_blob(ptr, {nbytes}, deleter,
                          torch::TensorOptions().dtype(torch::kUInt8).device(torch::kCPU));
}

void check_pair(const torch::Tensor& dst, const torch::Tensor& src, size_t index, int64_t device) {
  TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "copy #", index, ": dtype mismatch, dst is ",
              dst.scalar_type(), " and src is ", src.scalar_type());
  TORCH_CHECK(dst.sizes() == src.sizes(), "copy #", index, ": shape mismatch, dst is ", dst.sizes(),
              " and src is ", src.sizes());
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous(), "copy #", index,
              ": both tensors must be contiguous");
  for (const torch::Tensor* t : {&dst, &src}) {
    if (t->is_cuda()) {
      TORCH_CHECK(kWithCuda, "copy #", index, ": a CUDA tensor, but spin_kernels._swap_ext was built without CUDA");
      TORCH_CHECK(t->get_device() == device, "copy #", index, ": tensor on cuda:", t->get_device(),
                  " but the stream belongs to cuda:", device);
    } else {
      TORCH_CHECK(t->is_cpu(), "copy #", index, ": tensors must be on the CPU or a CUDA device, got ",
                  t->device());
    }
  }
}

void check_batch(const std::vector<torch::Tensor>& dsts, const std::vector<torch::Tensor>& srcs,
                 int64_t device) {
  TORCH_CHECK(dsts.size() == srcs.size(), "copy_batch: ", dsts.size(), " destinations but ", srcs.size(),
              " sources");
  for (size_t i = 0; i < dsts.size(); ++i) {
    check_pair(dsts[i], srcs[i], i, device);
  }
}

void host_copy(void* dst, const void* src, int64_t nbytes) {
  if (nbytes <= kParallelCopyChunk) {
    std::memcpy(dst, src, static_cast<size_t>(nbytes));
    return;
  }
  const int64_t chunks = (nbytes + kParallelCopyChunk - 1) / kParallelCopyChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t offset = c * kParallelCopyChunk;
      const int64_t n = std::min(kParallelCopyChunk, nbytes - offset);
      std::memcpy(static_cast<char*>(dst) + offset, static_cast<const char*>(src) + offset, static_cast<size_t>(n));
    }
  });
}

// One copy, asynchronous on `stream` when a CUDA tensor is involved, synchronous otherwise.
void copy_one(const torch::Tensor& dst, const torch::Tensor& src, int64_t stream) {
  const int64_t nbytes = static_cast<int64_t>(dst.nbytes());
  if (nbytes == 0) {
    return;
  }
  if (dst.is_cpu() && src.is_cpu()) {
    host_copy(dst.data_ptr(), src.data_ptr(), nbytes);
    return;
  }
#ifdef WITH_CUDA
  check_cuda(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), static_cast<size_t>(nbytes), cudaMemcpyDefault,
                             reinterpret_cast<cudaStream_t>(stream)),
             "cudaMemcpyAsync(" + std::to_string(nbytes) + " bytes)");
#else
  (void)stream;
  TORCH_CHECK(false, "copy_batch: CUDA copy in a build without CUDA");
#endif
}


#ifdef WITH_CUDA
bool any_cuda(const std::vector<torch::Tensor>& tensors) {
  return std::any_of(tensors.begin(), tensors.end(), [](const torch::Tensor& t) { return t.is_cuda(); });
}
#endif

void copy_batch(const std::vector<torch::Tensor>& dsts, const std::vector<torch::Tensor>& srcs, int64_t stream,
                int64_t device) {
  check_batch(dsts, srcs, device);
#ifdef WITH_CUDA
  if (any_cuda(dsts) || any_cuda(srcs)) {
    DeviceGuard guard(device);
    for (size_t i = 0; i < dsts.size(); ++i) {
      copy_one(dsts[i], srcs[i], stream);
    }
    return;
  }
#endif
  for (size_t i = 0; i < dsts.size(); ++i) {
    copy_one(dsts[i], srcs[i], stream);
  }
}

void stash_and_load(const std::vector<torch::Tensor>& live, const std::vector<torch::Tensor>& stash,
                    const std::vector<torch::Tensor>& bank, int64_t d2h_stream, int64_t h2d_stream,
                    int64_t device) {
  check_batch(stash, live, device);
  check_batch(live, bank, device);
#ifdef WITH_CUDA
  if (any_cuda(live)) {
    DeviceGuard guard(device);
    // live[i] may be overwritten only after its stash copy has read it: one event per tensor lets
    // the load of tensor i run while the stash of tensor i+1 is in flight in the other direction.
    for (size_t i = 0; i < live.size(); ++i) {
      copy_one(stash[i], live[i], d2h_stream);
      cudaEvent_t stashed = nullptr;
      check_cuda(cudaEventCreateWithFlags(&stashed, cudaEventDisableTiming), "cudaEventCreateWithFlags");
      cudaError_t status = cudaEventRecord(stashed, reinterpret_cast<cudaStream_t>(d2h_stream));
      if (status == cudaSuccess) {
        status = cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(h2d_stream), stashed, 0);
      }
      // Destroying a recorded event is legal: its resources go once the device has passed it.
      cudaEventDestroy(stashed);
      check_cuda(status, "ordering the load of tensor #" + std::to_string(i) + " after its stash");
      copy_one(live[i], bank[i], h2d_stream);
    }
    return;
  }
#endif
  (void)d2h_stream;
  (void)h2d_stream;
  for (size_t i = 0; i < live.size(); ++i) {
    copy_one(stash[i], live[i], 0);
    copy_one(live[i], bank[i], 0);
  }
}

// A CUDA tensor that reads the pinned host memory of `host` in place: kernels fetch exactly the bytes
// they touch over the bus (a gather of a few embedding rows instead of a copy of the whole table).
torch::Tensor device_view(const torch::Tensor& host, int64_t device) {
  TORCH_CHECK(host.is_cpu(), "device_view: expected a CPU tensor in pinned memory, got one on ", host.device());
  TORCH_CHECK(device >= 0, "device_view: device must be a CUDA device index, got ", device);
#ifdef WITH_CUDA
  DeviceGuard guard(device);
  char* base = static_cast<char*>(host.storage().data_ptr().get());
  void* mapped = nullptr;
  check_cuda(cudaHostGetDevicePointer(&mapped, base, 0),
             "cudaHostGetDevicePointer (the tensor must live in memory from cudaHostAlloc)");
  const int64_t offset = static_cast<char*>(host.data_ptr()) - base;
  torch::Tensor keep_alive = host;  // the host allocation lives as long as the view
  const torch::Device target(torch::kCUDA, static_cast<c10::DeviceIndex>(device));
  // The device is given, not inferred from the pointer (which names the device that was current
  // when the host memory was allocated).
  return at::from_blob(static_cast<char*>(mapped) + offset, host.sizes(), host.strides(),
                       [keep_alive](void*) {}, host.options().device(target), target);
#else
  TORCH_CHECK(false, "device_view: spin_kernels._swap_ext was built without CUDA");
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "spin_kernels host-memory extension: exact-size (pinned) host arenas and batched copies";
  m.attr("with_cuda") = pybind11::bool_(kWithCuda);
  m.attr("host_alignment") = pybind11::int_(kHostAlignment);
  m.def("alloc_host", &alloc_host, "One exact-size host allocation as a uint8 tensor (pinned with cudaHostAlloc)",
        pybind11::arg("nbytes"), pybind11::arg("pinned"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("copy_batch", &copy_batch, "dsts[i] <- srcs[i] for every i, on `stream` (a cudaStream_t as int)",
        pybind11::arg("dsts"), pybind11::arg("srcs"), pybind11::arg("stream") = 0, pybind11::arg("device") = -1,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("stash_and_load", &stash_and_load,
        "stash[i] <- live[i] on d2h_stream, then live[i] <- bank[i] on h2d_stream, pipelined per tensor",
        pybind11::arg("live"), pybind11::arg("stash"), pybind11::arg("bank"), pybind11::arg("d2h_stream") = 0,
        pybind11::arg("h2d_stream") = 0, pybind11::arg("device") = -1,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("device_view", &device_view, "A CUDA tensor reading the pinned host memory of `host` in place",
        pybind11::arg("host"), pybind11::arg("device"));
}
