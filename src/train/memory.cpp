#include "msbnb/train/memory.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <atomic>
#include <cstring>
#include <sstream>
#include <string>

namespace msbnb::train {
namespace {

// Global counters: a counted storage may be freed after its counter is gone.
std::atomic<int64_t> g_live{0}, g_peak{0}, g_allocations{0};
std::atomic<bool> g_installed{false};

void raise_peak(int64_t live) {
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (live > peak && !g_peak.compare_exchange_weak(peak, live, std::memory_order_relaxed)) {
  }
}

// Each counted block carries its size in a header of kHeader bytes in front of the data, so
// the data pointer is the context (raw_allocate / raw_deallocate work: torch uses them) and
// the deleter needs no lookup. kHeader = c10's CPU alignment, so the data stays 64-aligned.
constexpr size_t kHeader = 64;

void counted_delete(void* data) {
  if (data == nullptr) return;
  char* block = static_cast<char*>(data) - kHeader;
  int64_t bytes = 0;
  std::memcpy(&bytes, block, sizeof(bytes));
  g_live.fetch_sub(bytes, std::memory_order_relaxed);
  c10::free_cpu(block);
}

// Allocates with libtorch's CPU allocation (c10::alloc_cpu, as the default allocator); lives
// forever (storages keep a pointer to the allocator that made them, to resize).
struct CountingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) const override {
    char* block = static_cast<char*>(c10::alloc_cpu(n + kHeader));
    const int64_t bytes = static_cast<int64_t>(n);
    std::memcpy(block, &bytes, sizeof(bytes));
    raise_peak(g_live.fetch_add(bytes, std::memory_order_relaxed) + bytes);
    g_allocations.fetch_add(1, std::memory_order_relaxed);
    void* data = block + kHeader;
    return c10::DataPtr(data, data, &counted_delete, c10::Device(c10::DeviceType::CPU));
  }
  c10::DeleterFnPtr raw_deleter() const override { return &counted_delete; }
};

CountingAllocator& counting_allocator() {
  static auto* a = new CountingAllocator();  // never destroyed, see above
  return *a;
}

// The highest priority, so it replaces any registered allocator and can be replaced back.
constexpr uint8_t kPriority = 255;

int64_t archive_tensor_bytes(torch::serialize::InputArchive& archive) {
  int64_t total = 0;
  for (const std::string& key : archive.keys()) {
    torch::Tensor t;
    if (archive.try_read(key, t, /*is_buffer=*/false) || archive.try_read(key, t, /*is_buffer=*/true)) {
      total += tensor_bytes(t);
      continue;
    }
    c10::IValue v;
    if (archive.try_read(key, v)) {
      if (v.isTensor()) total += tensor_bytes(v.toTensor());
      continue;
    }
    torch::serialize::InputArchive nested;
    if (archive.try_read(key, nested)) total += archive_tensor_bytes(nested);
  }
  return total;
}

}  // namespace

CpuMemoryCounter::CpuMemoryCounter() {
  bool expected = false;
  TORCH_CHECK(g_installed.compare_exchange_strong(expected, true),
              "CpuMemoryCounter: another counter is installed; expected one at a time");
  previous_ = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&counting_allocator(), kPriority);
  base_live_ = g_live.load();
  base_allocations_ = g_allocations.load();
  g_peak.store(base_live_);
}

CpuMemoryCounter::~CpuMemoryCounter() {
  c10::SetCPUAllocator(previous_, kPriority);
  g_installed.store(false);
}

int64_t CpuMemoryCounter::live_bytes() const { return g_live.load() - base_live_; }
int64_t CpuMemoryCounter::peak_bytes() const { return g_peak.load() - base_live_; }
void CpuMemoryCounter::reset_peak() { g_peak.store(g_live.load()); }
int64_t CpuMemoryCounter::allocations() const { return g_allocations.load() - base_allocations_; }

int64_t tensor_bytes(const torch::Tensor& t) {
  return t.defined() ? t.numel() * static_cast<int64_t>(t.element_size()) : 0;
}

ModuleBytes module_bytes(const torch::nn::Module& module) {
  ModuleBytes b;
  for (const auto& p : module.parameters()) (p.requires_grad() ? b.trainable : b.frozen) += tensor_bytes(p);
  for (const auto& t : module.buffers()) b.buffers += tensor_bytes(t);
  return b;
}

int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer) {
  int64_t total = 0;
  for (const auto& entry : optimizer.state()) {
    torch::serialize::OutputArchive out;
    entry.second->serialize(out);
    std::ostringstream os;
    out.save_to(os);
    std::istringstream is(os.str());
    torch::serialize::InputArchive in;
    in.load_from(is);
    total += archive_tensor_bytes(in);
  }
  return total;
}

}  // namespace msbnb::train
