// Fused CPU kernel of UniConvNet's DCNv3 sampling core (forward and backward), built on first use by
// erf_tools/layers/dcnv3_fused.py.
//
// out[n, h, w, g*Cg + c] = sum_p mask[n, h, w, g*P + p] * bilinear(value[n, :, :, g*Cg + c], x_p, y_p)
//   x_p = w*stride - pad + dilation*(K-1)/2 + (dx_p + offset[n, h, w, g*2P + 2p]) * offset_scale
//   y_p = h*stride - pad + dilation*(K-1)/2 + (dy_p + offset[n, h, w, g*2P + 2p + 1]) * offset_scale
// with p = i*K + j, dx_p = (i - (K-1)/2)*dilation, dy_p = (j - (K-1)/2)*dilation; pixel centres at integer
// coordinates, value 0 outside the image (the rule of grid_sample with align_corners=False and zero padding).
//
// All tensors are channels-last and contiguous, so the innermost loop runs over the Cg contiguous channels of a group.
// The forward never materialises the (N, G, Cg, P, H*W) sample tensor. The backward computes the mask and offset
// gradients per output pixel (no conflicts) and scatters the value gradient into per-chunk buffers that cover only
// the input rows the chunk touches; the buffers are summed into the result at the end, in a fixed order, so there
// are no atomics and the result does not depend on thread scheduling.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

struct Geometry {
  int64_t n, h_in, w_in, channels, h_out, w_out, group, group_channels, kernel, points;
  int64_t stride, pad, dilation;
  double offset_scale;
};

Geometry check_inputs(const at::Tensor& value, const at::Tensor& offset, const at::Tensor& mask, int64_t group,
                      int64_t kernel, int64_t stride, int64_t pad, int64_t dilation, double offset_scale) {
  TORCH_CHECK(value.dim() == 4 && offset.dim() == 4 && mask.dim() == 4, "value, offset and mask must be 4-d (NHWC)");
  TORCH_CHECK(value.device().is_cpu() && offset.device().is_cpu() && mask.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(value.scalar_type() == offset.scalar_type() && value.scalar_type() == mask.scalar_type(),
              "value, offset and mask must have one dtype");
  TORCH_CHECK(group > 0 && kernel > 0 && kernel % 2 == 1 && stride > 0 && dilation > 0, "bad DCNv3 geometry");
  Geometry g{};
  g.n = value.size(0);
  g.h_in = value.size(1);
  g.w_in = value.size(2);
  g.channels = value.size(3);
  g.h_out = offset.size(1);
  g.w_out = offset.size(2);
  g.group = group;
  g.kernel = kernel;
  g.points = kernel * kernel;
  g.stride = stride;
  g.pad = pad;
  g.dilation = dilation;
  g.offset_scale = offset_scale;
  TORCH_CHECK(g.channels % group == 0, "channels must be divisible by group");
  g.group_channels = g.channels / group;
  TORCH_CHECK(offset.size(0) == g.n && offset.size(3) == group * g.points * 2, "offset must be (N, H, W, G*P*2)");
  TORCH_CHECK(mask.size(0) == g.n && mask.size(1) == g.h_out && mask.size(2) == g.w_out &&
                  mask.size(3) == group * g.points,
              "mask must be (N, H, W, G*P)");
  return g;
}

// The four bilinear corners of one sample: flat input-pixel index (n*H_in + y)*W_in + x of the top-left corner
// and the weights of (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1); a corner outside the image has weight 0 and
// valid[k] false.
template <typename T>
struct Corners {
  T fx, fy;
  T weight[4];
  bool valid[4];
  int64_t row0;  // n*H_in + y0 (may be outside the image)
  int64_t x0;
  bool any;
};

template <typename T>
inline Corners<T> corners_of(T x, T y, int64_t n, const Geometry& g) {
  Corners<T> k{};
  // NaN or far outside: no corner can be inside (keeps the integer conversion defined).
  if (!(x > T(-2) && x < T(g.w_in + 1) && y > T(-2) && y < T(g.h_in + 1))) {
    k.any = false;
    return k;
  }
  const T xf = std::floor(x), yf = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  k.fx = x - xf;
  k.fy = y - yf;
  const bool vx0 = x0 >= 0 && x0 < g.w_in, vx1 = x0 + 1 >= 0 && x0 + 1 < g.w_in;
  const bool vy0 = y0 >= 0 && y0 < g.h_in, vy1 = y0 + 1 >= 0 && y0 + 1 < g.h_in;
  k.valid[0] = vy0 && vx0;
  k.valid[1] = vy0 && vx1;
  k.valid[2] = vy1 && vx0;
  k.valid[3] = vy1 && vx1;
  const T w[4] = {(1 - k.fy) * (1 - k.fx), (1 - k.fy) * k.fx, k.fy * (1 - k.fx), k.fy * k.fx};
  for (int c = 0; c < 4; ++c) k.weight[c] = k.valid[c] ? w[c] : T(0);
  k.any = k.valid[0] || k.valid[1] || k.valid[2] || k.valid[3];
  k.row0 = n * g.h_in + y0;
  k.x0 = x0;
  return k;
}

// Offsets of the kernel points in pixels before offset_scale, (dx, dy) per point in the official order, computed
// once per call so that the per-sample work has no integer division.
template <typename T>
std::vector<T> kernel_points(const Geometry& g) {
  const int64_t half = (g.kernel - 1) / 2;
  std::vector<T> points(2 * g.points);
  for (int64_t p = 0; p < g.points; ++p) {
    points[2 * p] = T((p / g.kernel - half) * g.dilation);
    points[2 * p + 1] = T((p % g.kernel - half) * g.dilation);
  }
  return points;
}

// Sampling position of point p of the output pixel whose regular-grid centre is (cx, cy); `off` points at the
// pixel's 2P offsets of the group.
template <typename T>
inline void position(const T* kernel, T s, T cx, T cy, int64_t p, const T* off, T& x, T& y) {
  x = cx + (kernel[2 * p] + off[2 * p]) * s;
  y = cy + (kernel[2 * p + 1] + off[2 * p + 1]) * s;
}

// Output pixel pix = (n*H + h)*W + w: its batch index and regular-grid centre.
template <typename T>
inline int64_t centre_of(const Geometry& g, int64_t pix, T& cx, T& cy) {
  const int64_t shift = g.dilation * ((g.kernel - 1) / 2) - g.pad;
  const int64_t row = pix / g.w_out, w = pix - row * g.w_out;
  const int64_t n = row / g.h_out, h = row - n * g.h_out;
  cx = T(w * g.stride + shift);
  cy = T(h * g.stride + shift);
  return n;
}

// Flat input-pixel index of corner c (0..3) of k.
template <typename T>
inline int64_t corner_pixel(const Corners<T>& k, int c, const Geometry& g) {
  return (k.row0 + (c >> 1)) * g.w_in + k.x0 + (c & 1);
}

// CG > 0: the channels per group known at compile time (fully unrolled channel loops), 0: read from g.
template <typename T, int CG>
void forward_kernel(const T* value, const T* offset, const T* mask, T* out, const Geometry& g) {
  const int64_t pixels = g.n * g.h_out * g.w_out, cg = CG > 0 ? CG : g.group_channels, pts = g.points;
  std::vector<T> zeros(cg, T(0));
  const T* zero = zeros.data();
  const std::vector<T> points = kernel_points<T>(g);
  const T* kernel = points.data();
  const T s = T(g.offset_scale);
  at::parallel_for(0, pixels, 64, [&](int64_t begin, int64_t end) {
    for (int64_t pix = begin; pix < end; ++pix) {
      T cx, cy;
      const int64_t n = centre_of(g, pix, cx, cy);
      for (int64_t grp = 0; grp < g.group; ++grp) {
        const T* off = offset + pix * g.group * pts * 2 + grp * pts * 2;
        const T* msk = mask + pix * g.group * pts + grp * pts;
        T* __restrict__ o = out + pix * g.channels + grp * cg;
        for (int64_t c = 0; c < cg; ++c) o[c] = T(0);
        for (int64_t p = 0; p < pts; ++p) {
          T x, y;
          position(kernel, s, cx, cy, p, off, x, y);
          const Corners<T> k = corners_of(x, y, n, g);
          if (!k.any) continue;
          const T m = msk[p];
          const T* v[4];
          T wm[4];
          for (int c = 0; c < 4; ++c) {
            v[c] = k.valid[c] ? value + corner_pixel(k, c, g) * g.channels + grp * cg : zero;
            wm[c] = m * k.weight[c];
          }
          const T *__restrict__ v0 = v[0], *__restrict__ v1 = v[1], *__restrict__ v2 = v[2], *__restrict__ v3 = v[3];
#pragma omp simd
          for (int64_t c = 0; c < cg; ++c) o[c] += wm[0] * v0[c] + wm[1] * v1[c] + wm[2] * v2[c] + wm[3] * v3[c];
        }
      }
    }
  });
}

// Input rows (flat n*H_in + y) touched by the samples of output pixels [begin, end): [lo, hi], empty if lo > hi.
template <typename T>
std::pair<int64_t, int64_t> touched_rows(const T* offset, const Geometry& g, int64_t begin, int64_t end) {
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  const std::vector<T> points = kernel_points<T>(g);
  const T* kernel = points.data();
  const T s = T(g.offset_scale);
  for (int64_t pix = begin; pix < end; ++pix) {
    T cx, cy;
    const int64_t n = centre_of(g, pix, cx, cy);
    for (int64_t grp = 0; grp < g.group; ++grp) {
      const T* off = offset + pix * g.group * g.points * 2 + grp * g.points * 2;
      for (int64_t p = 0; p < g.points; ++p) {
        T x, y;
        position(kernel, s, cx, cy, p, off, x, y);
        const Corners<T> k = corners_of(x, y, n, g);
        if (!k.any) continue;
        const int64_t top = (k.valid[0] || k.valid[1]) ? k.row0 : k.row0 + 1;
        const int64_t bottom = (k.valid[2] || k.valid[3]) ? k.row0 + 1 : k.row0;
        lo = std::min(lo, top);
        hi = std::max(hi, bottom);
      }
    }
  }
  return {lo, hi};
}

// Backward of output pixels [begin, end): mask and offset gradients written in place, value gradient added into
// `grad_value`, which holds input rows [row_base, ...).
template <typename T, int CG>
void backward_chunk(const T* grad_out, const T* value, const T* offset, const T* mask, T* grad_value,
                    int64_t row_base, T* grad_offset, T* grad_mask, const Geometry& g, int64_t begin, int64_t end) {
  const int64_t cg = CG > 0 ? CG : g.group_channels, pts = g.points;
  std::vector<T> zeros(cg, T(0)), junk(4 * cg, T(0));
  const std::vector<T> points = kernel_points<T>(g);
  const T* kernel = points.data();
  const T s = T(g.offset_scale);
  for (int64_t pix = begin; pix < end; ++pix) {
    T cx, cy;
    const int64_t n = centre_of(g, pix, cx, cy);
    for (int64_t grp = 0; grp < g.group; ++grp) {
      const int64_t point0 = pix * g.group * pts + grp * pts;
      const T* off = offset + 2 * point0;
      const T* msk = mask + point0;
      const T* __restrict__ go = grad_out + pix * g.channels + grp * cg;
      for (int64_t p = 0; p < pts; ++p) {
        T x, y;
        position(kernel, s, cx, cy, p, off, x, y);
        const Corners<T> k = corners_of(x, y, n, g);
        if (!k.any) {
          grad_mask[point0 + p] = T(0);
          grad_offset[2 * (point0 + p)] = T(0);
          grad_offset[2 * (point0 + p) + 1] = T(0);
          continue;
        }
        const T m = msk[p];
        const T* v[4];
        T* q[4];
        T wm[4];
        for (int c = 0; c < 4; ++c) {
          if (k.valid[c]) {
            const int64_t pixel = corner_pixel(k, c, g);
            v[c] = value + pixel * g.channels + grp * cg;
            q[c] = grad_value + (pixel - row_base * g.w_in) * g.channels + grp * cg;
          } else {
            v[c] = zeros.data();
            q[c] = junk.data() + c * cg;  // receives zeros; keeps the channel loop free of branches
          }
          wm[c] = m * k.weight[c];
        }
        const T w0 = k.weight[0], w1 = k.weight[1], w2 = k.weight[2], w3 = k.weight[3];
        const T fx = k.fx, fy = k.fy;
        const T *__restrict__ v0 = v[0], *__restrict__ v1 = v[1], *__restrict__ v2 = v[2], *__restrict__ v3 = v[3];
        T gm = 0, gx = 0, gy = 0;
#pragma omp simd reduction(+ : gm, gx, gy)
        for (int64_t c = 0; c < cg; ++c) {
          const T a = v0[c], b = v1[c], d = v2[c], e = v3[c], t = go[c];
          gm += t * (w0 * a + w1 * b + w2 * d + w3 * e);
          gx += t * ((1 - fy) * (b - a) + fy * (e - d));
          gy += t * ((1 - fx) * (d - a) + fx * (e - b));
        }
        // The four corners are distinct pixels (or distinct junk rows), so these updates never alias.
        T *__restrict__ q0 = q[0], *__restrict__ q1 = q[1], *__restrict__ q2 = q[2], *__restrict__ q3 = q[3];
#pragma omp simd
        for (int64_t c = 0; c < cg; ++c) {
          const T t = go[c];
          q0[c] += wm[0] * t;
          q1[c] += wm[1] * t;
          q2[c] += wm[2] * t;
          q3[c] += wm[3] * t;
        }
        grad_mask[point0 + p] = gm;
        grad_offset[2 * (point0 + p)] = m * gx * s;
        grad_offset[2 * (point0 + p) + 1] = m * gy * s;
      }
    }
  }
}

template <typename T, int CG>
void backward_kernel(const T* grad_out, const T* value, const T* offset, const T* mask, T* grad_value,
                     T* grad_offset, T* grad_mask, const Geometry& g) {
  const int64_t pixels = g.n * g.h_out * g.w_out;
  // Contiguous chunks of output pixels, one per thread; chunk 0 scatters into grad_value itself, the others into
  // buffers spanning only the rows they touch (about a band of the image each: the offsets are local).
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), pixels / 256));
  std::vector<int64_t> bounds(chunks + 1);
  for (int64_t t = 0; t <= chunks; ++t) bounds[t] = pixels * t / chunks;
  std::vector<std::pair<int64_t, int64_t>> rows(chunks, {0, -1});
  std::vector<at::Tensor> buffers(chunks);
  const int64_t row_size = g.w_in * g.channels;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      T* target = grad_value;
      int64_t base = 0;
      if (t > 0) {
        rows[t] = touched_rows(offset, g, bounds[t], bounds[t + 1]);
        if (rows[t].first <= rows[t].second) {
          buffers[t] = at::zeros({(rows[t].second - rows[t].first + 1) * row_size},
                                 at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
          target = buffers[t].data_ptr<T>();
          base = rows[t].first;
        }
      }
      backward_chunk<T, CG>(grad_out, value, offset, mask, target, base, grad_offset, grad_mask, g, bounds[t],
                     bounds[t + 1]);
    }
  });
  if (chunks == 1) return;
  // Sum the buffers into grad_value, parallel over input rows, chunks in order.
  at::parallel_for(0, g.n * g.h_in, 16, [&](int64_t first, int64_t last) {
    for (int64_t t = 1; t < chunks; ++t) {
      const int64_t lo = std::max(first, rows[t].first), hi = std::min(last - 1, rows[t].second);
      if (lo > hi) continue;
      const T* __restrict__ src = buffers[t].data_ptr<T>() + (lo - rows[t].first) * row_size;
      T* __restrict__ dst = grad_value + lo * row_size;
      const int64_t count = (hi - lo + 1) * row_size;
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) dst[i] += src[i];
    }
  });
}

// Calls body(std::integral_constant<int, CG>) with CG = the group width if it is a common one, else 0.
template <typename Body>
void dispatch_group_channels(int64_t group_channels, const Body& body) {
  switch (group_channels) {
    case 8: body(std::integral_constant<int, 8>{}); break;
    case 16: body(std::integral_constant<int, 16>{}); break;
    case 32: body(std::integral_constant<int, 32>{}); break;
    default: body(std::integral_constant<int, 0>{});
  }
}

at::Tensor dcnv3_forward(const at::Tensor& value_in, const at::Tensor& offset_in, const at::Tensor& mask_in,
                         int64_t group, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation,
                         double offset_scale) {
  const Geometry g = check_inputs(value_in, offset_in, mask_in, group, kernel, stride, pad, dilation, offset_scale);
  const at::Tensor value = value_in.contiguous(), offset = offset_in.contiguous(), mask = mask_in.contiguous();
  at::Tensor out = at::empty({g.n, g.h_out, g.w_out, g.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "dcnv3_forward", [&] {
    dispatch_group_channels(g.group_channels, [&](auto width) {
      forward_kernel<scalar_t, decltype(width)::value>(value.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                                                       mask.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward(const at::Tensor& grad_out_in, const at::Tensor& value_in,
                                                              const at::Tensor& offset_in, const at::Tensor& mask_in,
                                                              int64_t group, int64_t kernel, int64_t stride,
                                                              int64_t pad, int64_t dilation, double offset_scale) {
  const Geometry g = check_inputs(value_in, offset_in, mask_in, group, kernel, stride, pad, dilation, offset_scale);
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({g.n, g.h_out, g.w_out, g.channels}) &&
                  grad_out_in.scalar_type() == value_in.scalar_type(),
              "grad_out must be (N, H, W, C) in the dtype of value");
  const at::Tensor grad_out = grad_out_in.contiguous(), value = value_in.contiguous();
  const at::Tensor offset = offset_in.contiguous(), mask = mask_in.contiguous();
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_offset = at::empty_like(offset), grad_mask = at::empty_like(mask);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "dcnv3_backward", [&] {
    dispatch_group_channels(g.group_channels, [&](auto width) {
      backward_kernel<scalar_t, decltype(width)::value>(
          grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
          mask.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(), grad_offset.data_ptr<scalar_t>(),
          grad_mask.data_ptr<scalar_t>(), g);
    });
  });
  return {grad_value, grad_offset, grad_mask};
}

}  // namespace

TORCH_LIBRARY(erf_tools_dcnv3, m) {
  m.def("forward(Tensor value, Tensor offset, Tensor mask, int group, int kernel_size, int stride, int pad, "
        "int dilation, float offset_scale) -> Tensor");
  m.def("backward(Tensor grad_out, Tensor value, Tensor offset, Tensor mask, int group, int kernel_size, "
        "int stride, int pad, int dilation, float offset_scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(erf_tools_dcnv3, CPU, m) {
  m.impl("forward", &dcnv3_forward);
  m.impl("backward", &dcnv3_backward);
}
