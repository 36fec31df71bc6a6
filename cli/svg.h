// Small SVG charts for the command line (loss curves, weight and error histograms).
#pragma once
#include <string>
#include <vector>

namespace msbnb::cli {

/// One plot: axes with ticks, polylines, histogram bars and vertical marker lines.
struct SvgPlot {
  struct Line {
    std::string label, color;
    std::vector<double> x, y;
  };
  struct Bars {  // a histogram: counts over equal bins of [lo, hi)
    std::string label, color;
    double lo = 0, hi = 1;
    std::vector<double> counts;
  };
  std::string title, x_label, y_label;
  std::vector<Line> lines;
  std::vector<Bars> bars;
  std::vector<double> markers;  // vertical lines (quantization levels)
  std::string marker_label;
};

/// The plots stacked vertically in one SVG document.
std::string render_svg(const std::vector<SvgPlot>& plots);

/// Equal-width histogram of `values` over [lo, hi) (values outside land in the end bins).
std::vector<double> histogram(const float* values, int64_t n, double lo, double hi, int bins);

}  // namespace msbnb::cli
