// Atomic replacement: the target is the old file or the new one, never partial; failures and
// SIGKILL mid-write leave the old file intact.
#include "msbnb/io/atomic_file.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "msbnb/io/safetensors.h"

namespace {

namespace fs = std::filesystem;
using msbnb::io::AtomicFile;
using msbnb::io::write_file_atomic;

struct TempDir {
  fs::path path;
  TempDir() {
    std::string templ = (fs::temp_directory_path() / "msbnb_atomic_XXXXXX").string();
    path = mkdtemp(templ.data());
  }
  ~TempDir() { fs::remove_all(path); }
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(path)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }
};

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

TEST(AtomicFile, CreatesAndReplacesLeavingNoTemporary) {
  TempDir d;
  const std::string target = (d.path / "out.bin").string();
  write_file_atomic(target, "first");
  EXPECT_EQ(slurp(target), "first");
  write_file_atomic(target, std::string(3 << 20, 'x'));  // several 1 MiB chunks
  EXPECT_EQ(slurp(target), std::string(3 << 20, 'x'));
  EXPECT_EQ(d.entries(), std::vector<std::string>{"out.bin"});
}

TEST(AtomicFile, KeepsTheTargetsMode) {
  TempDir d;
  const std::string target = (d.path / "out.bin").string();
  write_file_atomic(target, "a");
  ASSERT_EQ(chmod(target.c_str(), 0640), 0);
  write_file_atomic(target, "b");
  struct stat st {};
  ASSERT_EQ(stat(target.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
}

TEST(AtomicFile, UncommittedFileIsDiscarded) {
  TempDir d;
  const std::string target = (d.path / "out.bin").string();
  write_file_atomic(target, "old");
  {
    AtomicFile f(target);
    f.write("new but abandoned");
    EXPECT_TRUE(fs::exists(f.temp_path()));
  }
  EXPECT_EQ(slurp(target), "old");
  EXPECT_EQ(d.entries(), std::vector<std::string>{"out.bin"});
}

TEST(AtomicFile, MissingDirectoryIsAnErrorNamingThePath) {
  TempDir d;
  const std::string target = (d.path / "no_such_dir" / "out.bin").string();
  try {
    write_file_atomic(target, "x");
    FAIL() << "no error";
  } catch (const std::system_error& e) {
    EXPECT_NE(std::string(e.what()).find(target), std::string::npos) << e.what();
    EXPECT_EQ(e.code().value(), ENOENT);
  }
}

TEST(AtomicFile, FailedRenameRemovesTheTemporary) {
  TempDir d;
  const fs::path target = d.path / "a_dir";
  fs::create_directory(target);
  fs::create_directory(target / "child");  // rename over a non-empty directory fails
  EXPECT_THROW(write_file_atomic(target.string(), "x"), std::system_error);
  EXPECT_EQ(d.entries(), std::vector<std::string>{"a_dir"});
}

void throwing_hook(const std::string&, uint64_t written) {
  if (written >= (1u << 20)) throw std::runtime_error("injected write failure");
}

TEST(AtomicFile, ErrorMidWriteKeepsTheOldFileAndRemovesTheTemporary) {
  TempDir d;
  const std::string target = (d.path / "model.safetensors").string();
  const torch::Tensor old = torch::arange(10, torch::kFloat32);
  msbnb::io::save_safetensors(target, {{"w", old}});
  msbnb::io::testing::set_atomic_write_hook(throwing_hook);
  try {
    msbnb::io::save_safetensors(target, {{"w", torch::ones({1 << 20}, torch::kFloat32)}});
    msbnb::io::testing::set_atomic_write_hook(nullptr);
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    msbnb::io::testing::set_atomic_write_hook(nullptr);
    EXPECT_NE(std::string(e.what()).find("injected write failure"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(torch::equal(msbnb::io::load_safetensors(target).at(0).second, old));
  EXPECT_EQ(d.entries(), std::vector<std::string>{"model.safetensors"});
}

// The child stops itself (the hook writes to the pipe, then sleeps) once half the new file is in
// the temporary: the parent kills it there, deterministically mid-save.
int g_pipe_write = -1;
uint64_t g_stop_at = 0;
void pausing_hook(const std::string&, uint64_t written) {
  if (written < g_stop_at) return;
  const char c = 'p';
  (void)!::write(g_pipe_write, &c, 1);
  for (;;) pause();
}

TEST(AtomicFile, SigkillMidSaveLeavesThePreviousFileIntact) {
  TempDir d;
  const std::string target = (d.path / "model.safetensors").string();
  const torch::Tensor old_w = torch::arange(1000, torch::kFloat32).reshape({10, 100});
  const torch::Tensor old_b = torch::tensor({1, 2, 3}, torch::kInt64);
  msbnb::io::save_safetensors(target, {{"w", old_w}, {"b", old_b}}, {{"step", "1"}});
  const std::string old_bytes = slurp(target);
  const torch::Tensor big = torch::full({8 << 20}, 2.5f);  // 32 MiB
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(fds[0]);
    g_pipe_write = fds[1];
    g_stop_at = 16u << 20;
    msbnb::io::testing::set_atomic_write_hook(pausing_hook);
    try {  // never return into gtest in the child
      msbnb::io::save_safetensors(target, {{"w", big}}, {{"step", "2"}});
    } catch (...) {
      _exit(4);
    }
    _exit(3);  // not reached: the parent kills us in the hook
  }
  ::close(fds[1]);
  // Kill the child before any assertion can return from this test and leave it paused.
  char c = 0;
  const ssize_t got = ::read(fds[0], &c, 1);
  ::close(fds[0]);
  std::string temp;
  for (const auto& name : d.entries()) {
    if (name.rfind(".model.safetensors.tmp.", 0) == 0) temp = name;
  }
  const uintmax_t temp_size = temp.empty() ? 0 : fs::file_size(d.path / temp);
  kill(pid, SIGKILL);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_EQ(got, 1) << "the child died before writing half of the file";
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  // It was killed with half the new file in the temporary.
  ASSERT_FALSE(temp.empty());
  EXPECT_GE(temp_size, 16u << 20);
  // The target is the old file, byte for byte, and loads; only the stray temporary is beside it.
  EXPECT_EQ(slurp(target), old_bytes);
  std::map<std::string, std::string> meta;
  const auto loaded = msbnb::io::load_safetensors(target, &meta);
  ASSERT_EQ(loaded.size(), 2u);
  EXPECT_EQ(loaded[0].first, "b");
  EXPECT_TRUE(torch::equal(loaded[0].second, old_b));
  EXPECT_EQ(loaded[1].first, "w");
  EXPECT_TRUE(torch::equal(loaded[1].second, old_w));
  EXPECT_EQ(meta.at("step"), "1");
  EXPECT_EQ(d.entries(), (std::vector<std::string>{temp, "model.safetensors"}));
  // The next save works and the stray temporary does not disturb it.
  msbnb::io::save_safetensors(target, {{"w", old_b}});
  EXPECT_TRUE(torch::equal(msbnb::io::load_safetensors(target).at(0).second, old_b));
}

}  // namespace
