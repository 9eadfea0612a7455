// slimlm's own CPU kernels for decoding (few rows of activations): low-bit weights times int8 activations,
// and a float32 few-row GEMM. Compiled on first use for the CPU it runs on (-march=native), see
// slimlm/quant/cpu_kernels.py, which also holds the pure-PyTorch reference each kernel is tested against.
//
// Low-bit weights (the scheme llama.cpp and ONNX Runtime use on CPUs): the activations of each row are
// quantized to int8 per block of 32 (d = max|x| / 127, q = round(x / d)); a weight w = s * (c - z) with
// codes c, group scale s and zero point z gives, per block b of group g,
//     sum_k w_k x_k ~= s * d_b * (sum_k c_k q_k) - s * z * d_b * (sum_k q_k),
// so the inner loop is an integer dot product of 32 codes with 32 int8 activations (AVX2 maddubs, or
// AVX-512 VNNI / AVX-VNNI dpbusd), scaled once per block. Groups may be any multiple of 32 columns and of
// unequal length (a shorter last group): `block_group` maps every 32-column block to its group.
//   4-bit (also 2- and 3-bit codes, stored in nibbles): packed [N, K/32, 16] bytes, byte j of a block holding
//     code j in its low and code j + 16 in its high nibble (llama.cpp's Q4 order).
//   8-bit: int8 codes c - 128 [N, K], zero point z - 128 folded into `scaled_zero`.
// `scaled_zero` [N, G] is s * z in the code domain the kernel reads (0 for a symmetric 8-bit grid).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SLIMLM_PAIRS 1  // 512-bit kernels: two 32-column blocks per step
#endif

struct QuantizedRows {
  std::vector<int8_t> q;     // [M, K]
  std::vector<float> scale;  // [M, K / 32]
  std::vector<float> group_sum;  // [M, G]: sum over the group's blocks of d_b * sum(q_b)
  // Pairs of blocks (512-bit kernels): q in the 4-bit weight's nibble order, per pair
  // [x_b 0..15, x_b+1 0..15, x_b 16..31, x_b+1 16..31], and the per-lane block scales of the 16 int32 dot
  // products of a pair, in that order (`pair_scale4`) and in natural order (`pair_scale8`).
  std::vector<int8_t> q_pairs;
  std::vector<float> pair_scale4, pair_scale8;
};

// Whether the 512-bit kernels apply: an even number of blocks, both blocks of each pair in one group.
bool pairs_apply(const int32_t* block_group, int64_t blocks) {
#if defined(SLIMLM_PAIRS)
  if (blocks % 2) return false;
  for (int64_t b = 0; b < blocks; b += 2)
    if (block_group[b] != block_group[b + 1]) return false;
  return true;
#else
  (void)block_group;
  (void)blocks;
  return false;
#endif
}

void add_pairs(QuantizedRows& acts, int64_t rows, int64_t k) {
  const int64_t blocks = k / kBlock, pairs = blocks / 2;
  acts.q_pairs.resize(rows * k);
  acts.pair_scale4.resize(rows * pairs * 16);
  acts.pair_scale8.resize(rows * pairs * 16);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t p = 0; p < pairs; ++p) {
      const int8_t* first = acts.q.data() + m * k + p * 64;
      int8_t* dst = acts.q_pairs.data() + m * k + p * 64;
      for (int j = 0; j < 16; ++j) {
        dst[j] = first[j];
        dst[16 + j] = first[32 + j];
        dst[32 + j] = first[16 + j];
        dst[48 + j] = first[48 + j];
      }
      const float d0 = acts.scale[m * blocks + 2 * p], d1 = acts.scale[m * blocks + 2 * p + 1];
      float* lanes4 = acts.pair_scale4.data() + (m * pairs + p) * 16;
      float* lanes8 = acts.pair_scale8.data() + (m * pairs + p) * 16;
      for (int j = 0; j < 16; ++j) {
        lanes4[j] = (j / 4) % 2 ? d1 : d0;
        lanes8[j] = j < 8 ? d0 : d1;
      }
    }
  }
}

QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t k, const int32_t* block_group, int64_t groups) {
  const int64_t blocks = k / kBlock;
  QuantizedRows out{std::vector<int8_t>(rows * k), std::vector<float>(rows * blocks),
                    std::vector<float>(rows * groups, 0.0f)};
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* src = x + m * k + b * kBlock;
      float amax = 0.0f;
      for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(src[j]));
      const float d = amax / 127.0f;
      const float inverse = d > 0.0f ? 1.0f / d : 0.0f;
      int32_t sum = 0;
      int8_t* dst = out.q.data() + m * k + b * kBlock;
      for (int64_t j = 0; j < kBlock; ++j) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(src[j] * inverse));
        dst[j] = static_cast<int8_t>(v);
        sum += v;
      }
      out.scale[m * blocks + b] = d;
      out.group_sum[m * groups + block_group[b]] += d * static_cast<float>(sum);
    }
  }
  return out;
}

#if defined(__AVX2__)
inline __m256i dot_u8s8(__m256i u, __m256i s) {  // 8 x int32, each the sum of 4 products u8 * s8
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));  // |u*s| pairs < 2^15 here
#endif
}

inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}
#endif

#if defined(SLIMLM_PAIRS)
// The 512-bit tile: as `lowbit_tile`, two blocks (64 columns) per step, dpbusd on 64 bytes.
template <int Bits, int C, int R>
void lowbit_tile_pairs(const uint8_t* weight, int64_t row_bytes, const float* scale, int64_t groups,
                       const int32_t* block_group, int64_t blocks, const QuantizedRows& acts, int64_t row0,
                       int64_t k, float out[C][R]) {
  const int64_t pairs = blocks / 2;
  __m512 first[C][R], second[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) first[c][r] = second[c][r] = _mm512_setzero_ps();
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  const __m512i zero = _mm512_setzero_si512();
  const int8_t* x_base = Bits == 4 ? acts.q_pairs.data() : acts.q.data();
  const float* lane_base = Bits == 4 ? acts.pair_scale4.data() : acts.pair_scale8.data();
  auto step = [&](int64_t p, __m512 (&acc)[C][R]) __attribute__((always_inline)) {
    __m512i x[R];
    __m512 d[R];
    for (int r = 0; r < R; ++r) {
      x[r] = _mm512_loadu_si512(x_base + (row0 + r) * k + p * 64);
      d[r] = _mm512_loadu_ps(lane_base + ((row0 + r) * pairs + p) * 16);
    }
    const int64_t g = block_group[2 * p];
    for (int c = 0; c < C; ++c) {
      const uint8_t* w_ptr = weight + c * row_bytes;
      __m512i w;
      if constexpr (Bits == 4) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_ptr + p * 32));
        w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(bytes, low_mask)),
                               _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask), 1);
      } else {
        w = _mm512_loadu_si512(w_ptr + p * 64);
      }
      const __m512i w_u8 = Bits == 4 ? w : _mm512_abs_epi8(w);
      const __mmask64 negative = Bits == 4 ? 0 : _mm512_movepi8_mask(w);
      const __m512 s = _mm512_set1_ps(scale[c * groups + g]);
      for (int r = 0; r < R; ++r) {
        const __m512i x_s8 = Bits == 4 ? x[r] : _mm512_mask_sub_epi8(x[r], negative, zero, x[r]);
        const __m512 products = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, w_u8, x_s8));
        acc[c][r] = _mm512_fmadd_ps(products, _mm512_mul_ps(s, d[r]), acc[c][r]);
      }
    }
  };
  // Two accumulator sets, so consecutive multiply-adds do not wait on each other; the same for any number of
  // rows, so a row's result does not depend on how many rows came with it (speculative verification).
  int64_t p = 0;
  for (; p + 2 <= pairs; p += 2) {
    step(p, first);
    step(p + 1, second);
  }
  for (; p < pairs; ++p) step(p, first);
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) out[c][r] = _mm512_reduce_add_ps(_mm512_add_ps(first[c][r], second[c][r]));
}
#endif

// A tile of C output columns times R activation rows, C * R independent accumulators (one accumulator per
// output would leave the loop waiting on the latency of its fused multiply-add).
template <int Bits, int C, int R>
void lowbit_tile(const uint8_t* weight, int64_t row_bytes, const float* scale, int64_t groups,
                 const int32_t* block_group, int64_t blocks, const QuantizedRows& acts, int64_t row0, int64_t k,
                 float out[C][R]) {
#if defined(__AVX2__)
  __m256 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i x[R];
    __m256 d[R];
    for (int r = 0; r < R; ++r) {
      x[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acts.q.data() + (row0 + r) * k + b * kBlock));
      d[r] = _mm256_set1_ps(acts.scale[(row0 + r) * blocks + b]);
    }
    const int64_t g = block_group[b];
    for (int c = 0; c < C; ++c) {
      const uint8_t* w_ptr = weight + c * row_bytes;
      __m256i w;
      if constexpr (Bits == 4) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w_ptr + b * 16));
        w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask), _mm_and_si128(bytes, low_mask));
      } else {
        w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_ptr + b * kBlock));
      }
      const __m256i w_u8 = Bits == 4 ? w : _mm256_sign_epi8(w, w);  // 8-bit: |w| times sign(w) * x
      const __m256 s = _mm256_set1_ps(scale[c * groups + g]);
      for (int r = 0; r < R; ++r) {
        const __m256i x_s8 = Bits == 4 ? x[r] : _mm256_sign_epi8(x[r], w);
        const __m256 products = _mm256_cvtepi32_ps(dot_u8s8(w_u8, x_s8));
        acc[c][r] = _mm256_fmadd_ps(products, _mm256_mul_ps(s, d[r]), acc[c][r]);
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) out[c][r] = hsum(acc[c][r]);
#else
  for (int c = 0; c < C; ++c) {
    for (int r = 0; r < R; ++r) {
      const int64_t row = row0 + r;
      float total = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        const int8_t* x = acts.q.data() + row * k + b * kBlock;
        int32_t dot = 0;
        for (int64_t j = 0; j < kBlock; ++j) {
          int32_t code;
          if constexpr (Bits == 4) {
            const uint8_t byte = weight[c * row_bytes + b * 16 + (j % 16)];
            code = j < 16 ? (byte & 0x0F) : (byte >> 4);
          } else {
            code = static_cast<int8_t>(weight[c * row_bytes + b * kBlock + j]);
          }
          dot += code * x[j];
        }
        total += scale[c * groups + block_group[b]] * acts.scale[row * blocks + b] * static_cast<float>(dot);
      }
      out[c][r] = total;
    }
  }
#endif
}

// Output columns [begin, end) for activation rows [row0, row0 + R): tiles of C columns, then single columns.
template <int Bits, int C, int R>
void tile(bool pairs, const uint8_t* weight, int64_t row_bytes, const float* scale, int64_t groups,
          const int32_t* block_group, int64_t blocks, const QuantizedRows& acts, int64_t row0, int64_t k,
          float out[C][R]) {
#if defined(SLIMLM_PAIRS)
  if (pairs) return lowbit_tile_pairs<Bits, C, R>(weight, row_bytes, scale, groups, block_group, blocks, acts, row0, k,
                                                  out);
#endif
  (void)pairs;
  lowbit_tile<Bits, C, R>(weight, row_bytes, scale, groups, block_group, blocks, acts, row0, k, out);
}

template <int Bits, int C, int R>
void lowbit_columns(int64_t begin, int64_t end, const uint8_t* weight, const float* scale, const float* scaled_zero,
                    int64_t groups, const int32_t* block_group, const QuantizedRows& acts, int64_t row0, int64_t k,
                    int64_t n, float* y) {
  const bool pairs = !acts.pair_scale4.empty();
  const int64_t blocks = k / kBlock, row_bytes = k * Bits / 8;
  auto finish = [&](int64_t col, int r, float value) {
    const float* group_sum = acts.group_sum.data() + (row0 + r) * groups;
    float zero_term = 0.0f;
    for (int64_t g = 0; g < groups; ++g) zero_term += scaled_zero[col * groups + g] * group_sum[g];
    y[(row0 + r) * n + col] = value - zero_term;
  };
  int64_t col = begin;
  for (; col + C <= end; col += C) {
    float out[C][R];
    tile<Bits, C, R>(pairs, weight + col * row_bytes, row_bytes, scale + col * groups, groups, block_group, blocks,
                     acts, row0, k, out);
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) finish(col + c, r, out[c][r]);
  }
  for (; col < end; ++col) {
    float out[1][R];
    tile<Bits, 1, R>(pairs, weight + col * row_bytes, row_bytes, scale + col * groups, groups, block_group, blocks,
                     acts, row0, k, out);
    for (int r = 0; r < R; ++r) finish(col, r, out[0][r]);
  }
}

// Rows of x in tiles of at most 8 (each weight vector is loaded once per tile): CALL(C, R) runs a tile of C
// columns by R rows starting at row `row0`. One column at a time: on the AMD EPYC (Zen 4) development machine
// a single weight stream ran 1.5-2x faster than tiles of 2-4 columns (four streams) at one to five rows.
#define SLIMLM_ROW_TILES(CALL)                 \
  int64_t row0 = 0;                            \
  for (; row0 + 8 <= rows; row0 += 8) CALL(1, 8); \
  switch (rows - row0) {                       \
    case 7: CALL(1, 7); break;                 \
    case 6: CALL(1, 6); break;                 \
    case 5: CALL(1, 5); break;                 \
    case 4: CALL(1, 4); break;                 \
    case 3: CALL(1, 3); break;                 \
    case 2: CALL(1, 2); break;                 \
    case 1: CALL(1, 1); break;                 \
    default: break;                            \
  }

// x [..., K] float32 times one or more weights sharing the column grid (block_group): y [..., N_1 + N_2 + ...],
// the activations quantized once (a block's q/k/v or gate/up projections in one call).
template <int Bits>
torch::Tensor lowbit_matmul(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                            const std::vector<torch::Tensor>& scales, const std::vector<torch::Tensor>& scaled_zeros,
                            const torch::Tensor& block_group) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 [..., K]");
  TORCH_CHECK(!weights.empty() && weights.size() == scales.size() && weights.size() == scaled_zeros.size(),
              "one scale and scaled_zero per weight");
  TORCH_CHECK(block_group.scalar_type() == torch::kInt32 && block_group.is_contiguous(), "block_group: int32");
  const int64_t k = x.size(-1), rows = k ? x.numel() / k : 0, groups = scales[0].size(1);
  TORCH_CHECK(k % kBlock == 0 && block_group.numel() == k / kBlock, "K must be a multiple of 32");
  int64_t total = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t n = weights[i].size(0);
    TORCH_CHECK(scales[i].scalar_type() == torch::kFloat32 && scales[i].is_contiguous() && scales[i].dim() == 2 &&
                    scales[i].size(0) == n && scales[i].size(1) == groups, "scale: contiguous float32 [N, G]");
    TORCH_CHECK(scaled_zeros[i].sizes() == scales[i].sizes() && scaled_zeros[i].is_contiguous() &&
                    scaled_zeros[i].scalar_type() == torch::kFloat32, "scaled_zero: like scale");
    TORCH_CHECK(weights[i].numel() == n * k * Bits / 8 && weights[i].is_contiguous(), "weight: packed codes");
    total += n;
  }
  const int32_t* block_group_ptr = block_group.data_ptr<int32_t>();
  QuantizedRows acts = quantize_rows(x.data_ptr<float>(), rows, k, block_group_ptr, groups);
  if (pairs_apply(block_group_ptr, k / kBlock)) add_pairs(acts, rows, k);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = total;
  auto y = torch::empty(shape, x.options());
  float* y_ptr = y.data_ptr<float>();
  int64_t offset = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const uint8_t* w_ptr = reinterpret_cast<const uint8_t*>(weights[i].data_ptr());
    const float* s_ptr = scales[i].data_ptr<float>();
    const float* z_ptr = scaled_zeros[i].data_ptr<float>();
    float* out = y_ptr + offset;
    at::parallel_for(0, weights[i].size(0), 64, [&](int64_t begin, int64_t end) {
#define SLIMLM_LOWBIT(C, R) \
  lowbit_columns<Bits, C, R>(begin, end, w_ptr, s_ptr, z_ptr, groups, block_group_ptr, acts, row0, k, total, out)
      SLIMLM_ROW_TILES(SLIMLM_LOWBIT)
#undef SLIMLM_LOWBIT
    });
    offset += weights[i].size(0);
  }
  return y;
}

// float32 y = x @ weight.T for a few rows: each weight row is read once for all rows of x (MKL's GEMV / GEMM
// read or pack the weight per call at a fraction of the memory bandwidth for one to a few rows). The weight is
// float32 or bfloat16 (uint16 bits; widened exactly to float32 as it is loaded: half the bytes to read), the
// arithmetic float32 in the same order either way, so a bfloat16 weight gives bitwise the result of its float32
// copy.
inline float widen(float w) { return w; }
inline float widen(uint16_t w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
#if defined(__AVX512F__)
inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16(const uint16_t* w) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
#elif defined(__AVX2__)
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const uint16_t* w) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
#endif

template <typename W, int C, int R>
void f32_tile(const W* w, const float* x, int64_t k, float* y, int64_t n) {
  int64_t j = 0;
  float total[C][R] = {};
#if defined(__AVX512F__)
  __m512 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  for (; j + 16 <= k; j += 16) {
    __m512 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_ps(x + r * k + j);
    for (int c = 0; c < C; ++c) {
      const __m512 wv = load16(w + c * k + j);
      for (int r = 0; r < R; ++r) acc[c][r] = _mm512_fmadd_ps(wv, xv[r], acc[c][r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) total[c][r] = _mm512_reduce_add_ps(acc[c][r]);
#elif defined(__AVX2__)
  __m256 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
  for (; j + 8 <= k; j += 8) {
    __m256 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * k + j);
    for (int c = 0; c < C; ++c) {
      const __m256 wv = load8(w + c * k + j);
      for (int r = 0; r < R; ++r) acc[c][r] = _mm256_fmadd_ps(wv, xv[r], acc[c][r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) total[c][r] = hsum(acc[c][r]);
#endif
  for (; j < k; ++j)
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) total[c][r] += widen(w[c * k + j]) * x[r * k + j];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) y[r * n + c] = total[c][r];
}

template <typename W, int C, int R>
void f32_columns(int64_t begin, int64_t end, const W* w, const float* x, int64_t k, float* y, int64_t n) {
  int64_t col = begin;
  for (; col + C <= end; col += C) f32_tile<W, C, R>(w + col * k, x, k, y + col, n);
  for (; col < end; ++col) f32_tile<W, 1, R>(w + col * k, x, k, y + col, n);
}

template <typename W>
void f32_few_rows_into(const float* x_ptr, const W* w_ptr, int64_t rows, int64_t k, int64_t n, float* y_ptr) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
#define SLIMLM_F32(C, R) f32_columns<W, C, R>(begin, end, w_ptr, x_ptr + row0 * k, k, y_ptr + row0 * n, n)
    SLIMLM_ROW_TILES(SLIMLM_F32)
#undef SLIMLM_F32
  });
}

torch::Tensor f32_few_rows(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  const bool bf16 = weight.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(weight.dim() == 2 && (bf16 || weight.scalar_type() == torch::kFloat32) && weight.is_contiguous() &&
                  weight.size(1) == x.size(1), "weight: contiguous float32 or bfloat16 [N, K]");
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  auto y = torch::empty({rows, n}, x.options());
  if (bf16)
    f32_few_rows_into(x.data_ptr<float>(), reinterpret_cast<const uint16_t*>(weight.data_ptr()), rows, k, n,
                      y.data_ptr<float>());
  else
    f32_few_rows_into(x.data_ptr<float>(), weight.data_ptr<float>(), rows, k, n, y.data_ptr<float>());
  return y;
}

// Exact int8 x int8 -> int32 products of a few rows (W8A8 decode): y[m, n] = sum_k x[m, k] w[n, k], the
// integers torch._int_mm computes, reading each weight row once for all rows. VNNI: dpbusd takes unsigned
// x + 128 (x xor 0x80) times signed w, and 128 * sum_k w[n, k] (one more dpbusd of 0x80 with w per
// weight vector) is subtracted at the end; AVX2: both widened to int16 and multiplied pairwise (madd),
// which cannot overflow.
template <int C, int R>
void s8_tile(const int8_t* w, const int8_t* x, int64_t k, int32_t* y, int64_t n) {
  int64_t j = 0;
  int32_t total[C][R] = {};
#if defined(SLIMLM_PAIRS)
  __m512i acc[C][R], offset[C];
  for (int c = 0; c < C; ++c) {
    offset[c] = _mm512_setzero_si512();
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_si512();
  }
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (; j + 64 <= k; j += 64) {
    __m512i xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_xor_si512(_mm512_loadu_si512(x + r * k + j), flip);
    for (int c = 0; c < C; ++c) {
      const __m512i wv = _mm512_loadu_si512(w + c * k + j);
      offset[c] = _mm512_dpbusd_epi32(offset[c], flip, wv);  // 128 * w
      for (int r = 0; r < R; ++r) acc[c][r] = _mm512_dpbusd_epi32(acc[c][r], xv[r], wv);
    }
  }
  for (int c = 0; c < C; ++c) {
    const int32_t shift = _mm512_reduce_add_epi32(offset[c]);
    for (int r = 0; r < R; ++r) total[c][r] = _mm512_reduce_add_epi32(acc[c][r]) - shift;
  }
#elif defined(__AVX2__)
  __m256i acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_si256();
  for (; j + 16 <= k; j += 16) {
    __m256i xv[R];
    for (int r = 0; r < R; ++r)
      xv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + r * k + j)));
    for (int c = 0; c < C; ++c) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * k + j)));
      for (int r = 0; r < R; ++r) acc[c][r] = _mm256_add_epi32(acc[c][r], _mm256_madd_epi16(wv, xv[r]));
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) {
      __m128i v = _mm_add_epi32(_mm256_castsi256_si128(acc[c][r]), _mm256_extracti128_si256(acc[c][r], 1));
      v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
      v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1));
      total[c][r] = _mm_cvtsi128_si32(v);
    }
#endif
  for (; j < k; ++j)
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) total[c][r] += static_cast<int32_t>(w[c * k + j]) * x[r * k + j];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) y[r * n + c] = total[c][r];
}

template <int C, int R>
void s8_columns(int64_t begin, int64_t end, const int8_t* w, const int8_t* x, int64_t k, int32_t* y, int64_t n) {
  int64_t col = begin;
  for (; col + C <= end; col += C) s8_tile<C, R>(w + col * k, x, k, y + col, n);
  for (; col < end; ++col) s8_tile<1, R>(w + col * k, x, k, y + col, n);
}

// y [M, N] = the int32 sums of int8 x [M, K] times int8 w [N, K], the output columns split across threads.
void s8_few_rows_into(const int8_t* x_ptr, const int8_t* w_ptr, int64_t rows, int64_t k, int64_t n, int32_t* y_ptr) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
#define SLIMLM_S8(C, R) s8_columns<C, R>(begin, end, w_ptr, x_ptr + row0 * k, k, y_ptr + row0 * n, n)
    SLIMLM_ROW_TILES(SLIMLM_S8)
#undef SLIMLM_S8
  });
}

torch::Tensor s8_few_rows(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kInt8 && x.is_contiguous(), "x: contiguous int8 [M, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kInt8 && weight.is_contiguous() &&
                  weight.size(1) == x.size(1), "weight: contiguous int8 [N, K]");
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  auto y = torch::empty({rows, n}, x.options().dtype(torch::kInt32));
  s8_few_rows_into(x.data_ptr<int8_t>(), weight.data_ptr<int8_t>(), rows, k, n, y.data_ptr<int32_t>());
  return y;
}

// W8A8 decode in one call: the rows of float32 x quantized to symmetric `bits`-bit integers (per row from
// max|x|, or with one static scale), the exact integer products with int8 weights as in `s8_few_rows`, then
// the float rescale, for one or more weights on the same input (a block's q/k/v or gate/up projections).
// Bit for bit what slimlm.quant.w8a8.Int8Linear computes through PyTorch operations:
//   s = (h + h) / (2^bits - 1) with h = max|x| (1 where the row is all zero), or the static scale,
//   p = clamp(round_half_even(x / s), -2^(bits-1), 2^(bits-1) - 1),  y[n] = (float(sum_k p_k w[n, k]) * s) * s_w[n].
torch::Tensor w8a8_matmul(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                          const std::vector<torch::Tensor>& weight_scales, int64_t bits, double static_scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(!weights.empty() && weights.size() == weight_scales.size(), "one weight_scale per weight");
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits: 2 to 8");
  const int64_t rows = x.size(0), k = x.size(1);
  int64_t total = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK(weights[i].dim() == 2 && weights[i].scalar_type() == torch::kInt8 && weights[i].is_contiguous() &&
                    weights[i].size(1) == k, "weight: contiguous int8 [N, K]");
    TORCH_CHECK(weight_scales[i].scalar_type() == torch::kFloat32 && weight_scales[i].is_contiguous() &&
                    weight_scales[i].numel() == weights[i].size(0), "weight_scale: contiguous float32 [N]");
    total += weights[i].size(0);
  }
  const float max_code = static_cast<float>((1 << bits) - 1);
  const float low = -static_cast<float>(1 << (bits - 1)), high_code = max_code + low;
  std::vector<int8_t> codes(rows * k);
  std::vector<float> row_scale(rows);
  const float* xp = x.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * k;
    float s = static_cast<float>(static_scale);
    if (static_scale <= 0) {
      float h = 0.0f;
      bool nan = false;
      for (int64_t j = 0; j < k; ++j) {
        const float a = std::fabs(row[j]);
        nan |= std::isnan(a);
        h = a > h ? a : h;
      }
      if (h == 0.0f) h = 1.0f;
      s = nan ? std::numeric_limits<float>::quiet_NaN() : (h + h) / max_code;
    }
    row_scale[r] = s;
    for (int64_t j = 0; j < k; ++j) {
      float q = std::nearbyint(row[j] / s);
      q = q < low ? low : (q > high_code ? high_code : q);
      if (std::isnan(q)) q = 0.0f;  // a NaN input: its row's scale is NaN, so its outputs are NaN anyway
      codes[r * k + j] = static_cast<int8_t>(q);
    }
  }
  auto y = torch::empty({rows, total}, x.options());
  float* y_ptr = y.data_ptr<float>();
  const int8_t* x_ptr = codes.data();
  int64_t offset = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t n = weights[i].size(0);
    std::vector<int32_t> sums(rows * n);
    const int32_t* s_ptr = sums.data();
    s8_few_rows_into(x_ptr, weights[i].data_ptr<int8_t>(), rows, k, n, sums.data());
    const float* ws = weight_scales[i].data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < n; ++c)
        y_ptr[r * total + offset + c] = (static_cast<float>(s_ptr[r * n + c]) * row_scale[r]) * ws[c];
    offset += n;
  }
  return y;
}

// ---- Decode-step float32 operations of one token (batch 1): each one call instead of the 4-6 PyTorch operations
// (and their dispatch overhead, several microseconds each on CPU) that compute it at this size.

// RMSNorm: y = weight * x / sqrt(mean(x^2) + eps), per row of x [..., D].
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32");
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() && weight.numel() == d, "weight: [D]");
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * d;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < d; ++i) sum += row[i] * row[i];
    const float inverse = 1.0f / std::sqrt(sum / static_cast<float>(d) + static_cast<float>(eps));
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) yp[r * d + i] = wp[i] * (row[i] * inverse);
  }
  return y;
}

// Rotary embedding of rows [n, D] at one position (cos, sin [D], half-split layout):
// y[:D/2] = x1 cos - x2 sin, y[D/2:] = x2 cos + x1 sin.
torch::Tensor rope_rows(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32");
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0, half = d / 2;
  TORCH_CHECK(d % 2 == 0 && cos.numel() == d && sin.numel() == d && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32,
              "cos, sin: contiguous float32 [D]");
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* x1 = xp + r * d;
    const float* x2 = x1 + half;
    float* y1 = yp + r * d;
    float* y2 = y1 + half;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      y1[i] = x1[i] * c[i] - x2[i] * s[i];
      y2[i] = x2[i] * c[half + i] + x1[i] * s[half + i];
    }
  }
  return y;
}

// Attention of one query per head to `span` cached keys: query [H, D], keys / values [KV, span, D] with any
// stride between heads and positions (contiguous in D); the H / KV query heads of a group share a key head.
torch::Tensor single_query_attention(const torch::Tensor& query, const torch::Tensor& keys,
                                     const torch::Tensor& values, double scale) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat32 && query.is_contiguous() && query.dim() == 2, "query: [H, D]");
  TORCH_CHECK(keys.dim() == 3 && values.dim() == 3 && keys.sizes() == values.sizes() &&
                  keys.scalar_type() == torch::kFloat32 && values.scalar_type() == torch::kFloat32 &&
                  keys.stride(2) == 1 && values.stride(2) == 1, "keys, values: float32 [KV, span, D], contiguous in D");
  const int64_t heads = query.size(0), d = query.size(1), kv_heads = keys.size(0), span = keys.size(1);
  TORCH_CHECK(keys.size(2) == d && heads % kv_heads == 0 && span > 0, "shapes of query and keys disagree");
  const int64_t group = heads / kv_heads;
  auto out = torch::empty_like(query);
  const float* q = query.data_ptr<float>();
  const float* k = keys.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  float* o = out.data_ptr<float>();
  std::vector<float> scores(span);
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t kv = h / group;
    const float* qh = q + h * d;
    float top = -INFINITY;
    for (int64_t t = 0; t < span; ++t) {
      const float* kt = k + kv * keys.stride(0) + t * keys.stride(1);
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < d; ++i) dot += qh[i] * kt[i];
      scores[t] = dot * static_cast<float>(scale);
      top = std::max(top, scores[t]);
    }
    float total = 0.0f;
    float* score = scores.data();
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < span; ++t) {
      score[t] = std::exp(score[t] - top);
      total += score[t];
    }
    float* oh = o + h * d;
    for (int64_t i = 0; i < d; ++i) oh[i] = 0.0f;
    for (int64_t t = 0; t < span; ++t) {
      const float weight = scores[t] / total;
      const float* vt = v + kv * values.stride(0) + t * values.stride(1);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) oh[i] += weight * vt[i];
    }
  }
  return out;
}

// SiLU-gated product of a gated MLP: silu(gate) * up.
torch::Tensor silu_mul(const torch::Tensor& gate, const torch::Tensor& up) {
  TORCH_CHECK(gate.scalar_type() == torch::kFloat32 && up.scalar_type() == torch::kFloat32 &&
                  gate.sizes() == up.sizes(), "gate, up: float32 of one shape");
  const auto g = gate.contiguous(), u = up.contiguous();
  auto y = torch::empty_like(g);
  const float* gp = g.data_ptr<float>();
  const float* upp = u.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t n = g.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) yp[i] = gp[i] / (1.0f + std::exp(-gp[i])) * upp[i];
  return y;
}

std::string isa() {
#if defined(SLIMLM_PAIRS)
  return "avx512-vnni";
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512-vnni (256-bit)";
#elif defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_matmul", &lowbit_matmul<4>, "x[..., K] float32 times nibble-packed low-bit weights -> [..., sum N]");
  m.def("q8_matmul", &lowbit_matmul<8>, "x[..., K] float32 times int8 weights -> [..., sum N]");
  m.def("s8_few_rows", &s8_few_rows, "exact int8 x[M,K] @ int8 weight[N,K].T -> int32 [M,N], for a few rows");
  m.def("w8a8_matmul", &w8a8_matmul, "x[M,K] float32, quantized per row to int8, times int8 weights -> [M, sum N]");
  m.def("f32_few_rows", &f32_few_rows, "x[M,K] @ weight[N,K].T (weight float32 or bfloat16), float32, few rows");
  m.def("rms_norm", &rms_norm, "RMSNorm of the rows of x");
  m.def("rope_rows", &rope_rows, "rotary embedding of rows at one position");
  m.def("single_query_attention", &single_query_attention, "attention of one query per head");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("isa", &isa, "the instruction set the kernels were compiled for");
}
