// SVG charts: hand-written markup, no dependency.
#include "svg.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace msbnb::cli {
namespace {

std::string num(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", v);
  return b;
}

std::string tick(double v) {
  char b[32];
  const double a = std::fabs(v);
  std::snprintf(b, sizeof b, a != 0 && (a < 1e-2 || a >= 1e5) ? "%.2g" : "%.3g", v);
  return b;
}

std::string escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<') {
      o += "&lt;";
    } else if (c == '>') {
      o += "&gt;";
    } else if (c == '&') {
      o += "&amp;";
    } else {
      o += c;
    }
  }
  return o;
}

}  // namespace

std::vector<double> histogram(const float* v, int64_t n, double lo, double hi, int bins) {
  std::vector<double> c(static_cast<size_t>(std::max(bins, 1)), 0.0);
  const double w = (hi - lo) / static_cast<double>(c.size());
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(v[i]) || w <= 0) continue;
    const double k = std::floor((v[i] - lo) / w);
    c[static_cast<size_t>(std::clamp<double>(k, 0, static_cast<double>(c.size() - 1)))] += 1;
  }
  return c;
}

std::string render_svg(const std::vector<SvgPlot>& plots) {
  const double W = 760, H = 360, L = 70, R = 180, T = 34, B = 48;
  std::ostringstream s;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H * plots.size()
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" "
       "fill=\"white\"/>\n";
  for (size_t p = 0; p < plots.size(); ++p) {
    const SvgPlot& pl = plots[p];
    const double oy = H * static_cast<double>(p);
    double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
    for (const auto& l : pl.lines) {
      for (double x : l.x) x0 = std::min(x0, x), x1 = std::max(x1, x);
      for (double y : l.y) y0 = std::min(y0, y), y1 = std::max(y1, y);
    }
    for (const auto& b : pl.bars) {
      x0 = std::min(x0, b.lo), x1 = std::max(x1, b.hi), y0 = std::min(y0, 0.0);
      for (double c : b.counts) y1 = std::max(y1, c);
    }
    if (!(y0 < 1e300)) y0 = 0;
    if (!(x1 > x0)) x0 = 0, x1 = 1;
    if (!(y1 > y0)) y1 = y0 + 1;
    auto X = [&](double x) { return L + (W - L - R) * (x - x0) / (x1 - x0); };
    auto Y = [&](double y) { return oy + T + (H - T - B) * (y1 - y) / (y1 - y0); };
    s << "<text x=\"" << L << "\" y=\"" << num(oy + 20) << "\" font-size=\"14\">" << escape(pl.title)
      << "</text>\n";
    for (int k = 0; k <= 4; ++k) {
      const double v = y0 + (y1 - y0) * k / 4.0, xv = x0 + (x1 - x0) * k / 4.0;
      s << "<line x1=\"" << L << "\" x2=\"" << W - R << "\" y1=\"" << num(Y(v)) << "\" y2=\"" << num(Y(v))
        << "\" stroke=\"#ddd\"/><text x=\"" << L - 6 << "\" y=\"" << num(Y(v) + 4)
        << "\" text-anchor=\"end\">" << tick(v) << "</text>\n";
      s << "<text x=\"" << num(X(xv)) << "\" y=\"" << num(oy + H - B + 16) << "\" text-anchor=\"middle\">"
        << tick(xv) << "</text>\n";
    }
    s << "<text x=\"" << num((L + W - R) / 2) << "\" y=\"" << num(oy + H - 14) << "\" text-anchor=\"middle\">"
      << escape(pl.x_label) << "</text>\n";
    s << "<text x=\"14\" y=\"" << num(oy + T + (H - T - B) / 2) << "\" transform=\"rotate(-90 14 "
      << num(oy + T + (H - T - B) / 2) << ")\" text-anchor=\"middle\">" << escape(pl.y_label) << "</text>\n";
    int legend = 0;
    auto key = [&](const std::string& label, const std::string& color) {
      const double ly = oy + T + 10 + 18 * legend++;
      s << "<rect x=\"" << W - R + 10 << "\" y=\"" << num(ly - 5) << "\" width=\"20\" height=\"6\" fill=\""
        << color << "\"/><text x=\"" << W - R + 35 << "\" y=\"" << num(ly + 2) << "\">" << escape(label)
        << "</text>\n";
    };
    for (const auto& b : pl.bars) {
      const double bw = (b.hi - b.lo) / static_cast<double>(std::max<size_t>(b.counts.size(), 1));
      for (size_t i = 0; i < b.counts.size(); ++i) {
        if (b.counts[i] <= 0) continue;
        const double xa = X(b.lo + bw * static_cast<double>(i)),
                     xb = X(b.lo + bw * static_cast<double>(i + 1));
        s << "<rect x=\"" << num(xa) << "\" y=\"" << num(Y(b.counts[i])) << "\" width=\""
          << num(std::max(xb - xa, 0.5)) << "\" height=\"" << num(Y(y0) - Y(b.counts[i])) << "\" fill=\""
          << b.color << "\" fill-opacity=\"0.7\"/>\n";
      }
      key(b.label, b.color);
    }
    for (double m : pl.markers) {
      if (m < x0 || m > x1) continue;
      s << "<line x1=\"" << num(X(m)) << "\" x2=\"" << num(X(m)) << "\" y1=\"" << num(Y(y0)) << "\" y2=\""
        << num(Y(y1)) << "\" stroke=\"#d62728\" stroke-width=\"1\" stroke-dasharray=\"3,2\"/>\n";
    }
    if (!pl.markers.empty()) key(pl.marker_label, "#d62728");
    for (const auto& l : pl.lines) {
      s << "<polyline fill=\"none\" stroke-width=\"1.5\" stroke=\"" << l.color << "\" points=\"";
      for (size_t i = 0; i < l.x.size() && i < l.y.size(); ++i)
        s << num(X(l.x[i])) << "," << num(Y(l.y[i])) << " ";
      s << "\"/>\n";
      key(l.label, l.color);
    }
    s << "<rect x=\"" << L << "\" y=\"" << num(oy + T) << "\" width=\"" << W - L - R << "\" height=\""
      << H - T - B << "\" fill=\"none\" stroke=\"#333\"/>\n";
  }
  s << "</svg>\n";
  return s.str();
}

}  // namespace msbnb::cli
