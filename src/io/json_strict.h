// Strict JSON parsing for the file readers (no libtorch): nlohmann_json with a callback that
// refuses duplicate keys (nlohmann keeps the last one silently, so a hostile file could show one
// value to us and another to a different reader) and nesting deeper than the format allows
// (bounded memory and work on hostile input).
#pragma once
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "msbnb/io/safetensors_format.h"

namespace msbnb::io::detail {

/// `s` quoted, cut to `max` bytes (names and values from a hostile file can be huge).
inline std::string quote_cut(std::string_view s, size_t max = 120) {
  std::string out = "'";
  if (s.size() <= max) {
    out.append(s);
  } else {
    out.append(s.substr(0, max));
    out += "...(" + std::to_string(s.size()) + " bytes)";
  }
  return out + "'";
}

/// A JSON value for a message: compact, cut to `max` bytes.
inline std::string shown(const nlohmann::json& j, size_t max = 120) {
  std::string s = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > max) s = s.substr(0, max) + "...";
  return s;
}

inline const char* type_name(const nlohmann::json& j) {
  if (j.is_number_integer()) return "integer";
  if (j.is_number_float()) return "number";
  return j.type_name();
}

/// Parses `text`; FormatError "<what>: ..." on malformed JSON, duplicate keys or more than
/// `max_depth` nested objects / arrays.
inline nlohmann::json parse_json_strict(std::string_view text, int max_depth, const std::string& what) {
  std::vector<std::set<std::string>> keys;  // one set per open object, or per open array (unused)
  int depth = 0;
  auto cb = [&](int /*depth*/, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) -> bool {
    using E = nlohmann::json::parse_event_t;
    switch (ev) {
      case E::object_start:
      case E::array_start:
        if (++depth > max_depth) {
          throw FormatError(what + ": expected JSON nested at most " + std::to_string(max_depth) +
                            " levels deep, got deeper");
        }
        keys.emplace_back();
        break;
      case E::object_end:
      case E::array_end:
        --depth;
        keys.pop_back();
        break;
      case E::key: {
        const auto& k = parsed.get_ref<const std::string&>();
        if (!keys.back().insert(k).second) {
          throw FormatError(what + ": expected unique keys, got " + quote_cut(k) + " twice");
        }
        break;
      }
      case E::value:
        break;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/true,
                                 /*ignore_comments=*/false);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(what + ": expected well-formed JSON, got " + e.what());
  }
}

}  // namespace msbnb::io::detail
