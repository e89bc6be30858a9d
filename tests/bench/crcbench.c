// Throughput of crc32c by the SSE4.2 instruction, by a byte table, and of memcpy, on 64 MiB:
// under TCG the instruction is emulated one bit at a time (QEMU target/i386/ops_sse.h, helper_crc32).
//   gcc -O2 -msse4.2 -o target/crcbench tests/bench/crcbench.c && scripts/vm-run -- target/crcbench
#include <nmmintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static uint32_t tab[256];
int main(void) {
    size_t n = 64 << 20; uint8_t *a = malloc(n), *b = malloc(n);
    for (size_t i = 0; i < n; i++) a[i] = (uint8_t)(i * 2654435761u >> 13);
    for (uint32_t i = 0; i < 256; i++) { uint32_t c = i; for (int k = 0; k < 8; k++) c = (c >> 1) ^ (c & 1 ? 0x82f63b78 : 0); tab[i] = c; }
    double t = now(); uint64_t c = ~0u;
    for (size_t i = 0; i < n; i += 8) c = _mm_crc32_u64(c, *(uint64_t *)(a + i));
    double hw = now() - t;
    t = now(); uint32_t s = ~0u;
    for (size_t i = 0; i < n; i++) s = tab[(s ^ a[i]) & 0xff] ^ (s >> 8);
    double sw = now() - t;
    t = now(); memcpy(b, a, n); double mc = now() - t;
    printf("crc32c sse4.2 %.0f MB/s, crc32c table %.0f MB/s, memcpy %.0f MB/s (%x %x %d)\n",
           n / hw / 1e6, n / sw / 1e6, n / mc / 1e6, (uint32_t)c, s, b[n / 2]);
    return 0;
}
