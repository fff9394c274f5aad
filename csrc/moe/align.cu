// moe alignment: (token, slot) pairs grouped by local expert for the grouped GEMMs.
//
// Two launches, no host sync, deterministic. The pairs are cut into at most 64 chunks (a
// multiple of 256 pairs each, one CTA per chunk):
//   1. count_kernel: each CTA counts its chunk's pairs per local expert (shared-memory
//      atomics; integer sums do not depend on their order) into counts[chunk][expert].
//   2. scatter_kernel: each CTA reads the whole counts table (chunks x experts, a few KB) and
//      derives every expert's total, its padded start (a block scan over the experts) and how
//      many of its pairs lie in earlier chunks. It then ranks its own pairs 256 at a time: a
//      pair's slot is start + earlier chunks + earlier pairs of this chunk (a per-expert
//      cursor) + earlier pairs of these 256 with the same expert (a scan of shared memory),
//      so the order inside an expert is the pair order (stable). The padding slots (each
//      expert's tail and everything past num_padded) and block_expert are written by all CTAs
//      in a grid-stride loop: a binary search over the starts tells whose slot it is.
//
// Standing: compiles for sm_90a, sm_80 and gfx90a; not yet timed on a GPU.

#include "common.cuh"

namespace {

using namespace kpt_moe;

constexpr int kThreads = KPT_MOE_ALIGN_THREADS;

struct AlignParams {
  const int32_t* ids;
  const int32_t* map;
  int64_t pairs, global_experts, capacity, chunk;
  int local_experts, block_m, chunks;
  int32_t* counts;
  int32_t* sorted;
  int32_t* block_expert;
  int32_t* num_padded;
};

KPT_DEVICE int pair_expert(const AlignParams& p, int64_t pair) {
  return pair < p.pairs ? local_expert(p.ids[pair], p.map, p.global_experts, p.local_experts)
                        : -1;
}

__global__ void KPT_LAUNCH_BOUNDS(kThreads, 1) count_kernel(AlignParams p) {
  extern __shared__ int count_smem[];
  const int L = p.local_experts;
  for (int e = threadIdx.x; e < L; e += kThreads) count_smem[e] = 0;
  __syncthreads();
  const int64_t first = int64_t(blockIdx.x) * p.chunk;
  for (int64_t i = threadIdx.x; i < p.chunk; i += kThreads) {
    const int e = pair_expert(p, first + i);
    if (e >= 0) atomicAdd(&count_smem[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < L; e += kThreads) {
    p.counts[int64_t(blockIdx.x) * L + e] = count_smem[e];
  }
}

// The last expert whose run starts at or before slot s (starts ascend; empty experts share
// the start of the next one, and the search passes over them).
KPT_DEVICE int owner_of(const int* start, int experts, int64_t s) {
  int lo = 0, hi = experts;  // start[lo] <= s < start[hi] (start[experts] = num_padded)
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (start[mid] <= s) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__global__ void KPT_LAUNCH_BOUNDS(kThreads, 1) scatter_kernel(AlignParams p) {
  extern __shared__ int scatter_smem[];
  const int L = p.local_experts;
  int* cursor = scatter_smem;   // L: this CTA's next rank per expert
  int* total = cursor + L;      // L: pairs per expert
  int* start = total + L;       // L + 1: padded start per expert, then num_padded
  int* lid = start + L + 1;     // kThreads: experts of the current 256 pairs
  int* scan = lid + kThreads;   // kThreads: block scan
  const int tid = threadIdx.x;
  const int c = blockIdx.x;

  // Totals and the pairs of earlier chunks, per expert.
  for (int e = tid; e < L; e += kThreads) {
    cursor[e] = 0;
    total[e] = 0;
  }
  __syncthreads();
  const int64_t cells = int64_t(p.chunks) * L;
  for (int64_t i = tid; i < cells; i += kThreads) {
    const int v = p.counts[i];
    if (v == 0) continue;
    const int e = int(i % L);
    atomicAdd(&total[e], v);
    if (i / L < c) atomicAdd(&cursor[e], v);
  }
  __syncthreads();

  // Padded starts: each thread sums a contiguous run of experts, then a block scan.
  const int per = (L + kThreads - 1) / kThreads;
  const int e0 = tid * per;
  int run = 0;
  for (int e = e0; e < e0 + per && e < L; ++e) {
    run += (total[e] + p.block_m - 1) / p.block_m * p.block_m;
  }
  scan[tid] = run;
  __syncthreads();
  for (int off = 1; off < kThreads; off <<= 1) {
    const int v = tid >= off ? scan[tid - off] : 0;
    __syncthreads();
    scan[tid] += v;
    __syncthreads();
  }
  int at = scan[tid] - run;
  for (int e = e0; e < e0 + per && e < L; ++e) {
    start[e] = at;
    at += (total[e] + p.block_m - 1) / p.block_m * p.block_m;
  }
  if (tid == kThreads - 1) start[L] = scan[tid];
  __syncthreads();
  const int padded = start[L];

  // This chunk's pairs, 256 at a time, in pair order.
  const int64_t first = int64_t(c) * p.chunk;
  for (int64_t base = first; base < first + p.chunk; base += kThreads) {
    const int64_t pair = base + tid;
    const int e = pair_expert(p, pair);
    lid[tid] = e;
    __syncthreads();
    if (e >= 0) {
      int rank = 0;
      for (int j = 0; j < tid; ++j) rank += lid[j] == e;
      p.sorted[start[e] + cursor[e] + rank] = int32_t(pair);
    }
    __syncthreads();
    if (e >= 0) atomicAdd(&cursor[e], 1);
    __syncthreads();
  }

  // Padding slots and block_expert, over the whole capacity.
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t s = int64_t(c) * kThreads + tid; s < p.capacity; s += stride) {
    if (s >= padded) {
      p.sorted[s] = int32_t(p.pairs);
    } else {
      const int e = owner_of(start, L, s);
      if (s - start[e] >= total[e]) p.sorted[s] = int32_t(p.pairs);
    }
  }
  const int64_t blocks = p.capacity / p.block_m;
  for (int64_t b = int64_t(c) * kThreads + tid; b < blocks; b += stride) {
    const int64_t s = b * p.block_m;
    p.block_expert[b] = s < padded ? owner_of(start, L, s) : -1;
  }
  if (c == 0 && tid == 0) *p.num_padded = padded;
}

}  // namespace

extern "C" int kpt_moe_align(const kpt_moe_align_args* a, void* stream) {
  if (a == nullptr) return KPT_MOE_BAD_ARGUMENT;
  if (a->local_experts < 1 || a->local_experts > KPT_MOE_MAX_LOCAL_EXPERTS)
    return KPT_MOE_UNSUPPORTED;
  if (a->pairs < 0 || a->block_m < 1 || a->block_m > 1024 || a->global_experts < 1 ||
      (a->expert_map == nullptr && a->global_experts != a->local_experts))
    return KPT_MOE_BAD_ARGUMENT;
  const int64_t capacity = kpt_moe_padded_capacity(a->pairs, a->local_experts, a->block_m);
  if (capacity >= 0x7fffffff) return KPT_MOE_UNSUPPORTED;  // slots and the sentinel are int32
  if ((a->pairs > 0 && a->ids == nullptr) || a->counts == nullptr ||
      a->sorted_pairs == nullptr || a->block_expert == nullptr || a->num_padded == nullptr)
    return KPT_MOE_BAD_ARGUMENT;

  AlignParams p;
  p.ids = a->ids;
  p.map = a->expert_map;
  p.pairs = a->pairs;
  p.global_experts = a->global_experts;
  p.capacity = capacity;
  p.chunk = kpt_moe_align_chunk(a->pairs);
  p.local_experts = int(a->local_experts);
  p.block_m = int(a->block_m);
  p.chunks = int(kpt_moe_align_chunks(a->pairs));
  p.counts = a->counts;
  p.sorted = a->sorted_pairs;
  p.block_expert = a->block_expert;
  p.num_padded = a->num_padded;
  const auto s = static_cast<kpt::stream_t>(stream);
  const size_t count_bytes = sizeof(int) * size_t(p.local_experts);
  const size_t scatter_bytes = sizeof(int) * (3 * size_t(p.local_experts) + 1 + 2 * kThreads);
  count_kernel<<<p.chunks, kThreads, count_bytes, s>>>(p);
  scatter_kernel<<<p.chunks, kThreads, scatter_bytes, s>>>(p);
  return static_cast<int>(kpt::last_error());
}
