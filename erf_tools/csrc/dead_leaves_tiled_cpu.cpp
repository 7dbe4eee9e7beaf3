// The tiled dead-leaves sampler of erf_tools.synthetic_images (model version 2): draws, paints and colours in one
// compiled pass, to bring an image near the cost of decoding a JPEG of its size.
//
// The picture (the law, what any implementation must give):
//
// * leaves form a Poisson process in (centre, radius, time): radius density ∝ r^-exponent on [r_min, r_max], rate
//   such that each point of the plane is covered once per unit of time, times uniform on [0, T] with
//   T = -ln(max_uncovered), so that a fraction max_uncovered of the pixels is expected bare at the end;
// * only leaves that can reach the image are drawn: radii are split into octaves [r_min·2^k, r_min·2^(k+1)), and
//   the centres of octave k fall on the image grown by the octave's largest radius;
// * given their number (one Poisson draw), the leaves are i.i.d., so their index order is a uniformly random order,
//   the same law as their time order: leaf 0 is in front, each later one behind all before it;
// * pixel (y, x) (centre at integer coordinates) shows the first leaf for which, in float32 arithmetic without fused
//   multiply-adds, dy = y - cy, h2 = r·r - dy·dy >= 0 and ceil(cx - sqrt(h2)) <= x <= floor(cx + sqrt(h2)), with y
//   between ceil(cy - r) and floor(cy + r); pixels that no leaf covers show a flat background leaf;
// * colours: a Gaussian in RGB (mean, and a 3×3 square root of the covariance from Python) clipped to [0, 1], times
//   a linear luminance gradient in a uniform direction with relative amplitude uniform in [0, shading] at the rim;
//   value = clip(trunc(255·colour·gain + 0.5), 0, 255).
//
// The random numbers are counter based (a 64-bit finaliser of a key and a counter), so image (seed, index) is the
// same whatever else is generated, and a leaf's colour is computed only if it shows. The painting is per 64×64 tile:
// leaves are binned by the tiles their box meets, and each tile keeps one bit per pixel (covered or bare), so a
// hidden leaf costs a few bit operations per row and each pixel is written once. Single-threaded; the GIL is
// released, so loader threads run in parallel (the vector_paths switch is global: for tests, not for threads).
// Portability: all pixel arithmetic is IEEE float32/float64 (sqrt, ceil, floor, + - × /), the same on any machine;
// the Poisson count's acceptance test and the normal quantile's tails call the maths library's log, whose last bit
// may differ between libraries (a different count or a colour off by one level, rarely).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__BMI2__)
#include <immintrin.h>
#define ERF_TILED_AVX512 1
#endif

namespace dead_leaves_tiled {

// Whether the AVX-512 paths run (when compiled in); the scalar ones give the same pixels, bit for bit (tests).
inline bool vector_paths = true;

constexpr int kTileShift = 6;
constexpr int kTile = 1 << kTileShift;

// Salts of the random streams: the number of leaves, their geometry, their colours, the background's colour.
constexpr uint64_t kCountStream = 0x636F756E74ULL, kGeometryStream = 0x67656F6DULL, kColourStream = 0x636F6C72ULL,
                   kBackgroundStream = 0x6261636BULL, kDirectionSalt = 0x646972ULL;

// The 64-bit finaliser of MurmurHash3 (a bijection with full avalanche).
inline uint64_t mix64(uint64_t z) {
  z ^= z >> 33;
  z *= 0xFF51AFD7ED558CCDULL;
  z ^= z >> 33;
  z *= 0xC4CEB9FE1A85EC53ULL;
  z ^= z >> 33;
  return z;
}

// The key of one stream of image (seed, index).
inline uint64_t stream_key(uint64_t seed, uint64_t index, uint64_t stream) {
  return mix64(mix64(mix64(seed ^ 0x5D1EAFULL) ^ index) ^ stream);
}

// The counter-th 64 random bits of a stream.
inline uint64_t draw(uint64_t key, uint64_t counter) { return mix64(key + counter * 0x9E3779B97F4A7C15ULL); }

// Uniforms in [0, 1): the high 32 bits and the low 32 bits of a draw (float32 needs only 24 of them).
inline float upper_unit(uint64_t bits) { return static_cast<float>(bits >> 40) * 0x1p-24f; }
inline float lower_unit(uint64_t bits) { return static_cast<float>((bits >> 8) & 0xFFFFFFu) * 0x1p-24f; }
inline double unit53(uint64_t bits) { return static_cast<double>(bits >> 11) * 0x1p-53; }

// A Poisson draw of mean mu from the stream's counters 0, 1, ...: inversion below 10, else Hörmann's transformed
// rejection (PTRS, 1993), as NumPy does.
inline int64_t poisson(uint64_t key, double mu) {
  uint64_t counter = 0;
  if (mu <= 0) return 0;
  if (mu < 10) {
    const double limit = std::exp(-mu);
    double product = unit53(draw(key, counter++));
    int64_t k = 0;
    while (product > limit) {
      product *= unit53(draw(key, counter++));
      ++k;
    }
    return k;
  }
  const double smu = std::sqrt(mu), b = 0.931 + 2.53 * smu, a = -0.059 + 0.02483 * b;
  const double inv_alpha = 1.1239 + 1.1328 / (b - 3.4), vr = 0.9277 - 3.6224 / (b - 2), log_mu = std::log(mu);
  for (;;) {
    const double u = unit53(draw(key, counter++)) - 0.5, v = unit53(draw(key, counter++));
    const double us = 0.5 - std::fabs(u);
    const auto k = static_cast<int64_t>(std::floor((2 * a / us + b) * u + mu + 0.43));
    if (us >= 0.07 && v <= vr) return k;
    if (k < 0 || (us < 0.013 && v > us)) continue;
    if (std::log(v) + std::log(inv_alpha) - std::log(a / (us * us) + b) <=
        -mu + static_cast<double>(k) * log_mu - std::lgamma(static_cast<double>(k) + 1))
      return k;
  }
}

// The standard normal quantile (Acklam's rational approximation, relative error < 1.2e-9), for Gaussian colours
// from one uniform each.
inline double normal_quantile(double p) {
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                             1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                             6.680131188771972e+01,  -1.328068155288572e+01};
  static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                             -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                             3.754408661907416e+00};
  if (p < 0.02425) {
    const double q = std::sqrt(-2 * std::log(p));
    return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
           ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  if (p > 1 - 0.02425) return -normal_quantile(1 - p);
  const double q = p - 0.5, r = q * q;
  return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
         (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

struct Model {
  double exponent, r_min, r_max, shading, max_uncovered;
  double colour_mean[3];
  double colour_root[9];  // row-major: deviation = root · (z0, z1, z2)
};

// One leaf's geometry (pixels); slot: its row in the table of visible leaves, -1 until it shows.
struct Leaf {
  float cy, cx, r;
  int32_t slot;
};

// A visible leaf's colouring: gain = base + gain_y·y + gain_x·x, value = trunc(colour·gain + 0.5) clipped.
struct Paint {
  float base, gain_y, gain_x, red, green, blue;
};

struct Octave {
  double low, high, share;  // radii [low, high), probability of a leaf
};

// Octaves of the radius law and their shares of the leaves that can reach an H×W image.
inline std::vector<Octave> octaves(const Model& m, int64_t height, int64_t width, double* leaves_per_unit_time) {
  std::vector<Octave> out;
  const double power = 1.0 - m.exponent;
  auto integral = [&](double lo, double hi, double extra) {  // ∫ r^(extra - exponent) dr
    const double p = extra + power;
    return std::fabs(p) < 1e-12 ? std::log(hi / lo) : (std::pow(hi, p) - std::pow(lo, p)) / p;
  };
  const double r_max = std::max(m.r_min, m.r_max);
  if (r_max <= m.r_min) {
    const double area = (height + 2 * m.r_min) * (width + 2 * m.r_min);
    out.push_back({m.r_min, m.r_min, 1.0});
    *leaves_per_unit_time = area / (M_PI * m.r_min * m.r_min);
    return out;
  }
  const double mean_area = M_PI * integral(m.r_min, r_max, 2.0) / integral(m.r_min, r_max, 0.0);
  const double density = 1.0 / mean_area / integral(m.r_min, r_max, 0.0);  // leaves per px² per unit r-density
  double total = 0;
  for (double lo = m.r_min; lo < r_max; lo *= 2) {
    const double hi = std::min(2 * lo, r_max);
    const double count = density * integral(lo, hi, 0.0) * (height + 2 * hi) * (width + 2 * hi);
    out.push_back({lo, hi, count});
    total += count;
  }
  for (auto& o : out) o.share /= total;
  *leaves_per_unit_time = total;
  return out;
}

struct Stats {
  int64_t leaves = 0, visible = 0, bare = 0;
};

// The tiles a leaf's box meets (tile_y1 < tile_y0: none).
struct Box {
  int32_t tile_y0, tile_y1, tile_x0, tile_x1;
};

// Scratch buffers kept per thread, so that a generation does not fault in fresh pages.
struct Scratch {
  std::vector<Leaf> leaves;      // in front-to-back order (slot unused)
  std::vector<Box> boxes;
  std::vector<uint32_t> counts;  // bins of tile t: bins[counts[t]] .. bins[counts[t + 1] - 1]
  std::vector<uint32_t> fill;
  std::vector<Leaf> bins;        // copies of the leaves, tile after tile (slot: the leaf's index), read in sequence
  std::vector<int32_t> slots;    // per leaf: its row in `paints`, -1 until it shows
  std::vector<Paint> paints;     // the visible leaves' colourings
  std::vector<int32_t> tile_paint;  // per bin entry of the current tile: its row in `paints`, -1 if not yet known
};

inline Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

// The leaves of image (seed, index), front to back.
inline void draw_leaves(const Model& m, int64_t height, int64_t width, uint64_t seed, uint64_t index,
                        std::vector<Leaf>& leaves) {
  double per_unit_time = 0;
  const auto bands = octaves(m, height, width, &per_unit_time);
  const double horizon = -std::log(m.max_uncovered);
  const int64_t count = poisson(stream_key(seed, index, kCountStream), per_unit_time * horizon);
  // Per octave: the upper bound of the class-picking uniform, the margin, and the radius law's inverse CDF as
  // r = (base + u·scale)^(1/power) (for exponent 3: 1/sqrt(base + u·scale), in float32).
  constexpr int kMaxBands = 64;
  const int n_bands = static_cast<int>(bands.size());
  if (n_bands > kMaxBands) throw std::invalid_argument("too many radius octaves (r_max / r_min > 2^64)");
  float threshold[kMaxBands], margin[kMaxBands], base[kMaxBands], scale[kMaxBands];
  double acc = 0;
  const double power = 1.0 - m.exponent;
  for (int k = 0; k < n_bands; ++k) {
    const Octave& o = bands[static_cast<size_t>(k)];
    acc += o.share;
    threshold[k] = k + 1 == n_bands ? 2.0f : static_cast<float>(acc);
    margin[k] = static_cast<float>(o.high);
    base[k] = static_cast<float>(std::pow(o.low, power));
    scale[k] = static_cast<float>(std::pow(o.high, power) - std::pow(o.low, power));
  }
  const bool cubic = m.exponent == 3.0;
  const auto inverse_power = static_cast<float>(1.0 / power);
  leaves.resize(static_cast<size_t>(count));
  const uint64_t key = stream_key(seed, index, kGeometryStream);
  const auto h = static_cast<float>(height), w = static_cast<float>(width);
  for (int64_t i = 0; i < count; ++i) {
    const auto counter = 2 * static_cast<uint64_t>(i);
    const uint64_t first = draw(key, counter), second = draw(key, counter + 1);
    // The octave from the high 32 bits, the radius from bits 8..31, the centre from the second draw's two halves.
    const float pick = static_cast<float>(first >> 40) * 0x1p-24f;
    int k = 0;
    for (int b = 0; b + 1 < n_bands; ++b) k += pick >= threshold[b];
    const float t = base[k] + lower_unit(first) * scale[k];
    const float r =
        n_bands == 1 && scale[0] == 0 ? margin[0] : (cubic ? 1.0f / std::sqrt(t) : std::pow(t, inverse_power));
    const float cy = upper_unit(second) * (h + 2 * margin[k]) - margin[k];
    const float cx = lower_unit(second) * (w + 2 * margin[k]) - margin[k];
    leaves[static_cast<size_t>(i)] = {cy, cx, r, -1};
  }
}

// A leaf's rows or columns [first, last] on an axis of `size` pixels (empty when first > last).
inline void extent(float centre, float r, int64_t size, int64_t* first, int64_t* last) {
  const float lo = std::ceil(centre - r), hi = std::floor(centre + r);
  *first = lo < 0 ? 0 : (lo > static_cast<float>(size) ? size : static_cast<int64_t>(lo));
  *last = hi >= static_cast<float>(size) ? size - 1 : (hi < -1 ? -1 : static_cast<int64_t>(hi));
}

// The colouring of leaf i (drawn only when it shows).
inline Paint leaf_paint(const Model& m, uint64_t key, uint64_t i, const Leaf& leaf, bool flat) {
  const uint64_t a = draw(key, 2 * i), b = draw(key, 2 * i + 1);
  // Uniforms in (0, 1) for the quantile: 32-bit halves, offset by half a step.
  auto open_unit = [](uint64_t bits) { return (static_cast<double>(bits & 0xFFFFFFFFu) + 0.5) * 0x1p-32; };
  const double z[3] = {normal_quantile(open_unit(a)), normal_quantile(open_unit(a >> 32)),
                       normal_quantile(open_unit(b))};
  float rgb[3];
  for (int ch = 0; ch < 3; ++ch) {
    double v = m.colour_mean[ch];
    for (int j = 0; j < 3; ++j) v += m.colour_root[3 * ch + j] * z[j];
    v = v < 0 ? 0 : (v > 1 ? 1 : v);
    rgb[ch] = static_cast<float>(v * 255.0);
  }
  Paint p{1.0f, 0.0f, 0.0f, rgb[0], rgb[1], rgb[2]};
  if (!flat) {
    // A uniform direction without trigonometry (whose last bits differ between maths libraries): a uniform point
    // of the unit disc, by rejection from the square, normalised.
    float u = 0, v = 0, radius2 = 0;
    for (uint64_t attempt = 0;; ++attempt) {
      const uint64_t bits = draw(key ^ kDirectionSalt, (i << 6) + (attempt & 63));
      u = 2 * upper_unit(bits) - 1;
      v = 2 * lower_unit(bits) - 1;
      radius2 = u * u + v * v;
      if (radius2 <= 1 && radius2 > 1e-12f) break;
    }
    const float amplitude = static_cast<float>(open_unit(b >> 32) * m.shading / leaf.r) / std::sqrt(radius2);
    p.gain_y = u * amplitude;
    p.gain_x = v * amplitude;
    p.base = 1.0f - p.gain_y * leaf.cy - p.gain_x * leaf.cx;
  }
  return p;
}

inline uint8_t to_byte(float v) {
  const auto i = static_cast<int32_t>(v);
  return static_cast<uint8_t>(i < 0 ? 0 : (i > 255 ? 255 : i));
}

// One pixel of paint p at (y, x): gain = (base + gain_y·y) + gain_x·x, value = trunc(colour·gain + 0.5) clipped.
inline void colour_pixel(uint8_t* px, float row_gain, float x, const Paint& p) {
  const float gain = row_gain + p.gain_x * x;
  px[0] = to_byte(p.red * gain + 0.5f);
  px[1] = to_byte(p.green * gain + 0.5f);
  px[2] = to_byte(p.blue * gain + 0.5f);
}

#ifdef ERF_TILED_AVX512
// The pixels of mask m of the 16 starting at column x0 of row y (out: pixel (y, x0)): colour_pixel, 16 lanes.
inline void colour16(uint8_t* out, uint32_t m, float row_gain, int64_t x0, const Paint& p) {
  const __m512 lane = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Byte j of the 48-byte output takes channel j % 3 of pixel j / 3 from [R0..R15 G0..G15 B0..B15].
  alignas(64) static const uint8_t order[64] = {
      0, 16, 32, 1, 17, 33, 2, 18, 34, 3, 19, 35, 4, 20, 36, 5, 21, 37, 6, 22, 38, 7, 23, 39,
      8, 24, 40, 9, 25, 41, 10, 26, 42, 11, 27, 43, 12, 28, 44, 13, 29, 45, 14, 30, 46, 15, 31, 47};
  const __m512 xs = _mm512_add_ps(_mm512_set1_ps(static_cast<float>(x0)), lane);
  const __m512 gain = _mm512_add_ps(_mm512_set1_ps(row_gain), _mm512_mul_ps(_mm512_set1_ps(p.gain_x), xs));
  const __m512 half = _mm512_set1_ps(0.5f);
  auto channel = [&](float colour) {
    const __m512i v = _mm512_cvttps_epi32(_mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(colour), gain), half));
    return _mm512_cvtusepi32_epi8(_mm512_max_epi32(v, _mm512_setzero_si512()));
  };
  const __m512i planes = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_inserti128_si256(_mm256_castsi128_si256(channel(p.red)), channel(p.green), 1)),
      _mm256_castsi128_si256(channel(p.blue)), 1);
  const __m512i interleaved = _mm512_permutexvar_epi8(_mm512_load_si512(order), planes);
  const uint64_t m48 = _pdep_u64(m, 0x249249249249ULL) * 7u;  // each pixel's bit → its 3 bytes
  _mm512_mask_storeu_epi8(out, m48, interleaved);
}
#endif

// Bits first..last (inclusive, 0 <= first <= last < 64).
inline uint64_t span_bits(int64_t first, int64_t last) {
  const uint64_t upto = last >= 63 ? ~0ULL : ((1ULL << (last + 1)) - 1);
  return upto & ~((1ULL << first) - 1);
}


constexpr uint16_t kBareLabel = 0xFFFF;
constexpr int kPadRows = 8;  // the 8-row steps may read and write up to 7 rows past the tile

// One tile being painted: a bit per pixel (covered or bare) and, per pixel, the position in the tile's bin of the
// leaf that shows there.
struct TileCanvas {
  alignas(64) uint64_t covered[kTile + kPadRows];
  uint16_t guard[32];  // row_labels - 1 is read (the first run starts at 0 whatever it holds)
  alignas(64) uint16_t label[(kTile + kPadRows) * kTile];
};

// Marks the pixels of `leaf` in rows j0..j1 of the tile (top-left pixel (top, left), `cols` wide) that are still bare,
// with `label`.
inline void paint_leaf(const Leaf& leaf, uint16_t label, int64_t j0, int64_t j1, int64_t top, int64_t left,
                       int64_t cols, TileCanvas& tile) {
#ifdef ERF_TILED_AVX512
  if (vector_paths) {
  // 8 rows at a time, lane by lane the scalar loop's float32 operations.
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 cy = _mm256_set1_ps(leaf.cy), cx = _mm256_set1_ps(leaf.cx), r2 = _mm256_set1_ps(leaf.r * leaf.r);
  const __m256 leftmost = _mm256_set1_ps(static_cast<float>(left)),
               rightmost = _mm256_set1_ps(static_cast<float>(left + cols - 1));
  const __m512i one = _mm512_set1_epi64(1);
  const __m512i labels = _mm512_set1_epi16(static_cast<int16_t>(label));
  for (int64_t j = j0; j <= j1; j += 8) {
    const __m256 y = _mm256_add_ps(_mm256_set1_ps(static_cast<float>(top + j)), lane);
    const __m256 dy = _mm256_sub_ps(y, cy);
    const __m256 h2 = _mm256_sub_ps(r2, _mm256_mul_ps(dy, dy));
    const __m256 h = _mm256_sqrt_ps(_mm256_max_ps(h2, _mm256_setzero_ps()));
    const __m256 lo = _mm256_round_ps(_mm256_sub_ps(cx, h), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
    const __m256 hi = _mm256_round_ps(_mm256_add_ps(cx, h), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m256 first = _mm256_max_ps(lo, leftmost), last = _mm256_min_ps(hi, rightmost);
    __mmask8 valid = _mm256_cmp_ps_mask(h2, _mm256_setzero_ps(), _CMP_GE_OQ) &
                     _mm256_cmp_ps_mask(first, last, _CMP_LE_OQ);
    if (j1 - j < 7) valid &= static_cast<__mmask8>((1u << (j1 - j + 1)) - 1);
    const __m512i f = _mm512_cvtepi32_epi64(_mm256_cvttps_epi32(_mm256_sub_ps(first, leftmost)));
    const __m512i l = _mm512_cvtepi32_epi64(_mm256_cvttps_epi32(_mm256_sub_ps(last, leftmost)));
    // bits f..l: (1 << (l + 1)) - 1 (a shift by 64 gives 0, so l = 63 gives all ones) without (1 << f) - 1
    const __m512i upto = _mm512_sub_epi64(_mm512_sllv_epi64(one, _mm512_add_epi64(l, one)), one);
    const __m512i below = _mm512_sub_epi64(_mm512_sllv_epi64(one, f), one);
    const __m512i span = _mm512_maskz_andnot_epi64(valid, below, upto);
    const __m512i before = _mm512_loadu_si512(tile.covered + j);
    const __m512i fresh = _mm512_andnot_si512(before, span);
    _mm512_storeu_si512(tile.covered + j, _mm512_or_si512(before, fresh));
    alignas(64) uint64_t rows[8];
    _mm512_store_si512(rows, fresh);
    uint16_t* row = tile.label + j * kTile;
    for (int k = 0; k < 8; ++k, row += kTile) {  // unconditional: an empty mask stores nothing
      _mm512_mask_storeu_epi16(row, static_cast<__mmask32>(rows[k]), labels);
      _mm512_mask_storeu_epi16(row + 32, static_cast<__mmask32>(rows[k] >> 32), labels);
    }
  }
  return;
  }
#endif
  const float r2 = leaf.r * leaf.r;
  for (int64_t j = j0; j <= j1; ++j) {
    const float dy = static_cast<float>(top + j) - leaf.cy;
    const float h2 = r2 - dy * dy;
    if (h2 < 0) continue;
    const float h = std::sqrt(h2);
    const float lo = std::ceil(leaf.cx - h), hi = std::floor(leaf.cx + h);
    const float first = std::max(lo, static_cast<float>(left));
    const float last = std::min(hi, static_cast<float>(left + cols - 1));
    if (!(first <= last)) continue;
    const uint64_t fresh =
        span_bits(static_cast<int64_t>(first - static_cast<float>(left)),
                  static_cast<int64_t>(last - static_cast<float>(left))) & ~tile.covered[j];
    tile.covered[j] |= fresh;
    for (uint64_t bits = fresh; bits; bits &= bits - 1) tile.label[j * kTile + __builtin_ctzll(bits)] = label;
  }
}

// Bins the leaves by the tiles their box meets, in leaf order (so each tile's list is front to back).
inline void bin_leaves(Scratch& s, int64_t height, int64_t width, int64_t tiles_x, size_t n_tiles) {
  s.counts.assign(n_tiles + 1, 0);
  s.boxes.resize(s.leaves.size());
  for (size_t i = 0; i < s.leaves.size(); ++i) {
    const Leaf& leaf = s.leaves[i];
    int64_t y0, y1, x0, x1;
    extent(leaf.cy, leaf.r, height, &y0, &y1);
    extent(leaf.cx, leaf.r, width, &x0, &x1);
    Box& box = s.boxes[i];
    box = {static_cast<int32_t>(y0 >> kTileShift), static_cast<int32_t>(y1 >> kTileShift),
           static_cast<int32_t>(x0 >> kTileShift), static_cast<int32_t>(x1 >> kTileShift)};
    if (y0 > y1 || x0 > x1) {
      box.tile_y1 = -1;  // off the image
      continue;
    }
    for (int32_t ty = box.tile_y0; ty <= box.tile_y1; ++ty)
      for (int32_t tx = box.tile_x0; tx <= box.tile_x1; ++tx) ++s.counts[ty * tiles_x + tx + 1];
  }
  for (size_t t = 0; t < n_tiles; ++t) s.counts[t + 1] += s.counts[t];
  s.bins.resize(s.counts[n_tiles]);
  s.fill.assign(s.counts.begin(), s.counts.end() - 1);
  for (size_t i = 0; i < s.leaves.size(); ++i) {
    const Box& box = s.boxes[i];
    for (int32_t ty = box.tile_y0; ty <= box.tile_y1; ++ty)
      for (int32_t tx = box.tile_x0; tx <= box.tile_x1; ++tx) {
        Leaf& copy = s.bins[s.fill[ty * tiles_x + tx]++];
        copy = s.leaves[i];
        copy.slot = static_cast<int32_t>(i);
      }
  }
}

// Paint image (seed, index) into `out` (H×W×3 uint8, row-major); `labels` (H×W int32, may be null) receives each
// pixel's leaf index, -1 for the background.
inline Stats generate(const Model& m, int64_t height, int64_t width, uint64_t seed, uint64_t index, uint8_t* out,
                      int32_t* labels) {
  if (height < 1 || width < 1) throw std::invalid_argument("image size must be positive");
  Scratch& s = scratch();
  draw_leaves(m, height, width, seed, index, s.leaves);
  const int64_t tiles_y = (height + kTile - 1) >> kTileShift, tiles_x = (width + kTile - 1) >> kTileShift;
  const auto n_tiles = static_cast<size_t>(tiles_y * tiles_x);
  bin_leaves(s, height, width, tiles_x, n_tiles);
  const uint64_t colour_key = stream_key(seed, index, kColourStream);
  s.paints.clear();
  s.slots.assign(s.leaves.size(), -1);
  const Leaf background_leaf{0, 0, 1, -1};
  const Paint background = leaf_paint(m, stream_key(seed, index, kBackgroundStream), 0, background_leaf, true);
  Stats stats;
  stats.leaves = static_cast<int64_t>(s.leaves.size());
  const int64_t stride = 3 * width;
  static thread_local TileCanvas tile;
  for (int64_t ty = 0; ty < tiles_y; ++ty) {
    const int64_t top = ty << kTileShift, rows = std::min<int64_t>(kTile, height - top);
    for (int64_t tx = 0; tx < tiles_x; ++tx) {
      const int64_t left = tx << kTileShift, cols = std::min<int64_t>(kTile, width - left);
      const uint64_t inside = cols == 64 ? ~0ULL : ((1ULL << cols) - 1);
      std::fill(tile.covered, tile.covered + kTile + kPadRows, ~0ULL);
      std::fill(tile.covered, tile.covered + rows, ~inside);
      std::fill(tile.label, tile.label + rows * kTile, kBareLabel);
      const size_t start = s.counts[static_cast<size_t>(ty * tiles_x + tx)];
      const size_t stop = s.counts[static_cast<size_t>(ty * tiles_x + tx) + 1];
      if (stop - start >= kBareLabel)
        throw std::length_error("more than 65534 leaves reach one 64x64 tile: r_min is too small for this sampler");
      for (size_t b = start; b < stop; ++b) {
        // Every 32 leaves: stop if the tile is covered (the rest are hidden).
        if (((b - start) & 31) == 31) {
          uint64_t all = ~0ULL;
          for (int64_t j = 0; j < rows; ++j) all &= tile.covered[j];
          if (all == ~0ULL) break;
        }
        const Leaf& leaf = s.bins[b];
        int64_t y0, y1;
        extent(leaf.cy, leaf.r, height, &y0, &y1);
        y0 = std::max(y0, top);
        y1 = std::min(y1, top + rows - 1);
        if (y0 <= y1) paint_leaf(leaf, static_cast<uint16_t>(b - start), y0 - top, y1 - top, top, left, cols, tile);
      }
      // Colour the tile from its labels; a leaf's colouring is drawn when it first shows, in any tile.
      s.tile_paint.assign(stop - start, -1);
      auto paint_of = [&](uint16_t label) -> const Paint& {
        if (label == kBareLabel) return background;
        int32_t& local = s.tile_paint[label];
        if (local < 0) {
          const Leaf& leaf = s.bins[start + label];
          int32_t& slot = s.slots[static_cast<size_t>(leaf.slot)];
          if (slot < 0) {
            slot = static_cast<int32_t>(s.paints.size());
            s.paints.push_back(leaf_paint(m, colour_key, static_cast<uint64_t>(leaf.slot), leaf, false));
          }
          local = slot;
        }
        return s.paints[static_cast<size_t>(local)];
      };
      for (int64_t j = 0; j < rows; ++j) {
        stats.bare += __builtin_popcountll(~tile.covered[j]);
        const int64_t y = top + j;
        const uint16_t* row_labels = tile.label + j * kTile;
        uint8_t* row_out = out + y * stride + 3 * left;
#ifdef ERF_TILED_AVX512
        if (vector_paths) {
        // Runs of equal labels: a run starts where the label differs from its left neighbour.
        const __m512i lo = _mm512_loadu_si512(row_labels), hi = _mm512_loadu_si512(row_labels + 32);
        const __m512i lo_left = _mm512_loadu_si512(row_labels - 1), hi_left = _mm512_loadu_si512(row_labels + 31);
        uint64_t starts = static_cast<uint64_t>(_mm512_cmpneq_epi16_mask(lo, lo_left)) |
                          (static_cast<uint64_t>(_mm512_cmpneq_epi16_mask(hi, hi_left)) << 32) | 1u;
        const uint64_t inside_row = inside;
        starts &= inside_row;
        const float row_y = static_cast<float>(y);
        while (starts) {
          const int first = __builtin_ctzll(starts);
          starts &= starts - 1;
          const int end = starts ? __builtin_ctzll(starts) : static_cast<int>(cols);
          const Paint& p = paint_of(row_labels[first]);
          const float row_gain = p.base + p.gain_y * row_y;
          const uint64_t run = span_bits(first, end - 1);
          for (int c = first & ~15; c < end; c += 16)
            colour16(row_out + 3 * c, static_cast<uint32_t>((run >> c) & 0xFFFFu), row_gain, left + c, p);
        }
        } else
#endif
        for (int64_t c = 0; c < cols; ++c) {
          const Paint& p = paint_of(row_labels[c]);
          colour_pixel(row_out + 3 * c, p.base + p.gain_y * static_cast<float>(y), static_cast<float>(left + c), p);
        }
        if (labels) {
          for (int64_t c = 0; c < cols; ++c) {
            const uint16_t label = row_labels[c];
            labels[y * width + left + c] = label == kBareLabel ? -1 : s.bins[start + label].slot;
          }
        }
      }
    }
  }
  stats.visible = static_cast<int64_t>(s.paints.size());
  return stats;
}

}  // namespace dead_leaves_tiled

#ifdef TORCH_EXTENSION_NAME
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace {

dead_leaves_tiled::Model model_from(double exponent, double r_min, double r_max, double shading, double max_uncovered,
                                    py::array_t<double, py::array::c_style | py::array::forcecast> colour_mean,
                                    py::array_t<double, py::array::c_style | py::array::forcecast> colour_root) {
  if (colour_mean.size() != 3 || colour_root.size() != 9)
    throw std::invalid_argument("colour_mean needs 3 values and colour_root 3x3");
  dead_leaves_tiled::Model m{exponent, r_min, r_max, shading, max_uncovered, {}, {}};
  for (int k = 0; k < 3; ++k) m.colour_mean[k] = colour_mean.data()[k];
  for (int k = 0; k < 9; ++k) m.colour_root[k] = colour_root.data()[k];
  return m;
}

py::tuple generate_image(int64_t height, int64_t width, uint64_t seed, uint64_t index, double exponent, double r_min,
                         double r_max, double shading, double max_uncovered,
                         py::array_t<double, py::array::c_style | py::array::forcecast> colour_mean,
                         py::array_t<double, py::array::c_style | py::array::forcecast> colour_root, bool with_labels) {
  const auto m = model_from(exponent, r_min, r_max, shading, max_uncovered, colour_mean, colour_root);
  if (height < 1 || width < 1) throw std::invalid_argument("image size must be positive");
  py::array_t<uint8_t> image({height, width, int64_t{3}});
  py::array_t<int32_t> labels(with_labels ? std::vector<int64_t>{height, width} : std::vector<int64_t>{0, 0});
  dead_leaves_tiled::Stats stats;
  {
    py::gil_scoped_release release;
    stats = dead_leaves_tiled::generate(m, height, width, seed, index, image.mutable_data(),
                                        with_labels ? labels.mutable_data() : nullptr);
  }
  return py::make_tuple(image, labels, stats.leaves, stats.visible, stats.bare);
}

py::tuple leaf_geometry(int64_t height, int64_t width, uint64_t seed, uint64_t index, double exponent, double r_min,
                        double r_max, double max_uncovered) {
  const dead_leaves_tiled::Model m{exponent, r_min, r_max, 0.0, max_uncovered, {0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0, 0}};
  std::vector<dead_leaves_tiled::Leaf> leaves;
  dead_leaves_tiled::draw_leaves(m, height, width, seed, index, leaves);
  const auto n = static_cast<int64_t>(leaves.size());
  py::array_t<float> cy(n), cx(n), r(n);
  for (int64_t i = 0; i < n; ++i) {
    cy.mutable_data()[i] = leaves[static_cast<size_t>(i)].cy;
    cx.mutable_data()[i] = leaves[static_cast<size_t>(i)].cx;
    r.mutable_data()[i] = leaves[static_cast<size_t>(i)].r;
  }
  return py::make_tuple(cy, cx, r);
}

py::array_t<float> leaf_paints(py::array_t<int64_t, py::array::c_style | py::array::forcecast> which,
                               py::array_t<float, py::array::c_style | py::array::forcecast> cy,
                               py::array_t<float, py::array::c_style | py::array::forcecast> cx,
                               py::array_t<float, py::array::c_style | py::array::forcecast> r, uint64_t seed,
                               uint64_t index, double shading,
                               py::array_t<double, py::array::c_style | py::array::forcecast> colour_mean,
                               py::array_t<double, py::array::c_style | py::array::forcecast> colour_root) {
  const auto m = model_from(3.0, 1.0, 1.0, shading, 0.5, colour_mean, colour_root);
  const uint64_t key = dead_leaves_tiled::stream_key(seed, index, dead_leaves_tiled::kColourStream);
  const auto n = which.size();
  py::array_t<float> out({static_cast<int64_t>(n), int64_t{6}});
  for (py::ssize_t k = 0; k < n; ++k) {
    const int64_t i = which.data()[k];
    const dead_leaves_tiled::Leaf leaf{cy.data()[i], cx.data()[i], r.data()[i], -1};
    const auto p = dead_leaves_tiled::leaf_paint(m, key, static_cast<uint64_t>(i), leaf, false);
    const float values[6] = {p.base, p.gain_y, p.gain_x, p.red, p.green, p.blue};
    std::copy(values, values + 6, out.mutable_data() + 6 * k);
  }
  return out;
}

py::array_t<float> background_paint(uint64_t seed, uint64_t index,
                                    py::array_t<double, py::array::c_style | py::array::forcecast> colour_mean,
                                    py::array_t<double, py::array::c_style | py::array::forcecast> colour_root) {
  const auto m = model_from(3.0, 1.0, 1.0, 0.0, 0.5, colour_mean, colour_root);
  const dead_leaves_tiled::Leaf leaf{0, 0, 1, -1};
  const auto p = dead_leaves_tiled::leaf_paint(
      m, dead_leaves_tiled::stream_key(seed, index, dead_leaves_tiled::kBackgroundStream), 0, leaf, true);
  py::array_t<float> out(6);
  const float values[6] = {p.base, p.gain_y, p.gain_x, p.red, p.green, p.blue};
  std::copy(values, values + 6, out.mutable_data());
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The tiled dead-leaves sampler of erf_tools.synthetic_images (counter-based draws, compiled painting)";
  m.def("generate", &generate_image, py::arg("height"), py::arg("width"), py::arg("seed"), py::arg("index"),
        py::arg("exponent"), py::arg("r_min"), py::arg("r_max"), py::arg("shading"), py::arg("max_uncovered"),
        py::arg("colour_mean"), py::arg("colour_root"), py::arg("with_labels") = false);
  m.def("leaves", &leaf_geometry, py::arg("height"), py::arg("width"), py::arg("seed"), py::arg("index"),
        py::arg("exponent"), py::arg("r_min"), py::arg("r_max"), py::arg("max_uncovered"));
  m.def("paints", &leaf_paints, py::arg("which"), py::arg("centre_y"), py::arg("centre_x"), py::arg("radius"),
        py::arg("seed"), py::arg("index"), py::arg("shading"), py::arg("colour_mean"), py::arg("colour_root"));
  m.def("set_vector_paths", [](bool on) {
    const bool before = dead_leaves_tiled::vector_paths;
    dead_leaves_tiled::vector_paths = on;
    return before;
  }, py::arg("on"),
        "Run the AVX-512 paths (if compiled in: vector_paths_compiled) or the scalar ones; returns the previous one");
#ifdef ERF_TILED_AVX512
  m.attr("vector_paths_compiled") = true;
#else
  m.attr("vector_paths_compiled") = false;
#endif
  m.def("background", &background_paint, py::arg("seed"), py::arg("index"), py::arg("colour_mean"),
        py::arg("colour_root"));
}
#endif
