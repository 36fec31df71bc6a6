// Atomic file replacement (see msbnb/io/atomic_file.h).
#include "msbnb/io/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <system_error>
#include <vector>

namespace msbnb::io {

namespace {

std::atomic<testing::AtomicWriteHook> g_hook{nullptr};

[[noreturn]] void fail(const std::string& what, int err) {
  throw std::system_error(err, std::generic_category(), what);
}

std::string dir_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// The mode a new file gets from open(..., 0666): the umask read without changing it (umask(2)
// would race with other threads).
mode_t new_file_mode() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Umask:", 0) == 0)
      return 0666 & ~static_cast<mode_t>(std::strtoul(line.c_str() + 6, nullptr, 8));
  }
  return 0644;
}

}  // namespace

void testing::set_atomic_write_hook(AtomicWriteHook hook) { g_hook.store(hook); }

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  if (path_.empty() || path_.back() == '/')
    fail("atomic write: expected a file path, got '" + path_ + "'", EINVAL);
  const auto slash = path_.find_last_of('/');
  const std::string base = slash == std::string::npos ? path_ : path_.substr(slash + 1);
  temp_path_ = dir_of(path_) + "/." + base + ".tmp.XXXXXX";
  std::vector<char> templ(temp_path_.begin(), temp_path_.end());
  templ.push_back('\0');
  fd_ = mkostemp(templ.data(), O_CLOEXEC);
  if (fd_ < 0) fail(path_ + ": cannot create a temporary file in " + dir_of(path_), errno);
  temp_path_ = templ.data();
  // mkostemp makes 0600; give the new file the target's mode, or what open(2) would give.
  struct stat st {};
  const mode_t mode = stat(path_.c_str(), &st) == 0 ? (st.st_mode & 07777) : new_file_mode();
  if (fchmod(fd_, mode) != 0) {
    const int err = errno;
    discard();
    fail(temp_path_ + ": fchmod", err);
  }
}

AtomicFile::~AtomicFile() {
  if (!committed_) discard();
}

void AtomicFile::discard() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!temp_path_.empty()) ::unlink(temp_path_.c_str());
}

void AtomicFile::write(const void* data, size_t n) {
  if (fd_ < 0) fail(path_ + ": write after commit or failure", EBADF);
  constexpr size_t kChunk = size_t{1} << 20;
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd_, p, n < kChunk ? n : kChunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      discard();
      fail(temp_path_ + ": write (for " + path_ + ")", err);
    }
    p += w;
    n -= static_cast<size_t>(w);
    written_ += static_cast<uint64_t>(w);
    if (auto hook = g_hook.load()) hook(temp_path_, written_);
  }
}

void AtomicFile::commit() {
  if (fd_ < 0) fail(path_ + ": commit after commit or failure", EBADF);
  if (::fsync(fd_) != 0) {
    const int err = errno;
    discard();
    fail(temp_path_ + ": fsync (for " + path_ + ")", err);
  }
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) {
    const int err = errno;
    discard();
    fail(temp_path_ + ": close (for " + path_ + ")", err);
  }
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    discard();
    fail(path_ + ": rename from " + temp_path_, err);
  }
  committed_ = true;
  // The rename is durable once the directory is synced.
  const std::string dir = dir_of(path_);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) fail(path_ + ": open directory " + dir + " to fsync it", errno);
  const int rc = ::fsync(dfd);
  const int err = errno;
  ::close(dfd);
  if (rc != 0) fail(path_ + ": fsync directory " + dir, err);
}

void write_file_atomic(const std::string& path, std::string_view bytes) {
  AtomicFile f(path);
  f.write(bytes);
  f.commit();
}

}  // namespace msbnb::io
