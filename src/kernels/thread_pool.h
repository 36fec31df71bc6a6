// The kernels' threads: a pool of persistent workers that share a call's chunks dynamically.
//
// parallel_for_chunks(chunks, threads, fn) runs fn(c) once for every c in [0, chunks): the caller
// and up to threads - 1 workers claim chunks from one atomic counter, and the call returns as
// soon as every chunk is done. Unlike a static split with a join barrier, a worker the OS has
// not scheduled yet costs nothing (the others take its chunks; if it wakes after the call it
// finds nothing to claim), and one descheduled mid-chunk delays the call by that chunk only.
// The first exception of fn is rethrown in the caller (the other chunks still run). A call from
// inside fn (a nested call), or while another thread's call holds the pool, runs its chunks
// inline, in order. Which thread runs a chunk varies, so fn's results must not depend on it.
#pragma once
#include <cstdint>
#include <type_traits>

namespace msbnb::kernels {

namespace detail {
// fn(ctx, chunk): a non-owning reference to the caller's callable.
using ChunkCall = void (*)(void* ctx, int64_t chunk);
void run_chunks(int64_t chunks, int threads, ChunkCall call, void* ctx);
}  // namespace detail

/// Runs fn(c) for c in [0, chunks) on up to `threads` threads (the caller and pool workers);
/// returns once every chunk is done. threads <= 1 or chunks <= 1 runs inline.
template <class Fn>
void parallel_for_chunks(int64_t chunks, int threads, Fn&& fn) {
  using F = std::remove_reference_t<Fn>;
  detail::run_chunks(
      chunks, threads, [](void* ctx, int64_t c) { (*static_cast<F*>(ctx))(c); },
      const_cast<void*>(static_cast<const void*>(&fn)));
}

/// Workers the pool has now (threads started so far, for the tests).
int pool_workers();

}  // namespace msbnb::kernels
