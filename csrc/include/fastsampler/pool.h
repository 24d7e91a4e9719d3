// A persistent row pool: runs fn(r) for r in [0, n) on the calling thread plus up to (threads - 1) workers.
//
// Rows are claimed from an atomic counter. The caller never waits for a worker that has not started: a worker that
// wakes after the caller has claimed every row does not join, and the caller only waits for workers that are in the
// middle of a row. On a machine whose cores are shared with other processes (a worker waiting for a time slice), a
// batch therefore never stalls for a scheduler quantum, which a fork/join barrier (OpenMP) can.
//
// Framework-free (std::thread only). Safe after fork(): a child process starts a fresh pool.
#pragma once

#ifdef _WIN32
#include <process.h>
#define FASTSAMPLER_GETPID _getpid
using fs_pid_t = int;
#else
#include <unistd.h>
#define FASTSAMPLER_GETPID getpid
using fs_pid_t = pid_t;
#endif

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace fastsampler {

class RowPool {
 public:
  using Fn = void (*)(void* ctx, int64_t row);
  using Done = void (*)(void* ctx);

  static RowPool& instance() {
    static std::mutex m;
    static RowPool* pool = nullptr;
    std::lock_guard<std::mutex> lk(m);
    if (pool == nullptr || pool->pid_ != FASTSAMPLER_GETPID())
      pool = new RowPool();  // the old one (if any) belongs to a parent
    return *pool;
  }

  // Runs fn(ctx, r) for every r in [0, n); at most `threads` threads in all (the caller included). Every thread that
  // took part then calls done(ctx) (when given) before run returns: per-thread clean-up at the end of a batch, e.g.
  // trimming thread-local scratch.
  void run(int64_t n, int threads, Fn fn, void* ctx, Done done = nullptr) {
    std::lock_guard<std::mutex> job_lock(job_mu_);  // one batch at a time
    const int want = threads > 1 ? static_cast<int>(std::min<int64_t>(threads - 1, n - 1)) : 0;
    if (want > 0) spawn(want);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = fn;
      done_ = done;
      ctx_ = ctx;
      n_ = n;
      next_.store(0);
      want_ = want;
      joined_ = 0;
      open_ = want > 0;
      ++gen_;
      gen_seen_.store(gen_, std::memory_order_release);
    }
    if (want > 0) cv_.notify_all();
    for (int64_t r = next_.fetch_add(1); r < n; r = next_.fetch_add(1)) fn(ctx, r);
    if (done) done(ctx);
    std::unique_lock<std::mutex> lk(mu_);
    open_ = false;  // late workers stay out
    idle_.wait(lk, [&] { return active_ == 0; });
  }

 private:
  RowPool() : pid_(FASTSAMPLER_GETPID()) {}

  void spawn(int want) {
    while (static_cast<int>(workers_) < want) {
      std::thread(&RowPool::worker, this).detach();
      ++workers_;
    }
  }

  void worker() {
    uint64_t seen = 0;
    for (;;) {
      Fn fn;
      Done done;
      void* ctx;
      int64_t n;
      // spin briefly first: back-to-back batches (one per decoding step) then start without a wake-up
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
      for (int i = 0; gen_seen_.load(std::memory_order_acquire) == seen; ++i) {
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
        std::this_thread::yield();
      }
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_ != seen; });
        seen = gen_;
        if (!open_ || joined_ >= want_) continue;
        ++joined_;
        ++active_;
        fn = fn_;
        done = done_;
        ctx = ctx_;
        n = n_;
      }
      for (int64_t r = next_.fetch_add(1); r < n; r = next_.fetch_add(1)) fn(ctx, r);
      if (done) done(ctx);  // still counted active: the caller waits for it
      {
        std::lock_guard<std::mutex> lk(mu_);
        --active_;
      }
      idle_.notify_all();
    }
  }

  const fs_pid_t pid_;
  std::mutex job_mu_;
  std::mutex mu_;
  std::condition_variable cv_, idle_;
  std::atomic<int64_t> next_{0};
  Fn fn_ = nullptr;
  Done done_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  uint64_t gen_ = 0;
  std::atomic<uint64_t> gen_seen_{0};  // gen_, readable without the lock (the workers' spin)
  int want_ = 0, joined_ = 0, active_ = 0;
  bool open_ = false;
  size_t workers_ = 0;
};

}  // namespace fastsampler
