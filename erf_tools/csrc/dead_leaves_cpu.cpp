// The compiled painter of erf_tools.synthetic_images: front-to-back dead leaves on a label canvas, then colour.
//
// The random draws stay in Python (NumPy); this file only rasterises them, pixel for pixel as the NumPy reference
// (_Canvas and render in synthetic_images.py) does:
//
// * a leaf of radius r <= stamp_radius is "stamped" about its centre rounded to the nearest pixel (round half to
//   even, as np.rint): it covers the pixels at integer offsets (dy, dx) with dy² + dx² <= r² (r² in double);
// * a larger leaf covers the pixels (y, x) of its bounding box [ceil(cy - r), floor(cy + r)] (clipped to the image,
//   same for x) with (y - cy)² + (x - cx)² <= r * r, evaluated in double exactly as NumPy does (no fused
//   multiply-add: the extension is built with -ffp-contract=off);
// * a pixel shows the front-most (smallest-index) leaf covering it. Leaves arrive in index order, so each pixel is
//   written once, by the first leaf that covers it, and never again;
// * colouring: gain = offset[l] + gy[l]·y + gx[l]·x and value = colour[l]·gain + 0.5, clipped to 0..255 and
//   truncated, all in float32 and in NumPy's order of operations (the tables come from Python).
//
// Speed: per 8×8 tile and per 64×64 super tile the canvas counts its bare pixels, so a leaf whose box has no bare
// pixel costs a few loads, and a visible leaf only scans the row spans (found with one square root per row, then
// corrected with the exact test) of the tiles that still have bare pixels. Single-threaded; the GIL is released,
// so generator threads run in parallel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kTileShift = 3;   // 8×8 tiles
constexpr int64_t kSuperShift = 6;  // 64×64 super tiles
constexpr int64_t kTileMask = (int64_t{1} << kTileShift) - 1;
constexpr int64_t kSuperMask = (int64_t{1} << kSuperShift) - 1;

using Doubles = py::array_t<double, py::array::c_style | py::array::forcecast>;
using Floats = py::array_t<float, py::array::c_style | py::array::forcecast>;

// floor(sqrt(n)) for 0 <= n < 2^52.
inline int64_t isqrt(int64_t n) {
  auto s = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  while (s * s > n) --s;
  while ((s + 1) * (s + 1) <= n) ++s;
  return s;
}

// np.clip(v, 0, 255).astype(np.uint8) for finite |v| < 2^31: truncating first and clamping the integer gives the
// same byte, without the branches a float clamp compiles to here.
inline uint8_t to_byte(float v) {
  const auto i = static_cast<int32_t>(v);
  return static_cast<uint8_t>(i < 0 ? 0 : (i > 255 ? 255 : i));
}

// One leaf's colouring: gain = offset + gain_y·y + gain_x·x, value = colour·gain + 0.5.
struct Leaf {
  float offset, gain_y, gain_x, red, green, blue;
};

// np.clip(v, 0, limit).astype(np.int64)
inline int64_t clip_index(double v, int64_t limit) {
  if (!(v > 0.0)) return 0;
  const auto high = static_cast<double>(limit);
  return static_cast<int64_t>(v < high ? v : high);
}

// Bare pixels per cell of a (2^shift)-sided grid over a height × width image.
std::vector<int32_t> cell_counts(int64_t height, int64_t width, int64_t shift) {
  const int64_t side = int64_t{1} << shift;
  const int64_t rows = (height + side - 1) >> shift, cols = (width + side - 1) >> shift;
  std::vector<int32_t> counts(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      counts[i * cols + j] = static_cast<int32_t>(std::min(side, height - (i << shift)) *
                                                  std::min(side, width - (j << shift)));
  return counts;
}

class Canvas {
 public:
  Canvas(int64_t height, int64_t width)
      : height_(height),
        width_(width),
        tiles_x_((width + kTileMask) >> kTileShift),
        supers_x_((width + kSuperMask) >> kSuperShift),
        bare_(height * width) {
    if (height < 1 || width < 1) throw std::invalid_argument("canvas size must be positive");
    labels_.assign(static_cast<size_t>(height * width), -1);
    tiles_ = cell_counts(height, width, kTileShift);
    supers_ = cell_counts(height, width, kSuperShift);
  }

  int64_t bare() const { return bare_; }

  // Paint leaves first, first + 1, ... (centres in pixels, radii); returns the number of bare pixels left.
  int64_t paint(const Doubles& centre_y, const Doubles& centre_x, const Doubles& radius, int64_t first,
                double stamp_radius) {
    const int64_t count = radius.size();
    if (centre_y.size() != count || centre_x.size() != count)
      throw std::invalid_argument("centre_y, centre_x and radius must have the same length");
    if (first < 0 || first + count > INT32_MAX) throw std::invalid_argument("leaf indices must fit in int32");
    const double* ys = centre_y.data();
    const double* xs = centre_x.data();
    const double* rs = radius.data();
    shown_.resize(static_cast<size_t>(std::max(end_, first + count)), 0);
    {
      py::gil_scoped_release release;
      for (int64_t k = 0; k < count && bare_ > 0; ++k) {
        const auto label = static_cast<int32_t>(first + k);
        const double r = rs[k];
        const bool stamped = r <= stamp_radius;
        const double cy = stamped ? std::nearbyint(ys[k]) : ys[k];
        const double cx = stamped ? std::nearbyint(xs[k]) : xs[k];
        const int64_t y0 = clip_index(std::ceil(cy - r), height_);
        const int64_t y1 = clip_index(std::floor(cy + r) + 1.0, height_);
        const int64_t x0 = clip_index(std::ceil(cx - r), width_);
        const int64_t x1 = clip_index(std::floor(cx + r) + 1.0, width_);
        if (y1 <= y0 || x1 <= x0 || !any_bare(y0, y1, x0, x1)) continue;
        if (stamped)
          paint_stamp(static_cast<int64_t>(cy), static_cast<int64_t>(cx), r, label);
        else
          paint_disc(cy, cx, r, y0, y1, x0, x1, label);
      }
    }
    end_ = std::max(end_, first + count);
    return bare_;
  }

  // The labels, int32 height × width, -1 where no leaf landed.
  py::array_t<int32_t> labels() const {
    py::array_t<int32_t> out({height_, width_});
    std::copy(labels_.begin(), labels_.end(), out.mutable_data());
    return out;
  }

  // The leaves that show on at least one pixel, in index order (int64).
  py::array_t<int64_t> visible() const {
    std::vector<int64_t> shown;
    for (size_t i = 0; i < shown_.size(); ++i)
      if (shown_[i]) shown.push_back(static_cast<int64_t>(i));
    py::array_t<int64_t> out(static_cast<py::ssize_t>(shown.size()));
    std::copy(shown.begin(), shown.end(), out.mutable_data());
    return out;
  }

  // RGB uint8 height × width × 3 from per-leaf float32 tables with one last row for the background (label -1).
  py::array_t<uint8_t> render(const Floats& offset, const Floats& gain_y, const Floats& gain_x,
                              const Floats& colours) const {
    const int64_t rows = offset.size();
    if (gain_y.size() != rows || gain_x.size() != rows || colours.size() != 3 * rows)
      throw std::invalid_argument("offset, gain_y, gain_x need one entry and colours one RGB row per leaf");
    if (rows < end_ + 1) throw std::invalid_argument("fewer colour rows than leaves painted plus the background");
    const int64_t height = height_, width = width_;
    py::array_t<uint8_t> out({height, width, int64_t{3}});
    uint8_t* __restrict dst = out.mutable_data();
    std::vector<Leaf> leaves(static_cast<size_t>(rows));
    {
      const float* off = offset.data();
      const float* gy = gain_y.data();
      const float* gx = gain_x.data();
      const float* rgb = colours.data();
      py::gil_scoped_release release;
      for (int64_t l = 0; l < rows; ++l)
        leaves[l] = Leaf{off[l], gy[l], gx[l], rgb[3 * l], rgb[3 * l + 1], rgb[3 * l + 2]};
      const Leaf* table = leaves.data();
      const auto background = static_cast<int32_t>(rows - 1);
      for (int64_t y = 0; y < height; ++y) {
        const int32_t* __restrict row = labels_.data() + y * width;
        uint8_t* __restrict pixel = dst + y * width * 3;
        const auto fy = static_cast<float>(y);
        for (int64_t x = 0; x < width; ++x, pixel += 3) {
          const int32_t label = row[x];
          const Leaf& leaf = table[label < 0 ? background : label];
          float gain = leaf.offset + leaf.gain_y * fy;
          gain = gain + leaf.gain_x * static_cast<float>(x);
          pixel[0] = to_byte(leaf.red * gain + 0.5f);
          pixel[1] = to_byte(leaf.green * gain + 0.5f);
          pixel[2] = to_byte(leaf.blue * gain + 0.5f);
        }
      }
    }
    return out;
  }

 private:
  // Whether the box [y0, y1) × [x0, x1) meets a tile (or, for a large box, a super tile) with a bare pixel.
  bool any_bare(int64_t y0, int64_t y1, int64_t x0, int64_t x1) const {
    int64_t shift = kTileShift, cols = tiles_x_;
    const int32_t* cells = tiles_.data();
    if ((((y1 - 1) >> kTileShift) - (y0 >> kTileShift) + 1) * (((x1 - 1) >> kTileShift) - (x0 >> kTileShift) + 1) >
        16) {
      shift = kSuperShift, cols = supers_x_, cells = supers_.data();
    }
    for (int64_t i = y0 >> shift; i <= (y1 - 1) >> shift; ++i)
      for (int64_t j = x0 >> shift; j <= (x1 - 1) >> shift; ++j)
        if (cells[i * cols + j] != 0) return true;
    return false;
  }

  // A stamped leaf: integer centre, the offsets with dy² + dx² <= r², i.e. <= floor(r²).
  void paint_stamp(int64_t cy, int64_t cx, double r, int32_t label) {
    const auto reach = static_cast<int64_t>(std::floor(r * r));
    const int64_t half_height = isqrt(reach);
    const int64_t top = std::max<int64_t>(0, cy - half_height);
    const int64_t bottom = std::min<int64_t>(height_ - 1, cy + half_height);
    for (int64_t y = top; y <= bottom; ++y) {
      const int64_t dy = y - cy;
      const int64_t half_width = isqrt(reach - dy * dy);
      const int64_t a = std::max<int64_t>(0, cx - half_width);
      const int64_t b = std::min<int64_t>(width_ - 1, cx + half_width);
      if (a <= b) paint_span(y, a, b, label);
    }
  }

  // A large leaf: the pixels of its box with (y - cy)² + (x - cx)² <= r * r in double. Per row the test holds on an
  // interval of x (it is monotone in |x - cx|), whose ends the square root finds to within a pixel and the exact
  // test then fixes.
  void paint_disc(double cy, double cx, double r, int64_t y0, int64_t y1, int64_t x0, int64_t x1, int32_t label) {
    const double r2 = r * r;
    for (int64_t y = y0; y < y1; ++y) {
      const double dy = static_cast<double>(y) - cy;
      const double dy2 = dy * dy;
      if (dy2 > r2) continue;  // dy² + dx² >= dy² for every x
      const auto inside = [&](int64_t x) {
        const double dx = static_cast<double>(x) - cx;
        const double dx2 = dx * dx;
        return dy2 + dx2 <= r2;
      };
      const double half = std::sqrt(r2 - dy2);
      auto a = static_cast<int64_t>(std::ceil(cx - half));
      auto b = static_cast<int64_t>(std::floor(cx + half));
      while (inside(a - 1)) --a;
      while (a <= b && !inside(a)) ++a;
      while (inside(b + 1)) ++b;
      while (b >= a && !inside(b)) --b;
      a = std::max(a, x0);
      b = std::min(b, x1 - 1);
      if (a <= b) paint_span(y, a, b, label);
    }
  }

  // Label the bare pixels of row y, columns a..b, skipping (super) tiles without bare pixels.
  void paint_span(int64_t y, int64_t a, int64_t b, int32_t label) {
    int32_t* row = labels_.data() + y * width_;
    int32_t* tiles = tiles_.data() + (y >> kTileShift) * tiles_x_;
    int32_t* supers = supers_.data() + (y >> kSuperShift) * supers_x_;
    for (int64_t x = a; x <= b;) {
      const int64_t s = x >> kSuperShift;
      const int64_t super_end = std::min(b, (s << kSuperShift) + kSuperMask);
      if (supers[s] == 0) {
        x = super_end + 1;
        continue;
      }
      while (x <= super_end) {
        const int64_t t = x >> kTileShift;
        const int64_t tile_end = std::min(super_end, (t << kTileShift) + kTileMask);
        if (tiles[t] != 0) {
          int32_t written = 0;
          for (int64_t i = x; i <= tile_end; ++i) {
            const int32_t old = row[i];
            const bool bare = old < 0;
            row[i] = bare ? label : old;
            written += bare;
          }
          tiles[t] -= written;
          supers[s] -= written;
          bare_ -= written;
          if (written) shown_[label] = 1;
        }
        x = tile_end + 1;
      }
    }
  }

  int64_t height_, width_, tiles_x_, supers_x_;
  int64_t bare_;
  int64_t end_ = 0;  // one past the largest leaf index painted
  std::vector<int32_t> labels_, tiles_, supers_;
  std::vector<uint8_t> shown_;  // per leaf index: whether it shows on a pixel
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled front-to-back dead-leaves painter of erf_tools.synthetic_images";
  py::class_<Canvas>(m, "Canvas")
      .def(py::init<int64_t, int64_t>(), py::arg("height"), py::arg("width"))
      .def_property_readonly("bare", &Canvas::bare)
      .def("paint", &Canvas::paint, py::arg("centre_y"), py::arg("centre_x"), py::arg("radius"), py::arg("first"),
           py::arg("stamp_radius"))
      .def("labels", &Canvas::labels)
      .def("visible", &Canvas::visible)
      .def("render", &Canvas::render, py::arg("offset"), py::arg("gain_y"), py::arg("gain_x"), py::arg("colours"));
}
