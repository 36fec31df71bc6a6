// The model walk's building blocks (module_tree.h).
#include "module_tree.h"

#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>

#include "msbnb/convert/convert.h"

namespace msbnb::detail {

using torch::nn::Module;

std::string join_name(const std::string& prefix, const std::string& key) {
  return prefix.empty() ? key : prefix + "." + key;
}

NameList::NameList(const std::vector<std::string>& entries, const std::string& arg)
    : entries_(entries), used_(entries.size(), false) {
  for (size_t i = 0; i < entries_.size(); ++i) {
    TORCH_CHECK(!entries_[i].empty(), arg, "[", i,
                "]: expected a module name, a dot-boundary suffix or a glob, got an empty string");
  }
}

const std::string* NameList::match(const std::string& name) {
  const std::string* first = nullptr;
  for (size_t i = 0; i < entries_.size(); ++i) {
    if (module_name_matches(name, entries_[i])) {
      used_[i] = true;
      if (first == nullptr) first = &entries_[i];
    }
  }
  return first;
}

std::vector<std::string> NameList::unused() const {
  std::vector<std::string> out;
  for (size_t i = 0; i < entries_.size(); ++i) {
    if (!used_[i]) out.push_back(entries_[i]);
  }
  return out;
}

bool is_container(const Module& m) {
  return dynamic_cast<const torch::nn::SequentialImpl*>(&m) != nullptr ||
         dynamic_cast<const torch::nn::ModuleListImpl*>(&m) != nullptr ||
         dynamic_cast<const torch::nn::ModuleDictImpl*>(&m) != nullptr;
}

bool held_elsewhere(const Module& parent, const std::shared_ptr<Module>& child, long walk_refs) {
  const long expected = 1 + walk_refs + (is_container(parent) ? 1 : 0);
  return child.use_count() > expected;
}

void replace_child(Module& parent, const std::string& key, const std::shared_ptr<Module>& old,
                   const torch::nn::AnyModule& replacement) {
  const std::shared_ptr<Module> ptr = replacement.ptr();
  if (auto* seq = dynamic_cast<torch::nn::SequentialImpl*>(&parent)) {
    // forward() runs the AnyModule list, not the children map.
    for (auto it = seq->begin(); it != seq->end(); ++it) {
      if (it->ptr().get() == old.get()) *it = replacement;
    }
  } else if (auto* list = dynamic_cast<torch::nn::ModuleListImpl*>(&parent)) {
    for (auto it = list->begin(); it != list->end(); ++it) {
      if (it->get() == old.get()) *it = ptr;
    }
  } else if (auto* dict = dynamic_cast<torch::nn::ModuleDictImpl*>(&parent)) {
    for (auto it = dict->begin(); it != dict->end(); ++it) {
      if (it->key() == key) it->value() = ptr;
    }
  }
  parent.replace_module(key, ptr);
  if (auto* hook = dynamic_cast<ChildReplaceHook*>(&parent)) hook->child_replaced(key, replacement);
}

}  // namespace msbnb::detail
