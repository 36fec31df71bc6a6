// Atomic file replacement: the data go to a temporary file in the target's directory, which is
// fsync'ed and renamed over the target, then the directory is fsync'ed. Readers see the old file
// or the new one, never a partial one; after a crash (or SIGKILL) at any point the old file is
// intact (at worst a stray ".<name>.tmp.XXXXXX" is left beside it, if the process died before
// it could remove it). On any error the temporary file is removed and the target untouched.
// A symlink at the target is replaced by the new file, not followed.
// No libtorch: errors are std::system_error (errno) or std::runtime_error, naming the file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace msbnb::io {

class AtomicFile {
 public:
  /// Creates the temporary file beside `path` (mode 0644 minus the umask).
  explicit AtomicFile(std::string path);
  /// Removes the temporary file unless commit() succeeded.
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  /// Appends `n` bytes (retries short writes and EINTR).
  void write(const void* data, size_t n);
  void write(std::string_view s) { write(s.data(), s.size()); }
  /// fsync, rename over the target, fsync the directory. Once only; no write() after it.
  void commit();

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return temp_path_; }
  uint64_t bytes_written() const { return written_; }

 private:
  void discard() noexcept;
  std::string path_, temp_path_;
  int fd_ = -1;
  uint64_t written_ = 0;
  bool committed_ = false;
};

/// Replaces `path` by `bytes` atomically.
void write_file_atomic(const std::string& path, std::string_view bytes);

namespace testing {
/// Test hook: called after every chunk AtomicFile::write hands to the kernel (writes are cut
/// into chunks of at most 1 MiB), with the bytes written so far. nullptr (the default) disables
/// it. A crash test sets it in a child process to stop mid-save and be killed.
using AtomicWriteHook = void (*)(const std::string& temp_path, uint64_t bytes_written);
void set_atomic_write_hook(AtomicWriteHook hook);
}  // namespace testing

}  // namespace msbnb::io
