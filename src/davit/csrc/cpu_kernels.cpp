// davit's native CPU kernels for fp32: window self-attention (forward, and backward for training), layer norm
// (inference), the conditional position encoding x + depthwise_conv3x3(x) (forward and backward), exact GELU
// with the preceding linear's bias (forward and backward, for training) and channel group attention (forward
// and backward, for training).
//
// Window attention: softmax(q k^T / sqrt(d)) v in every window of a token map, read straight from the map's
// qkv projection and written straight into the output map.
//
// Why a kernel of our own: at DaViT's window size (49 tokens, head dim 32) torch's fused CPU attention runs
// at ~50 GFLOP/s on a 2-core AVX-512 VM, a quarter of a matmul's rate there, and the windowed layout costs a
// partition copy before it and a reverse copy after it. Here each (window, head) is one task done in L1: the
// scores with the query index in the vector lanes (so the softmax over keys needs no horizontal reductions),
// a lane-wise softmax, then P v with the 1/sum applied to the output rows. Built and loaded by
// davit/layers/native.py (plain C ABI, no torch headers; OpenMP threads, as many as torch uses).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <algorithm>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

// Denormal operands and results are flushed to zero inside the attention kernels (x86's FTZ and DAZ bits,
// per thread, restored on leaving). Sharply peaked attention (scaled logit gaps of ~80 and more) makes
// probabilities, their products and the backward's dS denormal, and every x86 FMA on them takes a microcode
// assist: with the first stage's qkv scaled 10x its forward took 5.4x and its backward 10x as long. Values
// below 2^-126 are far under fp32's rounding of the sums they enter.
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

#if defined(__AVX512F__)
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int L = 16;  // lanes per vector: one AVX-512 register
// accumulator vectors per register block (of 32 registers), and keys per block of scores in the forward
// and the backward
constexpr int ACC = 16, KEYS_FWD = 6, KEYS_BWD = 4;
#else
// Elsewhere vectors of 8 floats, one AVX register (AVX2: 16 of them): as 16-float vectors (two registers
// each, on AVX2) GCC kept accumulators on the stack and moved them through general registers, and the kernels
// ran up to 4.8x slower than torch's ops (docs/benchmarks.md, session 48). Blocks of half the accumulators.
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
constexpr int L = 8;
constexpr int ACC = 8, KEYS_FWD = 2, KEYS_BWD = 2;
#endif
constexpr int QB = 64;  // queries per block of scores

inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// s in every lane. Not `(vf){} + s`: 0 + s is not s for s = -0, so the compiler kept a scalar add before
// each broadcast (and could not fold the broadcast into the FMA's memory operand); s - 0 is s for every s
inline vf splat(float s) { return s - (vf){}; }

// Keeps v in a register where it is used R times: otherwise GCC folds its load into each FMA as a memory
// operand, R loads where one does (on Zen 4 a 512-bit load takes the cycle's load bandwidth). Only where a
// vf is one register (AVX-512's, or AVX's 8 floats; without AVX it is two, which the constraint cannot name)
inline void in_register(vf& v) {
#if defined(__GNUC__) && defined(__AVX__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// e^x for x <= 0 (scores minus their column's max): Cephes' expf polynomial, about 1 ulp
inline vf vexp(vf x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  vf t = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln 2) by the 1.5 * 2^23 trick
  vf n = t - 12582912.0f;
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vf e = p * r * r + r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

#if defined(__clang__)
#define DAVIT_SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define DAVIT_SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

#if defined(__AVX512F__)
// 16 x 16 transpose in registers: four stages, each swapping the off-diagonal blocks of size 8, 4, 2, 1
// (lane l of the pair's first row keeps a[l] where bit h of l is clear, else takes b[l - h]; the second row
// the other halves). 64 two-source shuffles for 256 floats, where a scalar transpose moves them one by one.
inline void transpose16(vf* r) {
  for (int i = 0; i < 16; ++i) {
    if (i & 8) continue;
    vf a = r[i], b = r[i + 8];
    r[i] = DAVIT_SHUFFLE2(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    r[i + 8] = DAVIT_SHUFFLE2(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 16; ++i) {
    if (i & 4) continue;
    vf a = r[i], b = r[i + 4];
    r[i] = DAVIT_SHUFFLE2(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    r[i + 4] = DAVIT_SHUFFLE2(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  }
  for (int i = 0; i < 16; ++i) {
    if (i & 2) continue;
    vf a = r[i], b = r[i + 2];
    r[i] = DAVIT_SHUFFLE2(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
    r[i + 2] = DAVIT_SHUFFLE2(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  for (int i = 0; i < 16; i += 2) {
    vf a = r[i], b = r[i + 1];
    r[i] = DAVIT_SHUFFLE2(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
    r[i + 1] = DAVIT_SHUFFLE2(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  }
}
inline void transpose_block(vf* r) { transpose16(r); }
#else
// 8 x 8 transpose in registers: three stages, each swapping the off-diagonal blocks of size 4, 2, 1 (as
// transpose16 does for 16)
inline void transpose_block(vf* r) {
  for (int i = 0; i < 4; ++i) {
    const vf a = r[i], b = r[i + 4];
    r[i] = DAVIT_SHUFFLE2(a, b, 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = DAVIT_SHUFFLE2(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int i = 0; i < 8; ++i) {
    if (i & 2) continue;
    const vf a = r[i], b = r[i + 2];
    r[i] = DAVIT_SHUFFLE2(a, b, 0, 1, 8, 9, 4, 5, 12, 13);
    r[i + 2] = DAVIT_SHUFFLE2(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 8; i += 2) {
    const vf a = r[i], b = r[i + 1];
    r[i] = DAVIT_SHUFFLE2(a, b, 0, 8, 2, 10, 4, 12, 6, 14);
    r[i + 1] = DAVIT_SHUFFLE2(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
  }
}
#endif

// S^T rows j..j+R-1 (keys k[0..R-1]), columns c0..c0+JV*L-1: S^T[j, i] = k_j . qT[:, i] (qT's rows ldq
// apart, St's lds apart)
template <int D, int R, int JV>
inline void scores_block(const float* const* k, const float* qT, int ldq, float* St, int lds, int c0) {
  vf acc[R][JV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < JV; ++c) acc[r][c] = splat(0.f);
  for (int e = 0; e < D; ++e) {
    vf qv[JV];
    for (int c = 0; c < JV; ++c) {
      qv[c] = vload(qT + e * ldq + c0 + c * L);
      in_register(qv[c]);
    }
    for (int r = 0; r < R; ++r) {
      vf kb = splat(k[r][e]);
      for (int c = 0; c < JV; ++c) acc[r][c] += kb * qv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < JV; ++c) vstore(St + r * lds + c0 + c * L, acc[r][c]);
}

// the scores of R keys against ``cols`` queries (a multiple of L)
template <int D, int R>
inline void scores_rows(const float* const* k, const float* qT, int ldq, float* St, int lds, int cols) {
  int c0 = 0;
  for (; c0 + 4 * L <= cols; c0 += 4 * L) scores_block<D, R, 4>(k, qT, ldq, St, lds, c0);
  switch ((cols - c0) / L) {
    case 3: scores_block<D, R, 3>(k, qT, ldq, St, lds, c0); break;
    case 2: scores_block<D, R, 2>(k, qT, ldq, St, lds, c0); break;
    case 1: scores_block<D, R, 1>(k, qT, ldq, St, lds, c0); break;
    default: break;
  }
}

// output rows i..i+R-1 = (sum_j P^T[j, i] v_j) / sum_j P^T[j, i]
template <int D, int R>
inline void pv_rows(const float* Pt, int ldp, const float* const* vrow, int N, const float* inv,
                    float* const* orow) {
  constexpr int DV = D / L;
  vf acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) acc[r][c] = splat(0.f);
  for (int j = 0; j < N; ++j) {
    vf vv[DV];
    for (int c = 0; c < DV; ++c) {
      vv[c] = vload(vrow[j] + c * L);
      in_register(vv[c]);
    }
    for (int r = 0; r < R; ++r) {
      vf p = splat(Pt[j * ldp + r]);
      for (int c = 0; c < DV; ++c) acc[r][c] += p * vv[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    if (!orow[r]) continue;  // a padding token's query: cropped away
    for (int c = 0; c < DV; ++c) vstore(orow[r] + c * L, acc[r][c] * inv[r]);
  }
}

// asks for the D floats of each of rows[0..N-1] in the cache, one request per line: a window's rows lie in
// ws runs of the map, a head's channels a slice of each token's qkv, which the hardware's prefetchers do
// not foresee (the backward on davit_tiny's first stage 1.08-1.11x as fast, paired rounds, Zen 4)
inline void prefetch_rows(const float* const* rows, int N, int64_t D) {
  for (int i = 0; i < N; ++i)
    for (int64_t e = 0; e < D; e += L) __builtin_prefetch(rows[i] + e);
}

// rows[0..N-1] (D floats each; a null row reads as zeros) transposed into T (D x ldt), L x L at a time in
// registers, the rows beyond the last L one by one; T's columns N..ldt-1 are left as they are (zero: the
// callers clear them once per call)
template <int D>
inline void transpose_rows(const float* const* rows, int N, float* T, int ldt) {
  int i0 = 0;
  for (; i0 + L <= N; i0 += L) {
    for (int e0 = 0; e0 < D; e0 += L) {
      vf r[L];
      for (int k = 0; k < L; ++k) r[k] = rows[i0 + k] ? vload(rows[i0 + k] + e0) : splat(0.f);
      transpose_block(r);
      for (int k = 0; k < L; ++k) vstore(T + (e0 + k) * ldt + i0, r[k]);
    }
  }
  for (int i = i0; i < N; ++i) {
    const float* x = rows[i];
    for (int e = 0; e < D; ++e) T[e * ldt + i] = x ? x[e] : 0.f;
  }
}

// L columns (queries) of an N-row, key-major block of scores, rows ld apart: each replaced by
// exp(scale * (s - its column's max)) in place; returns the columns' sums (the softmax denominators)
inline vf exp_columns(float* col, int ld, int N, float scale) {
  vf m = vload(col);
  for (int j = 1; j < N; ++j) {
    vf x = vload(col + j * ld);
    m = x > m ? x : m;
  }
  vf sum = splat(0.f);
  for (int j = 0; j < N; ++j) {
    vf p = vexp((vload(col + j * ld) - m) * scale);  // scale > 0: the scaled scores' max is m * scale
    sum += p;
    vstore(col + j * ld, p);
  }
  return sum;
}

struct Scratch {
  float* qT;   // D x Np: the window's queries, transposed, zero beyond N
  float* St;   // N x QB: one block's scores, then probabilities, key-major
  float* inv;  // Np: 1 / softmax denominators
  const float** qrow;
  const float** krow;
  const float** vrow;
  float** orow;
};

template <int D>
void one_head(const Scratch& s, int N, float scale) {
  constexpr int RPV = ACC / (D / L) > 0 ? ACC / (D / L) : 1;  // query rows per P v block: ACC accumulators
  const int Np = (N + L - 1) / L * L;
  transpose_rows<D>(s.qrow, N, s.qT, Np);
  // per block of up to QB queries (all of them for windows of up to 64 tokens), so that the block's scores
  // stay in L1 for larger windows (144 tokens: 144 x 144 scores are 83 KB)
  for (int q0 = 0; q0 < Np; q0 += QB) {
    const int cols = Np - q0 < QB ? Np - q0 : QB;
    // unscaled scores: the scale goes into the exponent below, and the keys are read where they are
    int j = 0;
    // with AVX-512 six keys per block (24 accumulators): one load of the queries per 24 FMAs, not per 16 (the
    // forward on davit_tiny's maps 1.04-1.11x as fast in four paired runs; the backward, two products per
    // block, was level); with AVX2's 16 registers two (8 accumulators)
    for (; j + KEYS_FWD <= N; j += KEYS_FWD)
      scores_rows<D, KEYS_FWD>(s.krow + j, s.qT + q0, Np, s.St + j * QB, QB, cols);
    for (; j < N; ++j) scores_rows<D, 1>(s.krow + j, s.qT + q0, Np, s.St + j * QB, QB, cols);
    for (int b = 0; b < cols; b += L) vstore(s.inv + q0 + b, 1.0f / exp_columns(s.St + b, QB, N, scale));
    const int end = q0 + cols < N ? q0 + cols : N;
    int i = q0;
    for (; i + RPV <= end; i += RPV)
      pv_rows<D, RPV>(s.St + (i - q0), QB, s.vrow, N, s.inv + i, s.orow + i);
    for (; i < end; ++i) pv_rows<D, 1>(s.St + (i - q0), QB, s.vrow, N, s.inv + i, s.orow + i);
  }
}

// Runs task(state, b, wy, wx, h) for every (image, window row, window column, head) of a map with nwy x nwx
// windows of N tokens and heads of D channels, on `threads` OpenMP threads with denormals flushed; each
// thread's state is made once by init(scratch, pointers) from `floats` floats and `ptrs` pointers of its own,
// allocated up front (a thread may not skip the work-sharing loop). Returns 0, -1 for a head dim that is not
// built (16, 32, 64, 128 are), -2 for windows of more than 256 tokens, -3 if the memory was not allocated.
template <class Init, class Task>
int for_each_window_head(int64_t B, int64_t nwy, int64_t nwx, int64_t heads, int64_t D, int N, int threads,
                         size_t floats, size_t ptrs, Init init, Task task) {
  if (D != 16 && D != 32 && D != 64 && D != 128) return -1;
  if (N > 256 || N < 1) return -2;
#ifdef _OPENMP
  const int team = threads > 0 ? threads : 1;
#else
  const int team = 1;
  (void)threads;
#endif
  floats = (floats + 15) / 16 * 16;
  float* buf = static_cast<float*>(std::malloc(team * floats * sizeof(float)));
  void** rows = static_cast<void**>(std::malloc(team * ptrs * sizeof(void*)));
  if (!buf || !rows) {
    std::free(buf);
    std::free(rows);
    return -3;
  }
  const int64_t tasks = B * nwy * nwx * heads;
#pragma omp parallel num_threads(team)
  {
    FlushDenormals ftz;
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    auto state = init(buf + tid * floats, rows + tid * ptrs);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t h = t % heads, w = t / heads;
      task(state, w / (nwx * nwy), (w / nwx) % nwy, w % nwx, h);
    }
  }
  std::free(buf);
  std::free(rows);
  return 0;
}

}  // namespace

extern "C" {

// Kernel ABI version; native.py refuses a library that reports another.
int davit_native_abi(void) { return 9; }

// The width in bits of the vector registers the library is built for: 512 (AVX-512), 256 (AVX2 with FMA), or
// 0 for other targets (SSE only, non-x86), where the kernels are unmeasured and native.py leaves them off by
// default. On the first two they were measured faster than torch's ops (docs/benchmarks.md, session 48).
int davit_native_vector_bits(void) {
#if defined(__AVX512F__)
  return 512;
#elif defined(__AVX2__) && defined(__FMA__)
  return 256;
#else
  return 0;
#endif
}

// qkv: (B, Hp, Wp, 3C) contiguous, Hp and Wp multiples of ws, channels [q | k | v], each head's D channels
// contiguous in each (C = heads * D). out: (B, Ho, Wo, C) contiguous, Ho <= Hp, Wo <= Wp: each window's
// rows and columns beyond Ho / Wo (padding tokens) are read as keys and values but not written.
// Returns 0, or -1 for an unsupported head dim (16, 32, 64, 128 are built), -2 for too many tokens per window
// (more than 256), -3 if scratch memory could not be allocated.
int davit_window_attention_f32(const float* qkv, float* out, int64_t B, int64_t Hp, int64_t Wp, int64_t Ho,
                               int64_t Wo, int64_t ws, int64_t heads, int64_t D, int threads) {
  const int N = int(ws * ws);
  const int Np = (N + L - 1) / L * L;
  const int64_t C = heads * D, nwy = Hp / ws, nwx = Wp / ws;
  const float scale = 1.0f / std::sqrt(float(D));
  auto init = [&](float* mine, void** r) {
    const float** p = static_cast<const float**>(static_cast<void*>(r));
    Scratch s{mine, mine + size_t(D) * Np, mine + size_t(D) * Np + size_t(N) * QB, p, p + N, p + 2 * N,
              static_cast<float**>(static_cast<void*>(r + 3 * N))};
    std::memset(mine, 0, size_t(D) * Np * sizeof(float));  // qT's columns beyond N: zero for every task
    return s;
  };
  auto task = [&](Scratch& s, int64_t b, int64_t wy, int64_t wx, int64_t h) {
    for (int i = 0; i < N; ++i) {
      const int64_t y = wy * ws + i / ws, x = wx * ws + i % ws;
      const float* row = qkv + ((b * Hp + y) * Wp + x) * 3 * C + h * D;
      s.qrow[i] = row;
      s.krow[i] = row + C;
      s.vrow[i] = row + 2 * C;
      s.orow[i] = (y < Ho && x < Wo) ? out + ((b * Ho + y) * Wo + x) * C + h * D : nullptr;
    }
    prefetch_rows(s.krow, N, D);  // the keys and values arrive while the queries are transposed
    prefetch_rows(s.vrow, N, D);
    switch (D) {
      case 16: one_head<16>(s, N, scale); break;
      case 32: one_head<32>(s, N, scale); break;
      case 64: one_head<64>(s, N, scale); break;
      default: one_head<128>(s, N, scale); break;
    }
  };
  const size_t floats = size_t(D) * Np + size_t(N) * QB + Np;
  return for_each_window_head(B, nwy, nwx, heads, D, N, threads, floats, 4 * size_t(N), init, task);
}

}  // extern "C"

namespace {

// sum of the lanes by halving (log2 L shuffles), not lane by lane
inline float hsum(vf v) {
#if !defined(__AVX512F__) && defined(__clang__)
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
#elif !defined(__AVX512F__)
  v += __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, (vi){2, 3, 0, 1, 6, 7, 4, 5});
  v += __builtin_shuffle(v, (vi){1, 0, 3, 2, 5, 4, 7, 6});
#elif defined(__clang__)
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#else
  v += __builtin_shuffle(v, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
#endif
  return v[0];
}

// A row's sums are kept in 16 lanes on every build (NSUM vectors of L), so that they add up in the same
// order, and as exactly, as with AVX-512's one vector: with 8 (AVX2), layer norm's mean over 768 channels
// of mean 50 had twice ATen's error (tests/layers/test_native.py)
constexpr int NSUM = 16 / L;

inline vf fold(const vf* acc) {
  vf t = acc[0];
  for (int k = 1; k < NSUM; ++k) t += acc[k];
  return t;
}

void layer_norm_row(const float* x, float* y, const float* w, const float* b, int64_t C, float eps,
                    float* mean_out = nullptr, float* rstd_out = nullptr) {
  const int64_t Cv = C / L * L;
  vf acc[NSUM];
  for (int k = 0; k < NSUM; ++k) acc[k] = splat(0.f);
  float tail = 0.f;
  int64_t c = 0;
  for (; c + NSUM * L <= Cv; c += NSUM * L)
    for (int k = 0; k < NSUM; ++k) acc[k] += vload(x + c + k * L);
  for (; c < Cv; c += L) acc[0] += vload(x + c);
  for (c = Cv; c < C; ++c) tail += x[c];
  const float mean = (hsum(fold(acc)) + tail) / float(C);
  for (int k = 0; k < NSUM; ++k) acc[k] = splat(0.f);
  tail = 0.f;
  for (c = 0; c + NSUM * L <= Cv; c += NSUM * L)
    for (int k = 0; k < NSUM; ++k) {
      const vf d = vload(x + c + k * L) - mean;
      acc[k] += d * d;
    }
  for (; c < Cv; c += L) {
    const vf d = vload(x + c) - mean;
    acc[0] += d * d;
  }
  for (c = Cv; c < C; ++c) tail += (x[c] - mean) * (x[c] - mean);
  const float rstd = 1.0f / std::sqrt((hsum(fold(acc)) + tail) / float(C) + eps);
  if (mean_out) *mean_out = mean;
  if (rstd_out) *rstd_out = rstd;
  for (int64_t c = 0; c < Cv; c += L) {
    vf t = (vload(x + c) - mean) * rstd;
    if (w) t = t * vload(w + c);
    if (b) t = t + vload(b + c);
    vstore(y + c, t);
  }
  for (int64_t c = Cv; c < C; ++c) {
    float t = (x[c] - mean) * rstd;
    if (w) t *= w[c];
    if (b) t += b[c];
    y[c] = t;
  }
}

}  // namespace

extern "C" {

// y = layer_norm(x) over rows of C (x and y contiguous, may be the same); w, b may be null. Two passes over
// each row (mean, then the variance about it), as exact as torch's; ~2x ATen's speed for rows of 96-192
// (the horizontal sums by shuffles), 1.2x for longer ones (bound by memory there).
// With mean and rstd not null (training) each row's mean and 1 / sqrt(variance + eps) go there too.
int davit_layer_norm_f32(const float* x, float* y, const float* w, const float* b, float* mean, float* rstd,
                         int64_t rows, int64_t C, float eps, int threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    layer_norm_row(x + r * C, y + r * C, w, b, C, eps, mean ? mean + r : nullptr, rstd ? rstd + r : nullptr);
  return 0;
}

// The backward of the above for rows of C (a multiple of 16), with the gradient of a residual stream added:
// gx = rstd (u - mean(u) - xh mean(u xh)) + gs, u = gn w (gn where w is null), xh = (x - mean) rstd; gs may
// be null (nothing added). Where gw / gb are not null, the column sums of gn xh / gn, per fixed group of
// rows, then the groups in order (independent of the thread count). Why: a residual block's norm gets the
// stream's gradient from the skip and from its own branch; torch's backward and autograd's sum of the two
// are two passes (read x and gn, write; read both, write), here one. Returns 0, -1 unless C is a positive
// multiple of 16, -3 if scratch memory could not be allocated.
int davit_layer_norm_backward_f32(const float* x, const float* w, const float* mean, const float* rstd,
                                  const float* gn, const float* gs, float* gx, float* gw, float* gb,
                                  int64_t rows, int64_t C, int threads) {
  if (C % (NSUM * L) || C <= 0 || rows < 0) return -1;
  const bool sums = gw || gb;
  const int64_t per = sums ? std::max<int64_t>((rows + 63) / 64, 16) : 16;
  const int64_t groups = (rows + per - 1) / per;
  float* part = sums && groups ? static_cast<float*>(std::malloc(groups * 2 * C * sizeof(float))) : nullptr;
  if (sums && groups && !part) return -3;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
  for (int64_t grp = 0; grp < groups; ++grp) {
    const int64_t r0 = grp * per, r1 = std::min(r0 + per, rows);
    float* sw = part ? part + grp * 2 * C : nullptr;  // this group's sums of gn xh, then of gn
    if (sw) std::memset(sw, 0, 2 * C * sizeof(float));
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * C;
      const float* gr = gn + r * C;
      const vf mu = splat(mean[r]), rs = splat(rstd[r]);
      vf s1[NSUM], s2[NSUM];
      for (int k = 0; k < NSUM; ++k) s1[k] = s2[k] = splat(0.f);
      for (int64_t c0 = 0; c0 < C; c0 += NSUM * L)  // (C: a multiple of 16)
        for (int k = 0; k < NSUM; ++k) {
          const int64_t c = c0 + k * L;
          const vf xh = (vload(xr + c) - mu) * rs;
          const vf g = vload(gr + c);
          const vf u = w ? g * vload(w + c) : g;
          s1[k] += u;
          s2[k] += u * xh;
          if (sw) {
            vstore(sw + c, vload(sw + c) + g * xh);
            vstore(sw + C + c, vload(sw + C + c) + g);
          }
        }
      const vf a1 = splat(hsum(fold(s1)) / float(C)), a2 = splat(hsum(fold(s2)) / float(C));
      float* out = gx + r * C;
      const float* skip = gs ? gs + r * C : nullptr;
      for (int64_t c = 0; c < C; c += L) {
        const vf xh = (vload(xr + c) - mu) * rs;
        const vf g = vload(gr + c);
        const vf u = w ? g * vload(w + c) : g;
        vf d = rs * (u - a1 - xh * a2);
        if (skip) d += vload(skip + c);
        vstore(out + c, d);
      }
    }
  }
  if (sums) {
    for (int64_t c = 0; c < C; c += L) {
      vf s = splat(0.f), t = splat(0.f);
      for (int64_t grp = 0; grp < groups; ++grp) {
        s += vload(part + grp * 2 * C + c);
        t += vload(part + grp * 2 * C + C + c);
      }
      if (gw) vstore(gw + c, s);
      if (gb) vstore(gb + c, t);
    }
  }
  std::free(part);
  return 0;
}

}  // extern "C"

namespace {

// out rows r = sum_i M[r * ldm + i] * x_i over i < n (a null x_i adds nothing), R rows at once
template <int D, int R>
inline void combine_rows(const float* M, int ldm, const float* const* xrow, int n, float* const* orow) {
  constexpr int DV = D / L;
  vf acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) acc[r][c] = splat(0.f);
  for (int i = 0; i < n; ++i) {
    if (!xrow[i]) continue;
    vf xv[DV];
    for (int c = 0; c < DV; ++c) {
      xv[c] = vload(xrow[i] + c * L);
      in_register(xv[c]);
    }
    for (int r = 0; r < R; ++r) {
      vf m = splat(M[r * ldm + i]);
      for (int c = 0; c < DV; ++c) acc[r][c] += m * xv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) vstore(orow[r] + c * L, acc[r][c]);
}

struct BackScratch {
  float* qT;   // D x Np: queries, transposed
  float* gT;   // D x Np: output gradients, transposed (zero for padding queries)
  float* Pt;   // N x Np: probabilities, key-major
  float* dSt;  // N x Np: dP^T, then the logits' gradient (times the scale)
  float* Di;   // Np: rowsum(dO * O) per query
  float* ones; // Np: ones (P v's row scale, unused here)
  const float** qrow;
  const float** krow;
  const float** vrow;
  const float** orow;  // null: a padding query (no output, no gradient)
  const float** grow;
  float** dqrow;
  float** dkrow;
  float** dvrow;
};

// one (window, head) of the backward: recompute P = softmax(scale q k^T) as the forward does, then
// dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q
template <int D>
void one_head_backward(const BackScratch& s, int N, float scale) {
  constexpr int DV = D / L;
  constexpr int R = ACC / DV > 0 ? ACC / DV : 1;  // output rows per block: ACC accumulators
  const int Np = (N + L - 1) / L * L;
  transpose_rows<D>(s.qrow, N, s.qT, Np);
  transpose_rows<D>(s.grow, N, s.gT, Np);
  for (int i = 0; i < N; ++i) {
    float d = 0.f;
    if (s.grow[i]) {
      vf acc = splat(0.f);
      for (int c = 0; c < DV; ++c) acc += vload(s.grow[i] + c * L) * vload(s.orow[i] + c * L);
      d = hsum(acc);
    }
    s.Di[i] = d;
  }
  // S^T = K Q^T and dP^T = V dO^T, all Np columns (those beyond N are zero queries: never read back)
  int j = 0;
  for (; j + KEYS_BWD <= N; j += KEYS_BWD) {
    scores_rows<D, KEYS_BWD>(s.krow + j, s.qT, Np, s.Pt + j * Np, Np, Np);
    scores_rows<D, KEYS_BWD>(s.vrow + j, s.gT, Np, s.dSt + j * Np, Np, Np);
  }
  for (; j < N; ++j) {
    scores_rows<D, 1>(s.krow + j, s.qT, Np, s.Pt + j * Np, Np, Np);
    scores_rows<D, 1>(s.vrow + j, s.gT, Np, s.dSt + j * Np, Np, Np);
  }
  for (int b = 0; b < Np; b += L) {
    float* col = s.Pt + b;
    const vf inv = 1.0f / exp_columns(col, Np, N, scale), di = vload(s.Di + b);
    for (j = 0; j < N; ++j) {
      vf p = vload(col + j * Np) * inv;
      vstore(col + j * Np, p);
      float* ds = s.dSt + b + j * Np;
      vstore(ds, p * (vload(ds) - di) * scale);
    }
  }
  // dV_j = sum_i P^T[j, i] dO_i and dK_j = sum_i dS^T[j, i] q_i: key rows, R at a time
  j = 0;
  for (; j + R <= N; j += R) {
    combine_rows<D, R>(s.Pt + j * Np, Np, s.grow, N, s.dvrow + j);
    combine_rows<D, R>(s.dSt + j * Np, Np, s.qrow, N, s.dkrow + j);
  }
  for (; j < N; ++j) {
    combine_rows<D, 1>(s.Pt + j * Np, Np, s.grow, N, s.dvrow + j);
    combine_rows<D, 1>(s.dSt + j * Np, Np, s.qrow, N, s.dkrow + j);
  }
  // dQ_i = sum_j dS^T[j, i] k_j: the forward's P v on dS^T (padding queries' columns are zero)
  int i = 0;
  for (; i + R <= N; i += R) pv_rows<D, R>(s.dSt + i, Np, s.krow, N, s.ones + i, s.dqrow + i);
  for (; i < N; ++i) pv_rows<D, 1>(s.dSt + i, Np, s.krow, N, s.ones + i, s.dqrow + i);
}

}  // namespace

extern "C" {

// The gradient of davit_window_attention_f32: qkv (B, Hp, Wp, 3C) as there, out and dout (B, Ho, Wo, C) its
// output and the output's gradient, dqkv (B, Hp, Wp, 3C) the gradient written, every element of it (padding
// tokens' queries get zeros, their keys and values their share). Returns 0, -1 / -2 / -3 as the forward.
int davit_window_attention_backward_f32(const float* qkv, const float* out, const float* dout, float* dqkv,
                                        int64_t B, int64_t Hp, int64_t Wp, int64_t Ho, int64_t Wo, int64_t ws,
                                        int64_t heads, int64_t D, int threads) {
  const int N = int(ws * ws);
  const int Np = (N + L - 1) / L * L;
  const int64_t C = heads * D, nwy = Hp / ws, nwx = Wp / ws;
  const float scale = 1.0f / std::sqrt(float(D));
  auto init = [&](float* mine, void** r) {
    BackScratch s;
    s.qT = mine;
    s.gT = s.qT + size_t(D) * Np;
    s.Pt = s.gT + size_t(D) * Np;
    s.dSt = s.Pt + size_t(N) * Np;
    s.Di = s.dSt + size_t(N) * Np;
    s.ones = s.Di + Np;
    s.qrow = static_cast<const float**>(static_cast<void*>(r));
    s.krow = s.qrow + N;
    s.vrow = s.krow + N;
    s.orow = s.vrow + N;
    s.grow = s.orow + N;
    s.dqrow = static_cast<float**>(static_cast<void*>(r + 5 * size_t(N)));
    s.dkrow = s.dqrow + N;
    s.dvrow = s.dkrow + N;
    std::memset(mine, 0, 2 * size_t(D) * Np * sizeof(float));  // the transposes' columns beyond N: zero
    for (int i = 0; i < Np; ++i) {
      s.Di[i] = 0.f;
      s.ones[i] = 1.f;
    }
    return s;
  };
  auto task = [&](BackScratch& s, int64_t b, int64_t wy, int64_t wx, int64_t h) {
    for (int i = 0; i < N; ++i) {
      const int64_t y = wy * ws + i / ws, x = wx * ws + i % ws;
      const int64_t at = ((b * Hp + y) * Wp + x) * 3 * C + h * D;
      s.qrow[i] = qkv + at;
      s.krow[i] = qkv + at + C;
      s.vrow[i] = qkv + at + 2 * C;
      s.dqrow[i] = dqkv + at;
      s.dkrow[i] = dqkv + at + C;
      s.dvrow[i] = dqkv + at + 2 * C;
      const bool real = y < Ho && x < Wo;
      const int64_t o = ((b * Ho + y) * Wo + x) * C + h * D;
      s.orow[i] = real ? out + o : nullptr;
      s.grow[i] = real ? dout + o : nullptr;
    }
    prefetch_rows(s.krow, N, D);  // the keys and values arrive while the queries are transposed
    prefetch_rows(s.vrow, N, D);
    switch (D) {
      case 16: one_head_backward<16>(s, N, scale); break;
      case 32: one_head_backward<32>(s, N, scale); break;
      case 64: one_head_backward<64>(s, N, scale); break;
      default: one_head_backward<128>(s, N, scale); break;
    }
  };
  const size_t floats = 2 * size_t(D) * Np + 2 * size_t(N) * Np + 2 * Np;
  return for_each_window_head(B, nwy, nwx, heads, D, N, threads, floats, 8 * size_t(N), init, task);
}

}  // extern "C"

// ----- conditional position encoding: y = x + b + depthwise_conv3x3(x), forward and backward ---------------
//
// Why a kernel of our own: DaViT adds this to the residual stream twice per block. torch runs it as oneDNN's
// depthwise convolution into a fresh map, then the add as a second pass; the backward as oneDNN's convolution
// backward (input and weight gradients) plus autograd's gradient sum. Both are a few FLOPs per byte, and
// here each is one pass over the map: the taps of one channel block sit in registers while a row of the
// (B, H, W, C) map streams through them.
namespace {

// the taps of a (C, 1, 3, 3) depthwise weight as rows of C (tap-major), so that one tap of one channel block
// is one vector load; flipped (tap 8 - k), they are the taps of the transposed convolution
void taps_by_row(const float* w, int64_t C, bool flip, float* t) {
  for (int64_t c = 0; c < C; ++c)
    for (int k = 0; k < 9; ++k) t[(flip ? 8 - k : k) * C + c] = w[c * 9 + k];
}

// the rows h - 1, h, h + 1 of the image holding map row r = b * H + h (null outside the image: zero padding)
inline void three_rows(const float* m, int64_t r, int64_t H, int64_t rowlen, const float* rows[3]) {
  const int64_t h = r % H;
  for (int e = 0; e < 3; ++e) {
    const int64_t hh = h + e - 1;
    rows[e] = (hh >= 0 && hh < H) ? m + (r + e - 1) * rowlen : nullptr;
  }
}

// sum over the 3 x 3 neighbourhood of column j of taps[e * 3 + m] * rows[e][(j + m - 1) * C] for one channel
// block (rows already offset to it); columns outside 0..W-1 are zero padding
inline vf taps_at(const vf* taps, const float* const* rows, int64_t j, int64_t W, int64_t C, vf acc) {
  for (int e = 0; e < 3; ++e) {
    if (!rows[e]) continue;
    const float* p = rows[e] + j * C;
    if (j > 0) acc += taps[3 * e] * vload(p - C);
    acc += taps[3 * e + 1] * vload(p);
    if (j + 1 < W) acc += taps[3 * e + 2] * vload(p + C);
  }
  return acc;
}

int omp_team(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : 1;
#else
  (void)threads;
  return 1;
#endif
}

}  // namespace

extern "C" {

// x, y: (B, H, W, C) contiguous, distinct; w: (C, 1, 3, 3) contiguous; b: (C) or null. Zero padding 1.
// y = x + (b + conv(x)), each output element's taps summed in row order. Returns 0, -1 unless C is a multiple
// of 16 and the sizes positive, -3 if scratch memory could not be allocated.
int davit_pos_enc_f32(const float* x, const float* w, const float* b, float* y, int64_t B, int64_t H,
                      int64_t W, int64_t C, int threads) {
  if (C % 16 || C <= 0 || B <= 0 || H <= 0 || W <= 0) return -1;
  float* taps = static_cast<float*>(std::malloc(9 * C * sizeof(float)));
  if (!taps) return -3;
  taps_by_row(w, C, false, taps);
  const int64_t rowlen = W * C;
#pragma omp parallel for num_threads(omp_team(threads)) schedule(static)
  for (int64_t r = 0; r < B * H; ++r) {
    const float* rows[3];
    three_rows(x, r, H, rowlen, rows);
    float* out = y + r * rowlen;
    // the map row two below (read from the next row on), asked for line by line as this row's same lines
    // are read: see davit_pos_enc_backward_f32 (the forward per call on davit_tiny's first two maps after
    // another pass over 64 MB: 1.05-1.29x as fast)
    const float* ahead = x + std::min(r + 2, B * H - 1) * rowlen;
    for (int64_t c = 0; c < C; c += L) {
      vf k[9];
      for (int t = 0; t < 9; ++t) k[t] = vload(taps + t * C + c);
      const vf bias = b ? vload(b + c) : splat(0.f);
      const float* in[3] = {rows[0] ? rows[0] + c : nullptr, rows[1] + c, rows[2] ? rows[2] + c : nullptr};
      for (int64_t j = 0; j < W; ++j) {
        __builtin_prefetch(ahead + j * C + c);
        vstore(out + j * C + c, vload(in[1] + j * C) + taps_at(k, in, j, W, C, bias));
      }
    }
  }
  std::free(taps);
  return 0;
}

// The gradients of davit_pos_enc_f32 given g = dL/dy ((B, H, W, C) contiguous): dx = g + conv^T(g) (the
// flipped taps), dw[c, 0, ky, kx] = sum g[.., c] * x[shifted by (ky - 1, kx - 1), c], db = sum g. Any of dx,
// dw, db may be null (not wanted). dw and db are summed per fixed group of map rows, then the groups in
// order: the result does not depend on the thread count. Returns 0, -1 / -3 as the forward.
int davit_pos_enc_backward_f32(const float* x, const float* w, const float* g, float* dx, float* dw,
                               float* db, int64_t B, int64_t H, int64_t W, int64_t C, int threads) {
  if (C % 16 || C <= 0 || B <= 0 || H <= 0 || W <= 0) return -1;
  const int64_t rows_total = B * H, rowlen = W * C;
  const bool params = dw || db;
  // groups of map rows for the parameter sums: at most 64 of at least 4 rows (fewer partial sums to add up
  // on small maps), their size set by the map alone; without parameter gradients, one row each
  const int64_t per = params ? std::max<int64_t>((rows_total + 63) / 64, 4) : 1;
  const int64_t groups = (rows_total + per - 1) / per;
  float* taps = static_cast<float*>(std::malloc(9 * C * sizeof(float)));
  float* part = params ? static_cast<float*>(std::malloc(groups * 10 * C * sizeof(float))) : nullptr;
  if (!taps || (params && !part)) {
    std::free(taps);
    std::free(part);
    return -3;
  }
  taps_by_row(w, C, true, taps);
#pragma omp parallel for num_threads(omp_team(threads)) schedule(static)
  for (int64_t grp = 0; grp < groups; ++grp) {
    const int64_t r0 = grp * per, r1 = std::min(r0 + per, rows_total);
    // row by row, all channel blocks of a row before the next row; each block's parameter sums wait in this
    // group's row of `part` in between (the same order of additions per channel as block by block)
    float* mine = params ? part + grp * 10 * C : nullptr;
    if (mine) std::memset(mine, 0, 10 * C * sizeof(float));
    for (int64_t r = r0; r < r1; ++r) {
      const float *gr[3], *xr[3];
      three_rows(g, r, H, rowlen, gr);
      three_rows(x, r, H, rowlen, xr);
      // the rows two below, asked for line by line as this row's same lines are read. In a training step
      // the saved input and often the gradient come from memory, not cache, and a channel block's reads
      // step through a row C floats apart, which the hardware's prefetchers do not foresee: on davit_tiny's
      // maps after another pass over 64 MB, 1.14-1.39x as fast per call, and with the forward's prefetch its
      // eager training step 1.011x (13 paired rounds, quartiles 1.006-1.019, benchmarks/kernels_ab.py; Zen 4)
      const int64_t below = std::min(r + 2, rows_total - 1) * rowlen;
      const float* gnext = g + below;
      const float* xnext = params ? x + below : nullptr;
      for (int64_t c = 0; c < C; c += L) {
        vf k[9], acc[9];
        for (int t = 0; t < 9; ++t) {
          k[t] = vload(taps + t * C + c);
          acc[t] = mine ? vload(mine + t * C + c) : splat(0.f);
        }
        vf bacc = mine ? vload(mine + 9 * C + c) : splat(0.f);
        const float* gin[3] = {gr[0] ? gr[0] + c : nullptr, gr[1] + c, gr[2] ? gr[2] + c : nullptr};
        const float* xin[3] = {xr[0] ? xr[0] + c : nullptr, xr[1] + c, xr[2] ? xr[2] + c : nullptr};
        float* out = dx ? dx + r * rowlen + c : nullptr;
        for (int64_t j = 0; j < W; ++j) {
          __builtin_prefetch(gnext + j * C + c);
          if (xnext) __builtin_prefetch(xnext + j * C + c);
          const vf gj = vload(gin[1] + j * C);
          if (out) vstore(out + j * C, gj + taps_at(k, gin, j, W, C, splat(0.f)));
          if (!params) continue;
          bacc += gj;
          for (int e = 0; e < 3; ++e) {
            if (!xin[e]) continue;
            const float* p = xin[e] + j * C;
            if (j > 0) acc[3 * e] += gj * vload(p - C);
            acc[3 * e + 1] += gj * vload(p);
            if (j + 1 < W) acc[3 * e + 2] += gj * vload(p + C);
          }
        }
        if (mine) {
          for (int t = 0; t < 9; ++t) vstore(mine + t * C + c, acc[t]);
          vstore(mine + 9 * C + c, bacc);
        }
      }
    }
  }
  if (params) {
#pragma omp parallel for num_threads(omp_team(threads)) schedule(static)
    for (int64_t c = 0; c < C; c += L) {
      vf s[10];
      for (int t = 0; t < 10; ++t) s[t] = splat(0.f);
      for (int64_t grp = 0; grp < groups; ++grp)
        for (int t = 0; t < 10; ++t) s[t] += vload(part + (grp * 10 + t) * C + c);
      for (int l = 0; l < L; ++l) {
        if (dw)
          for (int t = 0; t < 9; ++t) dw[(c + l) * 9 + t] = s[t][l];
        if (db) db[c + l] = s[9][l];
      }
    }
  }
  std::free(taps);
  std::free(part);
  return 0;
}

}  // extern "C"

// ----- exact GELU with the bias of the linear before it: forward, and backward with the bias gradient ------
//
// Why: in compiled CPU training inductor's GELU kernels (bias add and GELU; GELU's backward and the bias
// gradient's sum) took 101 ms of a davit_tiny step at batch 8 on a 2-core AVX-512 VM, these 80 ms for the
// same passes (paired profiles): GELU's erf here is one rational function with one division, and the
// backward's column sums are accumulated per group of rows while the rows stream through.
namespace {

// erf(z): a rational function of z^2 times z on [-4, 4] (erf is +-1 to fp32 beyond), about 1 ulp
inline vf verf(vf z) {
  z = z < splat(-4.f) ? splat(-4.f) : z;
  z = z > splat(4.f) ? splat(4.f) : z;
  const vf z2 = z * z;
  vf p = splat(-2.72614225801306e-10f);
  p = p * z2 + 2.77068142495902e-08f;
  p = p * z2 + -2.10102402082508e-06f;
  p = p * z2 + -5.69250639462346e-05f;
  p = p * z2 + -7.34990630326855e-04f;
  p = p * z2 + -2.95459980854025e-03f;
  p = p * z2 + -1.60960333262415e-02f;
  vf q = splat(-1.45660718464996e-05f);
  q = q * z2 + -2.13374055278905e-04f;
  q = q * z2 + -1.68282697438203e-03f;
  q = q * z2 + -7.37332916720468e-03f;
  q = q * z2 + -1.42647390514189e-02f;
  return z * p / q;
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

inline vf vgelu(vf x) { return 0.5f * x * (1.0f + verf(x * kSqrtHalf)); }

// d gelu / dx = Phi(x) + x phi(x)
inline vf vgelu_grad(vf x) {
  const vf cdf = 0.5f * (1.0f + verf(x * kSqrtHalf));
  return cdf + x * (vexp(-0.5f * x * x) * kInvSqrt2Pi);
}

}  // namespace

extern "C" {

// h = gelu(a + b) over `rows` rows of C (a, h contiguous; h may be a; b (C) or null), and where d is not null
// d = gelu'(a + b) (d may be a, not h): then a backward is one multiply, which a GEMM's epilogue can do (the
// MLP function's, davit.layers.fused.train_mlp). Returns 0, or -1 unless C is a positive multiple of 16.
int davit_bias_gelu_f32(const float* a, const float* b, float* h, float* d, int64_t rows, int64_t C,
                        int threads) {
  if (C % 16 || C <= 0 || rows < 0) return -1;
#pragma omp parallel for num_threads(omp_team(threads)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = a + r * C;
    float* out = h + r * C;
    float* grad = d ? d + r * C : nullptr;
    for (int64_t c = 0; c < C; c += L) {
      const vf x = b ? vload(in + c) + vload(b + c) : vload(in + c);
      if (grad) {
        // one erf for both: gelu = x Phi(x), gelu' = Phi(x) + x phi(x)
        const vf cdf = 0.5f * (1.0f + verf(x * kSqrtHalf));
        vstore(out + c, x * cdf);
        vstore(grad + c, cdf + x * (vexp(-0.5f * x * x) * kInvSqrt2Pi));
      } else {
        vstore(out + c, vgelu(x));
      }
    }
  }
  return 0;
}

// da = dh * gelu'(a + b) (da may be dh), and db = the column sums of da where db is not null, summed per
// fixed group of rows, then the groups in order (independent of the thread count). Returns 0, -1 as the
// forward, -3 if scratch memory could not be allocated.
int davit_bias_gelu_backward_f32(const float* a, const float* b, const float* dh, float* da, float* db,
                                 int64_t rows, int64_t C, int threads) {
  if (C % 16 || C <= 0 || rows < 0) return -1;
  // groups of rows: at most 64 of at least 16 for the bias gradient's partial sums (their size set by the
  // shape alone), 16 rows each without it
  const int64_t per = db ? std::max<int64_t>((rows + 63) / 64, 16) : 16;
  const int64_t groups = (rows + per - 1) / per;
  float* part = db && groups ? static_cast<float*>(std::malloc(groups * C * sizeof(float))) : nullptr;
  if (db && groups && !part) return -3;
#pragma omp parallel for num_threads(omp_team(threads)) schedule(static)
  for (int64_t grp = 0; grp < groups; ++grp) {
    // row by row (streaming, as the rows lie in memory), each group's column sums in its own row of `part`
    const int64_t r0 = grp * per, r1 = std::min(r0 + per, rows);
    float* sums = part ? part + grp * C : nullptr;
    if (sums) std::memset(sums, 0, C * sizeof(float));
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < C; c += L) {
        const vf bias = b ? vload(b + c) : splat(0.f);
        const vf d = vload(dh + r * C + c) * vgelu_grad(vload(a + r * C + c) + bias);
        vstore(da + r * C + c, d);
        if (sums) vstore(sums + c, vload(sums + c) + d);
      }
    }
  }
  if (db) {
    for (int64_t c = 0; c < C; c += L) {
      vf s = splat(0.f);
      for (int64_t grp = 0; grp < groups; ++grp) s += vload(part + grp * C + c);
      vstore(db + c, s);
    }
  }
  std::free(part);
  return 0;
}

}  // extern "C"

// ----- channel group attention: per image and group, A = softmax(s Q^T K) (D x D), out = V A^T -----------
//
// Why a kernel of our own: the (D x D) logits are sums over all N tokens of an image, so torch runs them as
// batched matmuls with tiny outputs and long reductions (about 30 GFLOP/s for davit_tiny's first stage on a
// 2-core AVX-512 VM), on (B, G, N, D) operands that strided views of qkv cannot give it without copies, and
// the backward adds transposed copies and a softmax backward pass. Here the logits are sums of outer products
// over the tokens (8 rows x 32 columns of accumulators) per chunk of tokens, added in a fixed order, the
// D x D softmax is vectorised, and out = V A^T is one pass over the tokens; the operands are read in place
// from qkv's column blocks (roles: the query, key and value chunks of qkv by index, as the caller's
// formulation has them).

namespace {

// S[i0 + r][:] (+)= sum_n X[n * ldx + i0 + r] * Y[n * ldy + :] for r < R (D columns of S); `first`: =
template <int D, int R>
inline void outer_rows(const float* X, int64_t ldx, const float* Y, int64_t ldy, int64_t N, int i0, float* S,
                       bool first) {
  constexpr int DV = D / L;
  vf acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) acc[r][c] = first ? splat(0.f) : vload(S + (i0 + r) * D + c * L);
  for (int64_t n = 0; n < N; ++n) {
    vf yv[DV];
    for (int c = 0; c < DV; ++c) {
      yv[c] = vload(Y + n * ldy + c * L);
      in_register(yv[c]);
    }
    const float* x = X + n * ldx + i0;
    for (int r = 0; r < R; ++r) {
      const vf xb = splat(x[r]);
      for (int c = 0; c < DV; ++c) acc[r][c] += xb * yv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) vstore(S + (i0 + r) * D + c * L, acc[r][c]);
}

// Y[r][:] = sum_j X[r * ldx + j] * M[j][:] for r < R (M: D x D)
template <int D, int R>
inline void apply_rows(const float* X, int64_t ldx, const float* M, float* Y, int64_t ldy) {
  constexpr int DV = D / L;
  vf acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) acc[r][c] = splat(0.f);
  for (int j = 0; j < D; ++j) {
    vf mv[DV];
    for (int c = 0; c < DV; ++c) {
      mv[c] = vload(M + j * D + c * L);
      in_register(mv[c]);
    }
    for (int r = 0; r < R; ++r) {
      const vf xb = splat(X[r * ldx + j]);
      for (int c = 0; c < DV; ++c) acc[r][c] += xb * mv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) vstore(Y + r * ldy + c * L, acc[r][c]);
}

// each row of the D x D logits S replaced by softmax(scale * row) (scale > 0)
template <int D>
void softmax_rows(float* S, float scale) {
  constexpr int DV = D / L;
  for (int i = 0; i < D; ++i) {
    float* row = S + i * D;
    float m = row[0];
    for (int j = 1; j < D; ++j) m = row[j] > m ? row[j] : m;
    vf e[DV];
    vf sum = splat(0.f);
    for (int c = 0; c < DV; ++c) {
      e[c] = vexp((vload(row + c * L) - m) * scale);
      sum += e[c];
    }
    const float inv = 1.0f / hsum(sum);
    for (int c = 0; c < DV; ++c) vstore(row + c * L, e[c] * inv);
  }
}

template <int D>
void transpose_square(const float* A, float* T) {
  for (int i = 0; i < D; ++i)
    for (int j = 0; j < D; ++j) T[j * D + i] = A[i * D + j];
}

constexpr int64_t CHUNK = 256;  // tokens per task: a fixed split, so sums do not depend on the thread count

// P[g] (D x D, for each of the G groups) = X_g^T Y_g over `rows` rows, X_g and Y_g a group's D columns of X
// and Y: blocks of 64 rows, each block's rows (all groups' columns: whole cache lines, read once from
// memory) in L1 / L2 while every group's bands of accumulators pass over them
template <int D>
void outer_chunk(const float* X, int64_t ldx, const float* Y, int64_t ldy, int64_t rows, int64_t G,
                 float* P) {
  constexpr int R = ACC / (D / L) > 0 ? ACC / (D / L) : 1;
  constexpr int64_t NB = 64;
  for (int64_t n0 = 0; n0 < rows; n0 += NB) {
    const int64_t nb = rows - n0 < NB ? rows - n0 : NB;
    for (int64_t g = 0; g < G; ++g)
      for (int i0 = 0; i0 < D; i0 += R)
        outer_rows<D, R>(X + n0 * ldx + g * D, ldx, Y + n0 * ldy + g * D, ldy, nb, i0, P + g * D * D,
                         n0 == 0);
  }
}

// Y_g = X_g M_g for every group g over `rows` rows (M: G matrices of D x D), row block by row block
template <int D>
void apply_chunk(const float* X, int64_t ldx, const float* M, float* Y, int64_t ldy, int64_t rows,
                 int64_t G) {
  constexpr int R = ACC / (D / L) > 0 ? ACC / (D / L) : 1;
  int64_t n = 0;
  for (; n + R <= rows; n += R)
    for (int64_t g = 0; g < G; ++g)
      apply_rows<D, R>(X + n * ldx + g * D, ldx, M + g * D * D, Y + n * ldy + g * D, ldy);
  for (; n < rows; ++n)
    for (int64_t g = 0; g < G; ++g)
      apply_rows<D, 1>(X + n * ldx + g * D, ldx, M + g * D * D, Y + n * ldy + g * D, ldy);
}

// sum of the chunks' partial D x D matrices of (image b, group g), in chunk order
template <int D>
void sum_chunks(const float* P, int64_t nch, int64_t G, int64_t b, int64_t g, float* S) {
  constexpr int DV = D / L;
  for (int i = 0; i < D * D; i += DV * L)
    for (int c = 0; c < DV; ++c) vstore(S + i + c * L, splat(0.f));
  for (int64_t ch = 0; ch < nch; ++ch) {
    const float* p = P + ((b * nch + ch) * G + g) * D * D;
    for (int i = 0; i < D * D; i += L) vstore(S + i, vload(S + i) + vload(p + i));
  }
}

// tokens n0 .. n0 + rows - 1 of image b: task t's chunk, of nch per image
struct TokenChunk {
  int64_t b, n0, rows;
};
inline TokenChunk token_chunk(int64_t t, int64_t nch, int64_t N) {
  const int64_t b = t / nch, n0 = (t % nch) * CHUNK;
  return {b, n0, N - n0 < CHUNK ? N - n0 : CHUNK};
}

// the chunks' partial D x D sums (B x nch x G) and two D x D matrices per (image, group); null if not
// allocated (+ 64 bytes: never a zero-byte request, for which malloc may return null)
inline float* channel_scratch(int64_t B, int64_t nch, int64_t G, int64_t DD) {
  return static_cast<float*>(std::malloc((B * nch * G + 2 * B * G) * DD * sizeof(float) + 64));
}

// Work in three phases, each split into tasks: (image, chunk of CHUNK tokens, all groups) for the passes
// over the tokens, (image, group) for the D x D matrices between them. A chunk's task reads and writes whole
// rows (every group's columns); davit_tiny's channel attentions per training step (batch 8, 2-core Zen 4,
// interleaved): forward 8.4 ms and backward 14.4 ms this way, against 9.3 and 17.7 with one task per (image,
// group) over all tokens, and 10.0 and 19.7 per (image, chunk, group), whose tasks read 128 bytes of each
// 1152-byte qkv row.
template <int D>
int channel_forward(const float* qkv, float* out, float* attn, int64_t B, int64_t N, int64_t C, int64_t G,
                    const int* role, float scale, int team) {
  const int64_t nch = (N + CHUNK - 1) / CHUNK, ld = 3 * C, DD = D * D;
  float* P = channel_scratch(B, nch, G, DD);
  if (!P) return -3;
  float* A = P + B * nch * G * DD;
  float* At = A + B * G * DD;
#pragma omp parallel num_threads(team)
  {
    FlushDenormals ftz;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < B * nch; ++t) {
      const TokenChunk c = token_chunk(t, nch, N);
      const float* base = qkv + (c.b * N + c.n0) * ld;
      outer_chunk<D>(base + role[0] * C, ld, base + role[1] * C, ld, c.rows, G, P + t * G * DD);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < B * G; ++t) {
      sum_chunks<D>(P, nch, G, t / G, t % G, A + t * DD);
      softmax_rows<D>(A + t * DD, scale);
      transpose_square<D>(A + t * DD, At + t * DD);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < B * nch; ++t) {
      const TokenChunk c = token_chunk(t, nch, N);
      apply_chunk<D>(qkv + (c.b * N + c.n0) * ld + role[2] * C, ld, At + c.b * G * DD,
                     out + (c.b * N + c.n0) * C, C, c.rows, G);
    }
  }
  if (attn) std::memcpy(attn, A, B * G * DD * sizeof(float));
  std::free(P);
  return 0;
}

template <int D>
int channel_backward(const float* qkv, const float* attn, const float* dout, float* dqkv, int64_t B,
                     int64_t N, int64_t C, int64_t G, const int* role, float scale, int team) {
  const int64_t nch = (N + CHUNK - 1) / CHUNK, ld = 3 * C, DD = D * D;
  float* P = channel_scratch(B, nch, G, DD);
  if (!P) return -3;
  float* dS = P + B * nch * G * DD;
  float* dSt = dS + B * G * DD;
#pragma omp parallel num_threads(team)
  {
    FlushDenormals ftz;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < B * nch; ++t) {  // dA = dO^T V, per chunk
      const TokenChunk c = token_chunk(t, nch, N);
      outer_chunk<D>(dout + (c.b * N + c.n0) * C, C, qkv + (c.b * N + c.n0) * ld + role[2] * C, ld, c.rows, G,
                     P + t * G * DD);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < B * G; ++t) {  // dS = s A * (dA - rowsum(dA * A))
      alignas(64) float dA[D * D];
      sum_chunks<D>(P, nch, G, t / G, t % G, dA);
      const float* a = attn + t * DD;
      float* ds = dS + t * DD;
      for (int i = 0; i < D; ++i) {
        float dot = 0.f;
        for (int j = 0; j < D; ++j) dot += dA[i * D + j] * a[i * D + j];
        for (int j = 0; j < D; ++j) ds[i * D + j] = scale * a[i * D + j] * (dA[i * D + j] - dot);
      }
      transpose_square<D>(ds, dSt + t * DD);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < B * nch; ++t) {  // dV = dO A, dQ = K dS^T, dK = Q dS
      const TokenChunk c = token_chunk(t, nch, N);
      const int64_t m = c.b * G * DD;
      const float* base = qkv + (c.b * N + c.n0) * ld;
      float* dbase = dqkv + (c.b * N + c.n0) * ld;
      apply_chunk<D>(dout + (c.b * N + c.n0) * C, C, attn + m, dbase + role[2] * C, ld, c.rows, G);
      apply_chunk<D>(base + role[1] * C, ld, dSt + m, dbase + role[0] * C, ld, c.rows, G);
      apply_chunk<D>(base + role[0] * C, ld, dS + m, dbase + role[1] * C, ld, c.rows, G);
    }
  }
  std::free(P);
  return 0;
}

}  // namespace

extern "C" {

// qkv: (B, N, 3C) contiguous; roles q, k, v: which of qkv's three C-column chunks is the query, the key and
// the value; groups of D = C / G channels (16, 32 or 64). out: (B, N, C) contiguous; attn: (B, G, D, D) the
// attention (may be null). Per (image, group): A = softmax(scale * Q^T K), out = V A^T. Returns 0, -1 for a
// group width that is not built, -3 if scratch memory could not be allocated.
int davit_channel_attention_f32(const float* qkv, float* out, float* attn, int64_t B, int64_t N, int64_t C,
                                int64_t G, int q, int k, int v, float scale, int threads) {
  const int64_t D = C / G;
  const int role[3] = {q, k, v};
  const int team = omp_team(threads);
  if (D == 16) return channel_forward<16>(qkv, out, attn, B, N, C, G, role, scale, team);
  if (D == 32) return channel_forward<32>(qkv, out, attn, B, N, C, G, role, scale, team);
  if (D == 64) return channel_forward<64>(qkv, out, attn, B, N, C, G, role, scale, team);
  return -1;
}

// The gradient of davit_channel_attention_f32 with respect to qkv, given its attention attn (B, G, D, D) and
// the output's gradient dout (B, N, C): dV = dO A, dA = dO^T V, dS = s A * (dA - rowsum(dA * A)),
// dQ = K dS^T, dK = Q dS, written into dqkv (B, N, 3C), every element. Returns 0, -1 / -3 as the forward.
int davit_channel_attention_backward_f32(const float* qkv, const float* attn, const float* dout, float* dqkv,
                                         int64_t B, int64_t N, int64_t C, int64_t G, int q, int k, int v,
                                         float scale, int threads) {
  const int64_t D = C / G;
  const int role[3] = {q, k, v};
  const int team = omp_team(threads);
  if (D == 16) return channel_backward<16>(qkv, attn, dout, dqkv, B, N, C, G, role, scale, team);
  if (D == 32) return channel_backward<32>(qkv, attn, dout, dqkv, B, N, C, G, role, scale, team);
  if (D == 64) return channel_backward<64>(qkv, attn, dout, dqkv, B, N, C, G, role, scale, team);
  return -1;
}

}  // extern "C"

// ----- a linear layer's weight gradient in training: dW = g^T x and db = the column sums of g ------------
//
// Why a kernel of our own: dW is a GEMM with a small (out x in) result and a long reduction over all tokens
// of the batch, and on a 2-core AVX-512 VM oneDNN's convolution backward and MKL's mm ran davit_tiny's shapes
// at 0.55-0.85x the rate of their forward GEMMs (K = 96 inputs: 95-150 GFLOP/s against 180-200). Here each
// thread owns a band of dW's rows, so nothing is reduced across threads, and accumulates 4 x 96 tiles of it
// (the last one narrower where the input width is not a multiple of 96; 4 x 24 in AVX2 builds) in registers
// over chunks of tokens: per token one 96-float row piece of x (six vectors, kept in registers) and four
// broadcast scalars of g make 24 FMAs. The bias gradient comes from a second pass over each chunk of g,
// while it is in cache. Every element is summed per chunk of 128-512 tokens, the chunks in order, so the
// result does not depend on the thread count.

namespace {

typedef float v4 __attribute__((vector_size(16)));

constexpr int WG_R = 4;  // rows of dW (output features) per tile
// vectors of dW's columns (input features) per tile: 4 x 6 accumulators and 6 row vectors fill 30 of
// AVX-512's 32 registers; with AVX2's 16, 4 x 3 accumulators, 3 row vectors and the broadcast (24 columns)
#if defined(__AVX512F__)
constexpr int WG_C = 6;
#else
constexpr int WG_C = 3;
#endif
constexpr int WG_K = WG_C * L;     // 96 (AVX-512) or 24 columns
constexpr int64_t WG_CHUNK = 512;  // tokens per pass over a thread's tiles at most (its x rows stay in L2)
constexpr int64_t WG_BIAS_BLOCK = 16;  // tokens per partial bias sum
constexpr int64_t WG_BIAS_CHUNKS = 8;  // chunks per group of bias sums

// the sums over tokens m0..m1-1 of g[m][0..3], over the chunk just read into cache, in two levels: over 16
// tokens, then those sums (one running sum over a 512-token chunk had 2-5x torch.sum's error, which a
// compiled-vs-eager test caught). Not inlined: in the tile's loop, or after it in the same function, the
// sums slowed the whole tile 2-2.3x (its 24 accumulators lost their registers)
__attribute__((noinline)) v4 wgrad_bias_sums(const float* g, int64_t ldg, int64_t m0, int64_t m1) {
  v4 sum = {};
  for (int64_t mb = m0; mb < m1; mb += WG_BIAS_BLOCK) {
    const int64_t me = std::min(m1, mb + WG_BIAS_BLOCK);
    v4 part = {};
    for (int64_t m = mb; m < me; ++m) {
      v4 gv;
      std::memcpy(&gv, g + m * ldg, sizeof gv);
      part += gv;
    }
    sum += part;
  }
  return sum;
}

// dW[0..R-1][0..16C-1] (+)= sum over tokens m0..m1-1 of g[m][0..R-1] x[m][0..16C-1]; with `bias`, also
// db[0..R-1] (+)= sum of g[m][0..R-1]. `first`: = instead of +=
template <bool BIAS, int C>
inline void wgrad_tile(const float* g, int64_t ldg, const float* x, int64_t ldx, float* dw, int64_t ldw,
                       float* db, int64_t m0, int64_t m1, bool first, bool db_first) {
  // the chunk's sums from zero, then added to the earlier chunks': blocked summation (one sum carried through
  // all tokens had ~10x the error of MKL's mm at 25088 tokens; this is within 0.6-2.5x of it, as oneDNN's)
  vf acc[WG_R][C];
  for (int r = 0; r < WG_R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = splat(0.f);
  const float* gp = g + m0 * ldg;
  const float* xp = x + m0 * ldx;
  for (int64_t m = m0; m < m1; ++m, gp += ldg, xp += ldx) {
    vf xv[C];
    for (int c = 0; c < C; ++c) {
      xv[c] = vload(xp + c * L);
      in_register(xv[c]);
    }
    for (int r = 0; r < WG_R; ++r) {
      const vf gb = splat(gp[r]);
      for (int c = 0; c < C; ++c) acc[r][c] += gb * xv[c];
    }
  }
  // the bias sums apart (see wgrad_bias_sums)
  v4 bsum = {};
  if (BIAS) bsum = wgrad_bias_sums(g, ldg, m0, m1);
  for (int r = 0; r < WG_R; ++r)
    for (int c = 0; c < C; ++c) {
      float* p = dw + r * ldw + c * L;
      vstore(p, first ? acc[r][c] : acc[r][c] + vload(p));
    }
  if (BIAS) {
    if (!db_first) {
      v4 before;
      std::memcpy(&before, db, sizeof before);
      bsum += before;
    }
    std::memcpy(db, &bsum, sizeof bsum);
  }
}

// one tile of C (1..6) column vectors, the bias sums where asked
template <int C>
inline void wgrad_tile_at(const float* g, int64_t ldg, const float* x, int64_t ldx, float* dw, int64_t ldw,
                          float* db, int64_t m0, int64_t m1, bool first, bool db_first) {
  if (db)
    wgrad_tile<true, C>(g, ldg, x, ldx, dw, ldw, db, m0, m1, first, db_first);
  else
    wgrad_tile<false, C>(g, ldg, x, ldx, dw, ldw, nullptr, m0, m1, first, false);
}

// one tile of n (1..C) column vectors
template <int C>
inline void wgrad_tile_n(int n, const float* g, int64_t ldg, const float* x, int64_t ldx, float* dw,
                         int64_t ldw, float* db, int64_t m0, int64_t m1, bool first, bool db_first) {
  if constexpr (C > 1) {
    if (n < C) return wgrad_tile_n<C - 1>(n, g, ldg, x, ldx, dw, ldw, db, m0, m1, first, db_first);
  }
  wgrad_tile_at<C>(g, ldg, x, ldx, dw, ldw, db, m0, m1, first, db_first);
}

}  // namespace

extern "C" {

// 1 where the kernel below is built for AVX-512, else 0. Its 24 accumulators and 6 row vectors fill 30 of
// AVX-512's 32 registers; as pairs of AVX2 registers they spilled, and it ran 8x slower than MKL's mm
// (-march=haswell on a Zen 4 VM, 16-float vectors), so callers keep the libraries' GEMMs there. With AVX2's
// 8-float vectors and 4 x 3 tiles (no spills) it still runs at 0.68-1.06x MKL's mm and column sum per call
// on davit_tiny's shapes, 0.79x over a training step's calls (0.65x with 4 x 6 tiles; an AVX2-only CPU
// emulated on the Zen 4 VM, session 49): a tile's 12 FMAs per token do not hide the reads of a token's
// strided rows, where MKL packs its operands first.
int davit_linear_weight_grad_fast(void) {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

// g: (M, N) and x: (M, K) contiguous rows (a linear's output gradient and input, M tokens); dw: (N, K)
// contiguous, = g^T x; db: (N) or null, = the column sums of g. Returns 0, -1 unless N is a positive
// multiple of 4 and K of 16 (96-column tiles, then one of the remaining 16-80 columns), or -2 where no
// memory is left for the scratch (the bias sums', the transposed result's).
//
// Where K > N, N is a multiple of 16 up to 256 and g's columns fill whole tiles or end in one of 4-5 vectors,
// it computes dw^T = x^T g instead (x's columns the tiles' rows, g's the vectors) and transposes that into
// dw: the rows the tiles stream as vectors are then the narrower ones, read contiguously, where otherwise
// each tile reads a 96-column piece of every wide row of x. Per call after a 64 MB pass (2 threads, Zen 4):
// fc2's weight gradient in davit_tiny's first stage (g 96 wide, x 384) 1.13-1.22x as fast, its second
// stage's 1.02-1.07x, 256 / 1024 1.06x, 64 / 256 1.14-1.19x; but 128 / 512 (a last tile of 2 vectors)
// 0.87-0.92x and 768 / 3072 0.80x (its 9 MB scratch mapped afresh per call), hence the limits. Its sums are
// blocked alike (the chunk set by x's width).
int davit_linear_weight_grad_f32(const float* g, const float* x, float* dw, float* db, int64_t M, int64_t N,
                                 int64_t K, int threads) {
  if (N <= 0 || K <= 0 || M < 0 || N % WG_R || K % L) return -1;
  if (M == 0) {
    std::memset(dw, 0, N * K * sizeof(float));
    if (db) std::memset(db, 0, N * sizeof(float));
    return 0;
  }
  const int64_t tail = N / L % WG_C;  // vectors in the last tile of g's columns (0: whole tiles)
  const bool mirror = K > N && N % L == 0 && N <= 256 && (tail == 0 || tail >= 4);
  // the tiles' operands: `a` gives each tile's 4 rows of the result (broadcast scalars), `v` its columns
  // (vectors); R x C the result they make
  const float* a = mirror ? x : g;
  const float* v = mirror ? g : x;
  const int64_t R = mirror ? K : N, C = mirror ? N : K;
  const int64_t bands = R / WG_R, full = C / WG_K, rest = (C % WG_K) / L;
  const int64_t kblocks = full + (rest > 0);
  const int team = int(std::min<int64_t>(omp_team(threads), bands));
  // Over many tokens, smaller chunks where a chunk of `a` (all R columns, both cores' bands) outgrows ~1 MB,
  // so each core's part stays in its L2 across the column tiles: davit_tiny's and davit_base's stage-3
  // shapes (N = 1152-2048) ran 1.05-1.15x faster with 128 tokens; a few hundred tokens (stage 4) lose by it.
  // Set by the shape alone, so the sums do not depend on the thread count
  int64_t chunk = WG_CHUNK;
  while (M > WG_CHUNK && chunk > 128 && chunk * R * int64_t(sizeof(float)) > (int64_t(1) << 20)) chunk /= 2;
  // the bias sums of the current group of chunks (each thread its band's, or mirrored its share of g's
  // column vectors), and the mirrored result before its transpose
  float* part = db ? static_cast<float*>(std::malloc(N * sizeof(float))) : nullptr;
  float* out = mirror ? static_cast<float*>(std::malloc(R * C * sizeof(float))) : dw;
  if ((db && !part) || !out) {
    std::free(part);
    if (mirror) std::free(out);
    return -2;
  }
#pragma omp parallel num_threads(team)
  {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
    const int64_t t = 0, T = 1;
#endif
    const int64_t b0 = bands * t / T, b1 = bands * (t + 1) / T;
    // mirrored, the bias sums are g's column sums over the vectors: this thread's share of them
    const int64_t nv = N / L, s0 = nv * t / T, s1 = nv * (t + 1) / T;
    // chunks of tokens outermost: the chunk's rows of `v` (and of this thread's band of `a`) are read from
    // memory once and then from cache for every tile
    for (int64_t m0 = 0, ci = 0; m0 < M; m0 += chunk, ++ci) {
      const int64_t m1 = std::min(M, m0 + chunk);
      const bool first = m0 == 0, part_first = ci % WG_BIAS_CHUNKS == 0;
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        for (int64_t b = b0; b < b1; ++b) {
          const float* ab = a + b * WG_R;
          float* o = out + b * WG_R * C + kb * WG_K;
          const float* vb = v + kb * WG_K;
          // the bias sums of WG_BIAS_CHUNKS chunks into `part`, then added to db's (the fourth level)
          float* bias = db && !mirror && kb == 0 ? part + b * WG_R : nullptr;
          const int n = kb < full ? WG_C : int(rest);
          wgrad_tile_n<WG_C>(n, ab, R, vb, C, o, C, bias, m0, m1, first, part_first);
        }
      }
      if (db && mirror) {
        // the same levels as wgrad_tile's (16 tokens, the chunk, then `part`), lane-wise over g's columns,
        // from the chunk of g this thread just read
        for (int64_t sv = s0; sv < s1; ++sv) {
          vf sum = splat(0.f);
          for (int64_t mb = m0; mb < m1; mb += WG_BIAS_BLOCK) {
            const int64_t me = std::min(m1, mb + WG_BIAS_BLOCK);
            vf blk = splat(0.f);
            for (int64_t m = mb; m < me; ++m) blk += vload(g + m * N + sv * L);
            sum += blk;
          }
          vstore(part + sv * L, part_first ? sum : sum + vload(part + sv * L));
        }
      }
      if (db && (ci % WG_BIAS_CHUNKS == WG_BIAS_CHUNKS - 1 || m1 == M)) {
        const int64_t n0 = mirror ? s0 * L : b0 * WG_R, n1 = mirror ? s1 * L : b1 * WG_R;
        for (int64_t n = n0; n < n1; ++n) db[n] = ci < WG_BIAS_CHUNKS ? part[n] : db[n] + part[n];
      }
    }
    // mirrored: this thread's rows of dw^T (its bands, which no other thread writes) into dw's columns
    if (mirror)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = b0 * WG_R; k < b1 * WG_R; ++k) dw[n * K + k] = out[k * N + n];
  }
  std::free(part);
  if (mirror) std::free(out);
  return 0;
}

}  // extern "C"
