// The model walk's building blocks, shared by conversion (convert.cpp) and LoRA injection
// (src/lora): name-list matching with "matched nothing" bookkeeping, the shared-layer check and
// replacing a child everywhere its parent keeps it. Private to the library.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>

#include <memory>
#include <string>
#include <vector>

namespace msbnb::detail {

/// "prefix.key", or "key" for the root's children.
std::string join_name(const std::string& prefix, const std::string& key);

/// A list of module-name entries (msbnb::module_name_matches rules) that remembers which ones
/// matched. `arg` names the list in errors ("modules_to_not_convert", "target_modules", ...).
class NameList {
 public:
  /// Throws c10::Error for an empty entry, naming arg[i].
  NameList(const std::vector<std::string>& entries, const std::string& arg);
  /// The first entry matching `name` (every matching entry is marked used), or nullptr.
  const std::string* match(const std::string& name);
  /// Entries never matched, in list order.
  std::vector<std::string> unused() const;
  const std::vector<std::string>& entries() const { return entries_; }

 private:
  std::vector<std::string> entries_;
  std::vector<bool> used_;
};

/// Sequential, ModuleList or ModuleDict (they keep their own list of modules beside the children).
bool is_container(const torch::nn::Module& m);

/// Whether `child` of `parent` is held by something besides the parent (its children map and a
/// container's own list) and `walk_refs` references the walk itself keeps: a ModuleHolder field,
/// a handle kept by the caller, another parent. Such a holder would keep running the old layer.
bool held_elsewhere(const torch::nn::Module& parent, const std::shared_ptr<torch::nn::Module>& child,
                    long walk_refs = 1);

/// Replaces child `key` of `parent` (currently `old`) by `replacement` everywhere the parent keeps
/// it: the children map, a Sequential's AnyModule list, a ModuleList / ModuleDict's list; then
/// calls msbnb::ChildReplaceHook::child_replaced if the parent implements it.
void replace_child(torch::nn::Module& parent, const std::string& key,
                   const std::shared_ptr<torch::nn::Module>& old, const torch::nn::AnyModule& replacement);

}  // namespace msbnb::detail
