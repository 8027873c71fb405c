// One core streaming weights the way smelt's decode kernels read them:
// STREAMS sequential streams at once, each step of each stream reading
// LINES 64-byte lines, multiplying them into f32 accumulators (one
// broadcast value per step), with a non-temporal prefetch 2 KiB ahead.
// WIDEN=0 reads f32 weights (one FMA per 16 weights); WIDEN=1 reads bf16
// weights in pairs of vectors (a shift and a mask per line, then two FMAs:
// smelt's `PairedPanels`). WIDEN=2 reads the same bytes as bf16 pairs
// along k for AVX512-BF16's `vdpbf16ps`, with x split into two bf16 parts
// (x_hi + x_lo, nearly f32's accuracy): two instructions per line and no
// shift or mask (needs avx512_bf16). Prints GB/s of weights read (buffers of 32 MiB,
// rotated through 1 GiB so that nothing is read from cache).
// Built and run by stream_widen.sh.
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((noinline)) static float run(const char *base, size_t bytes, const float *x) {
  const size_t per = bytes / STREAMS, step = 64 * LINES;
  __m512 acc[STREAMS][2 * LINES];
  for (int s = 0; s < STREAMS; s++)
    for (int i = 0; i < 2 * LINES; i++) acc[s][i] = _mm512_setzero_ps();
  const __m512i hi_mask = _mm512_set1_epi32((int)0xffff0000);
  size_t k = 0;
  for (size_t off = 0; off + step <= per; off += step, k++) {
    const __m512 xb = _mm512_set1_ps(x[k & 511]);
#if WIDEN == 2
    // Two pairs of bf16 parts of x (values near 1 and 2^-16: any finite
    // ones do; the rate does not depend on them).
    const __m512bh xh = (__m512bh)_mm512_set1_epi32((int)(0x3f803f80u + (unsigned)(k & 7) * 0x00010001u));
    const __m512bh xl = (__m512bh)_mm512_set1_epi32((int)(0x37803780u + (unsigned)(k & 7) * 0x00010001u));
#endif
    _Pragma("GCC unroll 16") for (int s = 0; s < STREAMS; s++) {
      const char *p = base + s * per + off;
      _Pragma("GCC unroll 4") for (int l = 0; l < LINES; l++) {
        _mm_prefetch(p + 2048 + 64 * l, _MM_HINT_NTA);
        const char *line = p + 64 * l;
        if (WIDEN == 2) {
#if WIDEN == 2
          const __m512bh v = (__m512bh)_mm512_load_si512((const void *)line);
          acc[s][2 * l] = _mm512_dpbf16_ps(acc[s][2 * l], v, xh);
          acc[s][2 * l + 1] = _mm512_dpbf16_ps(acc[s][2 * l + 1], v, xl);
#endif
        } else if (WIDEN) {
          __m512i v = _mm512_load_si512((const void *)line);
          acc[s][2 * l] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), xb, acc[s][2 * l]);
          acc[s][2 * l + 1] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi_mask)), xb, acc[s][2 * l + 1]);
        } else {
          acc[s][l] = _mm512_fmadd_ps(_mm512_load_ps((const float *)line), xb, acc[s][l]);
        }
      }
    }
  }
  __m512 sum = _mm512_setzero_ps();
  for (int s = 0; s < STREAMS; s++)
    for (int i = 0; i < 2 * LINES; i++) sum = _mm512_add_ps(sum, acc[s][i]);
  return _mm512_reduce_add_ps(sum);
}

int main(void) {
  const size_t bytes = 32u << 20;
  const int nb = 32;
  char *bufs[32];
  for (int i = 0; i < nb; i++) {
    bufs[i] = aligned_alloc(4096, bytes);
    memset(bufs[i], 0x11, bytes);
  }
  float x[512];
  for (int i = 0; i < 512; i++) x[i] = 1.0f;
  float sink = 0;
  double total = 0;
  int n = 0;
  const double t0 = now();
  for (int it = 0; now() - t0 < 0.7; it++) {
    const double a = now();
    sink += run(bufs[it % nb], bytes, x);
    if (it >= nb) {
      total += now() - a;
      n++;
    }
  }
  printf("%.1f\n", bytes / (total / n) / 1e9 + 0 * sink);
  return 0;
}
