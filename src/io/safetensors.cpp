// safetensors for libtorch: mmap reader, atomic writer. Checks: msbnb/io/safetensors_format.h.
#include "msbnb/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>
#include <system_error>

#include "msbnb/io/atomic_file.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data are little-endian: msbnb reads them in place");

namespace msbnb::io {

namespace {

// The torch layer's errors are c10::Error; the byte layer and atomic_file throw std exceptions.
template <class F>
auto as_c10(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error&) {
    throw;
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
}

struct DtypeMap {
  StDtype st;
  torch::ScalarType t;
};
constexpr DtypeMap kMap[] = {
    {StDtype::BOOL, torch::kBool},  {StDtype::U8, torch::kUInt8},         {StDtype::I8, torch::kInt8},
    {StDtype::I16, torch::kInt16},  {StDtype::I32, torch::kInt32},        {StDtype::I64, torch::kInt64},
    {StDtype::F16, torch::kHalf},   {StDtype::BF16, torch::kBFloat16},    {StDtype::F32, torch::kFloat},
    {StDtype::F64, torch::kDouble}, {StDtype::C64, torch::kComplexFloat},
};

std::string quote_cut(const std::string& s) {
  return "'" + (s.size() <= 120 ? s : s.substr(0, 120) + "...") + "'";
}

}  // namespace

torch::ScalarType to_scalar_type(StDtype d) {
  for (const auto& m : kMap) {
    if (m.st == d) return m.t;
  }
  TORCH_CHECK(false,
              "dtype: expected one libtorch 1.13 has (BOOL U8 I8 I16 I32 I64 F16 BF16 F32 F64 C64), got ",
              dtype_name(d));
}

StDtype from_scalar_type(torch::ScalarType t) {
  for (const auto& m : kMap) {
    if (m.t == t) return m.st;
  }
  TORCH_CHECK(false,
              "dtype: expected one safetensors stores (bool uint8 int8 int16 int32 int64 float16 bfloat16 ",
              "float32 float64 complex64), got ", t);
}

// --- reading ---------------------------------------------------------------------------------

struct SafetensorsFile::Impl {
  std::string path;
  uint8_t* base = nullptr;  // the whole file
  size_t size = 0;
  bool mapped = false;
  std::string bytes;  // from_bytes, or an empty file
  SafetensorsHeader header;
  ~Impl() {
    if (mapped) munmap(base, size);
  }
};

SafetensorsFile::SafetensorsFile(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  auto impl = std::make_shared<Impl>();
  impl->path = path;
  // O_NONBLOCK: a FIFO in place of the file must not block the open (it is refused below).
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  TORCH_CHECK(fd >= 0, path, ": expected a readable file, got ", std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    const int err = errno;
    ::close(fd);
    TORCH_CHECK(false, path, ": expected a regular file, got ",
                S_ISDIR(st.st_mode) ? "a directory" : std::strerror(err));
  }
  impl->size = static_cast<size_t>(st.st_size);
  if (impl->size > 0) {
    // Private and writable: tensors may be written into (copy-on-write), the file never is.
    void* p = mmap(nullptr, impl->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);
    TORCH_CHECK(p != MAP_FAILED, path, ": mmap of ", impl->size, " bytes failed: ", std::strerror(err));
    impl->base = static_cast<uint8_t*>(p);
    impl->mapped = true;
  } else {
    ::close(fd);
    impl->base = reinterpret_cast<uint8_t*>(impl->bytes.data());
  }
  impl->header = as_c10([&] { return parse_safetensors_header(impl->base, impl->size, path); });
  return SafetensorsFile(std::move(impl));
}

SafetensorsFile SafetensorsFile::from_bytes(std::string bytes, const std::string& source) {
  auto impl = std::make_shared<Impl>();
  impl->path = source;
  impl->bytes = std::move(bytes);
  impl->base = reinterpret_cast<uint8_t*>(impl->bytes.data());
  impl->size = impl->bytes.size();
  impl->header = as_c10([&] { return parse_safetensors_header(impl->base, impl->size, source); });
  return SafetensorsFile(std::move(impl));
}

const std::string& SafetensorsFile::path() const { return impl_->path; }

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->header.tensors.size());
  for (const auto& e : impl_->header.tensors) out.push_back(e.name);
  return out;
}

size_t SafetensorsFile::size() const { return impl_->header.tensors.size(); }

bool SafetensorsFile::has(const std::string& name) const { return impl_->header.find(name) != nullptr; }

const TensorEntry& SafetensorsFile::info(const std::string& name) const {
  const TensorEntry* e = impl_->header.find(name);
  TORCH_CHECK(e, impl_->path, ": tensor ", quote_cut(name),
              ": expected a tensor of the file, got none of that name (", impl_->header.tensors.size(),
              " tensors)");
  return *e;
}

void SafetensorsFile::release(const std::string& name) const {
  const TensorEntry& e = info(name);
  if (!impl_->mapped || e.nbytes() == 0) return;
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = reinterpret_cast<uintptr_t>(impl_->base + impl_->header.data_start + e.begin);
  const uintptr_t begin = (first + page - 1) / page * page;  // whole pages only: neighbours keep theirs
  const uintptr_t end = (first + e.nbytes()) / page * page;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

torch::Tensor SafetensorsFile::get(const std::string& name) const {
  const TensorEntry& e = info(name);
  torch::ScalarType t{};
  try {
    t = to_scalar_type(e.dtype);
  } catch (const c10::Error& err) {
    TORCH_CHECK(false, impl_->path, ": tensor ", quote_cut(name), ": ", err.what_without_backtrace());
  }
  const auto opts = torch::TensorOptions().dtype(t).device(torch::kCPU);
  if (e.nbytes() == 0) return torch::empty(e.shape, opts);
  uint8_t* p = impl_->base + impl_->header.data_start + e.begin;
  if (t == torch::kBool) {
    // Any byte but 0 / 1 is not a bool: refuse it rather than hand torch undefined values.
    const uint8_t* bad = std::find_if(p, p + e.nbytes(), [](uint8_t b) { return b > 1; });
    TORCH_CHECK(bad == p + e.nbytes(), impl_->path, ": tensor ", quote_cut(name),
                ": expected BOOL bytes 0 or 1, got ", static_cast<int>(*bad), " at element ", bad - p);
  }
  const size_t elem = torch::elementSize(t);
  if (reinterpret_cast<uintptr_t>(p) % elem != 0) {
    torch::Tensor out = torch::empty(e.shape, opts);
    std::memcpy(out.data_ptr(), p, e.nbytes());
    return out;
  }
  std::shared_ptr<const Impl> keep = impl_;
  return torch::from_blob(
      p, e.shape, [keep](void*) mutable { keep.reset(); }, opts);
}

const std::map<std::string, std::string>& SafetensorsFile::metadata() const { return impl_->header.metadata; }

const SafetensorsHeader& SafetensorsFile::header() const { return impl_->header; }

NamedTensors load_safetensors(const std::string& path, std::map<std::string, std::string>* metadata) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  NamedTensors out;
  out.reserve(f.size());
  for (const auto& e : f.header().tensors) out.emplace_back(e.name, f.get(e.name));
  if (metadata) *metadata = f.metadata();
  return out;
}

// --- writing ---------------------------------------------------------------------------------

namespace {

struct Prepared {
  std::string header;               // length + JSON + padding
  std::vector<torch::Tensor> data;  // contiguous, in data-section order
};

Prepared prepare(const std::string& dest, const NamedTensors& tensors,
                 const std::map<std::string, std::string>& metadata) {
  std::set<std::string> seen;
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, t] = tensors[i];
    TORCH_CHECK(!name.empty(), dest, ": tensor ", i, ": expected a non-empty name, got ''");
    TORCH_CHECK(name != "__metadata__", dest, ": tensor ", i,
                ": expected a name other than the reserved '__metadata__'");
    TORCH_CHECK(seen.insert(name).second, dest, ": tensor ", quote_cut(name),
                ": expected unique names, got it twice");
    TORCH_CHECK(t.defined(), dest, ": tensor ", quote_cut(name),
                ": expected a defined tensor, got an undefined one");
    TORCH_CHECK(t.device().is_cpu(), dest, ": tensor ", quote_cut(name),
                ": expected a CPU tensor, got device ", t.device());
    TORCH_CHECK(t.layout() == torch::kStrided, dest, ": tensor ", quote_cut(name),
                ": expected a dense (strided) tensor, got layout ", t.layout());
    try {
      from_scalar_type(t.scalar_type());
    } catch (const c10::Error& err) {
      TORCH_CHECK(false, dest, ": tensor ", quote_cut(name), ": ", err.what_without_backtrace());
    }
    order[i] = i;
  }
  // Largest elements first, then by name: every offset stays aligned for its dtype (sizes are
  // powers of two, the header is padded to 8), without holes; the Python writer does the same.
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const size_t ea = tensors[a].second.element_size(), eb = tensors[b].second.element_size();
    return ea != eb ? ea > eb : tensors[a].first < tensors[b].first;
  });
  Prepared p;
  std::vector<TensorEntry> entries;
  uint64_t pos = 0;
  for (size_t i : order) {
    const auto& [name, t] = tensors[i];
    torch::Tensor c = t.detach().resolve_conj().resolve_neg().contiguous();
    TensorEntry e;
    e.name = name;
    e.dtype = from_scalar_type(c.scalar_type());
    e.shape = c.sizes().vec();
    e.begin = pos;
    e.end = pos + c.nbytes();
    pos = e.end;
    entries.push_back(std::move(e));
    p.data.push_back(std::move(c));
  }
  p.header = as_c10([&] { return serialize_safetensors_header(entries, metadata); });
  return p;
}

}  // namespace

std::string serialize_safetensors(const NamedTensors& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  Prepared p = prepare("serialize_safetensors", tensors, metadata);
  std::string out = std::move(p.header);
  for (const auto& c : p.data) {
    if (c.nbytes() > 0) out.append(static_cast<const char*>(c.data_ptr()), c.nbytes());
  }
  return out;
}

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  Prepared p = prepare(path, tensors, metadata);
  as_c10([&] {
    AtomicFile f(path);
    f.write(p.header);
    for (const auto& c : p.data) {
      if (c.nbytes() > 0) f.write(c.data_ptr(), c.nbytes());
    }
    f.commit();
  });
}

NamedTensors to_named_tensors(const torch::OrderedDict<std::string, torch::Tensor>& tensors) {
  NamedTensors v;
  v.reserve(tensors.size());
  for (const auto& item : tensors) v.emplace_back(item.key(), item.value());
  return v;
}

}  // namespace msbnb::io
