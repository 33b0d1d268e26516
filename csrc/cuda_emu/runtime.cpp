// CUDA emulator (tests only): launches, the block's threads as fibers, barriers,
// warp collectives, the emulated device and its runtime API. The model and its
// limits: cuda_emu.h.
//
// [fibers] a block's threads are fibers on the launching OS thread, on stacks
// allocated once (GRADPROJ_EMU_STACK_KIB, 256 KiB by default, with a guard page)
// and reused by every launch. No switch makes a system call (swapcontext would
// set the signal mask each time): on x86-64 a switch is a few instructions of
// assembly (switch_context: callee-saved registers, MXCSR and the x87 control
// word, then the stack pointer); elsewhere _setjmp / _longjmp, with makecontext /
// setcontext once per fiber to start it. A thread that reaches a barrier switches
// straight to the next runnable thread of the round; the last one of a round
// switches back to the scheduler. A fiber whose thread returned parks at the top
// of its loop and runs the next block's thread from there. A failed launch
// abandons the fibers still inside the kernel (nothing on their stacks owns
// memory: kernels hold raw pointers) and starts them afresh next time.
// [rounds] GRADPROJ_EMU_SCHEDULE forward / reverse / shuffle: the scheduler runs
// every runnable thread once per round, in that order; a thread made runnable
// during a round (its barrier completed) runs in the next. lowest / highest /
// random: at every switch the runnable thread of the lowest / highest / a random
// index runs, so one warp runs ahead of the others as far as the barriers let it
// (a race across several barrier phases, a reader overtaken by the next phase's
// writer, shows there; round-robin orders keep every thread within one phase of
// the others). Every barrier switches, the last thread to arrive included, so
// the next phase starts in schedule order.
// [faults] during a launch SIGSEGV / SIGBUS are caught on an alternate stack; a
// fault inside a fiber ends the launch with an error naming the thread, any other
// is handed back to the handler that was installed before.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emu.h"

#if defined(__x86_64__) && !defined(GRADPROJ_EMU_SETJMP)
#define GRADPROJ_EMU_ASM_SWITCH 1
#else
#define GRADPROJ_EMU_ASM_SWITCH 0
// glibc's fortified longjmp refuses to jump to another stack, which is what a
// fiber switch is (tests/cuda_emulation.py builds with -U_FORTIFY_SOURCE).
#if defined(__USE_FORTIFY_LEVEL) && __USE_FORTIFY_LEVEL > 0
#error "build the CUDA emulator with -U_FORTIFY_SOURCE"
#endif
#endif

#if GRADPROJ_EMU_ASM_SWITCH
// gradproj_emu_switch(save, load): pushes the callee-saved registers (System V:
// rbp, rbx, r12-r15, MXCSR's control bits, the x87 control word), stores the stack
// pointer in *save, loads `load` and pops the same from there. Fibers never unwind
// through it (an exception stays inside its fiber), so it has no unwind info.
extern "C" void gradproj_emu_switch(void** save, void* load) __attribute__((visibility("hidden")));
asm(R"(
  .text
  .p2align 4
  .globl gradproj_emu_switch
  .hidden gradproj_emu_switch
  .type gradproj_emu_switch, @function
gradproj_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size gradproj_emu_switch, .-gradproj_emu_switch
)");
#endif

namespace gradproj_emu {
namespace detail {

Registers regs;

namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStaticSmemLimit = 48 * 1024;  // dynamic smem allowed without the attribute

size_t page_size() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// A failure detected inside a fiber: unwinds the kernel's frames to the fiber's
// loop, which records it as the launch's failure.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class State : uint8_t { kReady, kRunning, kBlockWait, kWarpWait, kDone };

// A suspended execution context (see [fibers]).
struct Context {
#if GRADPROJ_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  jmp_buf buf;
  ucontext_t start;
  bool fresh = false;  // never run: `start` holds its entry
#endif
};

#if GRADPROJ_EMU_ASM_SWITCH
inline void switch_context(Context& from, Context& to) { gradproj_emu_switch(&from.sp, to.sp); }
// To `to`, abandoning the running context (the fault handler's way out).
[[noreturn]] inline void jump_context(Context& to) {
  void* abandoned = nullptr;
  gradproj_emu_switch(&abandoned, to.sp);
  __builtin_unreachable();
}
// `c` starts `entry` on the stack [base, base + size) when first switched to: the
// frame gradproj_emu_switch pops, returning into `entry` with the stack aligned
// as after a call (rsp % 16 == 8), and a null return address beyond it.
void make_context(Context& c, char* base, size_t size, void (*entry)()) {
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(base + size) & ~uintptr_t{15});
  *--sp = 0;
  *--sp = reinterpret_cast<uint64_t>(entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp, rbx, r12-r15
  uint32_t control[2] = {__builtin_ia32_stmxcsr(), 0};
  uint16_t x87 = 0;
  asm volatile("fnstcw %0" : "=m"(x87));
  control[1] = x87;
  std::memcpy(--sp, control, sizeof(control));
  c.sp = sp;
}
#else
__attribute__((noinline)) void switch_context(Context& from, Context& to) {
  if (_setjmp(from.buf) != 0) return;
  if (to.fresh) {
    to.fresh = false;
    setcontext(&to.start);
  }
  _longjmp(to.buf, 1);
}
[[noreturn]] inline void jump_context(Context& to) { _longjmp(to.buf, 1); }
void make_context(Context& c, char* base, size_t size, void (*entry)()) {
  TORCH_CHECK(getcontext(&c.start) == 0, "CUDA emulator: getcontext failed");
  c.start.uc_stack.ss_sp = base;
  c.start.uc_stack.ss_size = size;
  c.start.uc_link = nullptr;
  makecontext(&c.start, entry, 0);
  c.fresh = true;
}
#endif

struct Fiber {
  Context ctx;
  char* map = nullptr;  // guard page, then the stack
  size_t map_size = 0;
  bool started = false;  // has a context: parked at its loop's top or inside a kernel
  bool parked = false;   // at its loop's top: can run the next thread from there
  State state = State::kDone;
  int linear = 0;
  dim3 tid;
  const char* waits_at = nullptr;  // the barrier or collective it waits in

  ~Fiber() {
    if (map != nullptr) munmap(map, map_size);
  }
};

struct Warp {
  unsigned expected = 0;  // mask of the collective under way (0: none)
  unsigned arrived = 0;
  unsigned generation = 0;
  const char* what = nullptr;
  uint64_t slots[2][32];  // deposits, double-buffered by generation parity
};

enum class Order { kForward, kReverse, kShuffle, kLowest, kHighest, kRandom };

// Everything about the launch under way. One launch runs at a time (launch_mutex).
struct Emulator {
  std::mutex launch_mutex;
  std::vector<std::unique_ptr<Fiber>> pool;
  Context scheduler;
  Fiber* current = nullptr;
  volatile bool in_fiber = false;  // a fiber runs (read by the fault handler)
  pthread_t launch_thread{};

  // the launch
  const LaunchConfig* config = nullptr;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  std::string kernel;  // its name, formed on the first error only
  int n_threads = 0;
  Order order = Order::kForward;
  std::mt19937_64 rng;

  // the block
  int block_arrived = 0;
  int n_done = 0;
  std::vector<Warp> warps;
  std::vector<Fiber*> round;
  size_t round_pos = 0;

  // the first failure of the launch (empty: none)
  std::string failure;

  // dynamic shared memory: smem_capacity bytes, then a PROT_NONE page; a launch's
  // buffer (smem) ends at that page
  char* smem_map = nullptr;
  size_t smem_capacity = 0;
  char* smem = nullptr;

  // statistics, for tests/cuda_emulation.py
  int64_t launches = 0;
  const void* last_kernel = nullptr;  // the last launch's kernel (its name on request)
  int64_t last_smem = 0;               // and its dynamic shared memory, bytes
  int64_t blocks = 0;
  int64_t switches = 0;

  // [faults]
  char* alt_stack = nullptr;
  size_t alt_stack_size = 0;
  struct sigaction old_segv{};
  struct sigaction old_bus{};
  volatile sig_atomic_t fault_signal = 0;
  void* volatile fault_address = nullptr;
};

Emulator& emu() {
  static auto* e = new Emulator();  // never destroyed: fibers may outlive static destruction
  return *e;
}

// ------------------------------------------------------------------ names

std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%p", p);
  return buf;
}

std::string demangle(const char* name) {
  int status = 0;
  char* out = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  if (status != 0 || out == nullptr) return name;
  std::string s(out);
  std::free(out);
  return s;
}

// The function symbol containing `offset` in the ELF file `path` (its .symtab: the
// kernels have internal linkage, so dladdr, which reads the dynamic symbols, does
// not know them).
std::string symtab_lookup(const char* path, uintptr_t offset) {
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  struct stat st{};
  std::string found;
  if (fstat(fd, &st) == 0 && st.st_size > static_cast<off_t>(sizeof(ElfW(Ehdr)))) {
    void* file = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
    if (file != MAP_FAILED) {
      const char* base = static_cast<const char*>(file);
      const size_t size = static_cast<size_t>(st.st_size);
      const auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(base);
      const bool sane = std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 &&
                        eh->e_shoff + eh->e_shnum * sizeof(ElfW(Shdr)) <= size;
      const auto* sh = reinterpret_cast<const ElfW(Shdr)*>(base + (sane ? eh->e_shoff : 0));
      for (int i = 0; sane && i < eh->e_shnum && found.empty(); ++i) {
        if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
        const ElfW(Shdr)& strtab = sh[sh[i].sh_link];
        if (sh[i].sh_offset + sh[i].sh_size > size || strtab.sh_offset + strtab.sh_size > size) {
          continue;
        }
        const auto* syms = reinterpret_cast<const ElfW(Sym)*>(base + sh[i].sh_offset);
        const size_t n = sh[i].sh_size / sizeof(ElfW(Sym));
        for (size_t j = 0; j < n; ++j) {
          const ElfW(Sym)& s = syms[j];
          if (ELF64_ST_TYPE(s.st_info) != STT_FUNC || s.st_name >= strtab.sh_size) continue;
          if (offset >= s.st_value && offset < s.st_value + std::max<uint64_t>(s.st_size, 1)) {
            found = demangle(base + strtab.sh_offset + s.st_name);
            break;
          }
        }
      }
      munmap(file, size);
    }
  }
  close(fd);
  return found;
}

std::string kernel_name(const void* fn) {
  Dl_info info{};
  if (dladdr(fn, &info) == 0) return "kernel at " + hex(fn);
  if (info.dli_sname != nullptr && info.dli_saddr == fn) return demangle(info.dli_sname);
  const uintptr_t offset =
      reinterpret_cast<uintptr_t>(fn) - reinterpret_cast<uintptr_t>(info.dli_fbase);
  std::string name = symtab_lookup(info.dli_fname, offset);
  return name.empty() ? "kernel at " + hex(fn) : name;
}

std::string dim(const dim3& d) {
  std::ostringstream s;
  s << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return s.str();
}

// "kernel K, block (x, y, z)": where a failure happened.
std::string where() {
  Emulator& e = emu();
  if (e.kernel.empty()) e.kernel = kernel_name(e.config->kernel);
  return "kernel " + e.kernel + ", block " + dim(regs.block_idx) + " of grid " +
         dim(e.config->grid) + ", " + std::to_string(e.n_threads) + " threads";
}

std::string thread_name(const Fiber& f) {
  return "thread " + dim(f.tid) + " (warp " + std::to_string(f.linear / 32) + ", lane " +
         std::to_string(f.linear % 32) + ")";
}

// "0-31, 64, 70-75"
std::string ranges(const std::vector<int>& ids) {
  std::ostringstream s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (i > 0) s << ", ";
    s << ids[i];
    if (j > i) s << "-" << ids[j];
    i = j + 1;
  }
  return s.str();
}

std::string mask_hex(unsigned m) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", m);
  return buf;
}

// ------------------------------------------------------------------ fibers

void fiber_main();

Fiber& fiber(int i) {
  Emulator& e = emu();
  while (static_cast<int>(e.pool.size()) <= i) {
    auto f = std::make_unique<Fiber>();
    static const size_t stack_bytes = [] {
      const char* env = std::getenv("GRADPROJ_EMU_STACK_KIB");
      const long kib = env != nullptr ? std::strtol(env, nullptr, 10) : 256;
      return round_up(static_cast<size_t>(std::max(kib, 16L)) * 1024, page_size());
    }();
    f->map_size = stack_bytes + page_size();
    void* map = mmap(
        nullptr, f->map_size, PROT_READ | PROT_WRITE,
        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    TORCH_CHECK(map != MAP_FAILED, "CUDA emulator: cannot map a fiber stack");
    f->map = static_cast<char*>(map);
    TORCH_CHECK(mprotect(f->map, page_size(), PROT_NONE) == 0, "CUDA emulator: mprotect failed");
    e.pool.push_back(std::move(f));
  }
  return *e.pool[static_cast<size_t>(i)];
}

[[noreturn]] void fiber_entry() {
  fiber_main();
  std::abort();  // fiber_main never returns
}

// The next runnable thread of the round, or null (the round is over, or the launch failed).
Fiber* next_in_round() {
  Emulator& e = emu();
  if (!e.failure.empty()) return nullptr;
  if (e.order == Order::kLowest || e.order == Order::kHighest || e.order == Order::kRandom) {
    // No rounds: a scan of the block at every switch (these orders are for small tests).
    e.round.clear();
    for (int i = 0; i < e.n_threads; ++i) {
      Fiber* f = e.pool[static_cast<size_t>(i)].get();
      if (f->state == State::kReady) e.round.push_back(f);
    }
    if (e.round.empty()) return nullptr;
    if (e.order == Order::kLowest) return e.round.front();
    if (e.order == Order::kHighest) return e.round.back();
    return e.round[std::uniform_int_distribution<size_t>(0, e.round.size() - 1)(e.rng)];
  }
  while (e.round_pos < e.round.size()) {
    Fiber* f = e.round[e.round_pos++];
    if (f->state == State::kReady) return f;
  }
  return nullptr;
}

// Makes `f` the running thread (its context is switched to next).
void enter(Fiber& f) {
  Emulator& e = emu();
  f.state = State::kRunning;
  regs.thread_idx = f.tid;
  regs.lane = f.linear % 32;
  e.current = &f;
  ++e.switches;
  if (!f.started) {
    make_context(f.ctx, f.map + page_size(), f.map_size - page_size(), fiber_entry);
    f.started = true;
  }
}

// From the running thread `f` to the next of the round, or to the scheduler; returns
// when a switch comes back to `f`.
void switch_out(Fiber& f) {
  Emulator& e = emu();
  Fiber* next = next_in_round();
  if (next == nullptr) {
    switch_context(f.ctx, e.scheduler);
    return;
  }
  enter(*next);
  // `random` may pick the running thread itself: it just goes on (a switch to
  // itself would resume it where it was suspended before).
  if (next != &f) switch_context(f.ctx, next->ctx);
}

// Records the launch's first failure.
void fail(const std::string& message) {
  Emulator& e = emu();
  if (e.failure.empty()) e.failure = message;
}

// A thread's exit: it must not leave threads waiting for it at a barrier.
void thread_exit(Fiber& f) {
  Emulator& e = emu();
  f.state = State::kDone;
  ++e.n_done;
  if (e.block_arrived > 0) {
    fail(
        "CUDA emulator: " + thread_name(f) + " returned while " +
        std::to_string(e.block_arrived) +
        " threads wait at __syncthreads (a barrier some threads skip), in " + where());
  }
  const Warp& w = e.warps[static_cast<size_t>(f.linear / 32)];
  if (w.arrived != 0 && ((w.expected >> (f.linear % 32)) & 1u) != 0) {
    fail(
        "CUDA emulator: " + thread_name(f) + " returned while lanes " + mask_hex(w.arrived) +
        " of its warp wait for it in " + w.what + " with mask " + mask_hex(w.expected) + ", in " +
        where());
  }
}

void fiber_main() {
  for (;;) {
    Emulator& e = emu();
    Fiber& f = *e.current;
    f.parked = false;
    try {
      e.body(e.arg);
    } catch (const Failure& err) {
      fail(err.what());
    } catch (const c10::Error& err) {
      fail(
          "CUDA emulator: " + thread_name(f) + " threw in " + where() + ": " +
          err.what_without_backtrace());
    } catch (const std::exception& err) {
      fail("CUDA emulator: " + thread_name(f) + " threw in " + where() + ": " + err.what());
    } catch (...) {
      fail("CUDA emulator: " + thread_name(f) + " threw a non-std exception in " + where());
    }
    thread_exit(f);
    f.parked = true;
    switch_out(f);
  }
}

// Suspends the running thread at a barrier (or, state kReady, just yields).
void wait(State state, const char* what) {
  Emulator& e = emu();
  Fiber& f = *e.current;
  f.state = state;
  f.waits_at = what;
  switch_out(f);
}

// ------------------------------------------------------------------ scheduling

Order order_from_env() {
  const char* env = std::getenv("GRADPROJ_EMU_SCHEDULE");
  const std::string s = env != nullptr ? env : "";
  if (s.empty() || s == "forward") return Order::kForward;
  if (s == "reverse") return Order::kReverse;
  if (s == "shuffle") return Order::kShuffle;
  if (s == "lowest") return Order::kLowest;
  if (s == "highest") return Order::kHighest;
  if (s == "random") return Order::kRandom;
  TORCH_CHECK(
      false, "GRADPROJ_EMU_SCHEDULE must be forward, reverse, shuffle, lowest, highest or random, ",
      "got '", s, "'");
}

// Why no thread can go on: the threads grouped by what they wait at.
std::string deadlock_report() {
  Emulator& e = emu();
  std::map<std::string, std::vector<int>> groups;
  for (int i = 0; i < e.n_threads; ++i) {
    const Fiber& f = *e.pool[static_cast<size_t>(i)];
    std::string key;
    if (f.state == State::kDone) {
      key = "returned";
    } else if (f.state == State::kBlockWait) {
      key = "wait at __syncthreads";
    } else {
      const Warp& w = e.warps[static_cast<size_t>(i / 32)];
      key = "wait at " + std::string(f.waits_at) + " (warp " + std::to_string(i / 32) +
            ", mask " + mask_hex(w.expected) + ", arrived " + mask_hex(w.arrived) + ")";
    }
    groups[key].push_back(i);
  }
  std::string out = "CUDA emulator: deadlock, no thread can go on, in " + where() + ":";
  for (const auto& [key, ids] : groups) out += " threads " + ranges(ids) + " " + key + ";";
  return out;
}

// Every fiber still inside a kernel is abandoned: started afresh next time.
void reset_fibers() {
  for (auto& f : emu().pool) {
    if (f->started && !f->parked) f->started = false;
  }
}

void run_block() {
  Emulator& e = emu();
  const dim3 bd = e.config->block;
  e.block_arrived = 0;
  e.n_done = 0;
  e.warps.assign(static_cast<size_t>((e.n_threads + 31) / 32), Warp{});
  for (int i = 0; i < e.n_threads; ++i) {
    Fiber& f = fiber(i);
    f.state = State::kReady;
    f.linear = i;
    f.tid = dim3(i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y));
    f.waits_at = nullptr;
  }
  while (e.n_done < e.n_threads && e.failure.empty()) {
    e.round.clear();
    for (int i = 0; i < e.n_threads; ++i) {
      Fiber* f = e.pool[static_cast<size_t>(i)].get();
      if (f->state == State::kReady) e.round.push_back(f);
    }
    if (e.order == Order::kReverse) std::reverse(e.round.begin(), e.round.end());
    if (e.order == Order::kShuffle) std::shuffle(e.round.begin(), e.round.end(), e.rng);
    e.round_pos = 0;
    Fiber* first = next_in_round();
    if (first == nullptr) {
      fail(deadlock_report());
      break;
    }
    enter(*first);
    e.fault_signal = 0;
    e.in_fiber = true;
    switch_context(e.scheduler, first->ctx);  // back when the round is over
    e.in_fiber = false;
    if (e.fault_signal != 0) {
      fail(
          "CUDA emulator: " + thread_name(*e.current) + " faulted (" +
          (e.fault_signal == SIGBUS ? "SIGBUS" : "SIGSEGV") + " at address " +
          hex(e.fault_address) +
          ": an access out of bounds, a misaligned vector access or a fiber stack overflow, "
          "GRADPROJ_EMU_STACK_KIB), in " + where());
    }
  }
  if (!e.failure.empty()) {
    reset_fibers();
    TORCH_CHECK(false, e.failure);
  }
}

// ------------------------------------------------------------------ [faults]

void on_fault(int sig, siginfo_t* info, void*) {
  Emulator& e = emu();
  if (e.in_fiber && pthread_equal(pthread_self(), e.launch_thread)) {
    e.fault_signal = sig;
    e.fault_address = info->si_addr;
    e.in_fiber = false;
    jump_context(e.scheduler);
  }
  // Not a kernel's fault: the previous handler gets it when the access repeats.
  sigaction(sig, sig == SIGBUS ? &e.old_bus : &e.old_segv, nullptr);
}

// Installs the fault handler and its alternate stack for one launch.
class FaultGuard {
 public:
  FaultGuard() {
    Emulator& e = emu();
    if (e.alt_stack == nullptr) {
      e.alt_stack_size = round_up(std::max<size_t>(SIGSTKSZ, 64 * 1024), page_size());
      void* map = mmap(
          nullptr, e.alt_stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(map != MAP_FAILED, "CUDA emulator: cannot map the signal stack");
      e.alt_stack = static_cast<char*>(map);
    }
    stack_t ss{};
    ss.ss_sp = e.alt_stack;
    ss.ss_size = e.alt_stack_size;
    ss.ss_flags = 0;
    sigaltstack(&ss, &old_stack_);
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    // SA_NODEFER: the handler leaves by a context switch, which would keep it blocked.
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &e.old_segv);
    sigaction(SIGBUS, &sa, &e.old_bus);
  }
  ~FaultGuard() {
    Emulator& e = emu();
    sigaction(SIGSEGV, &e.old_segv, nullptr);
    sigaction(SIGBUS, &e.old_bus, nullptr);
    sigaltstack(&old_stack_, nullptr);
  }
  FaultGuard(const FaultGuard&) = delete;
  FaultGuard& operator=(const FaultGuard&) = delete;

 private:
  stack_t old_stack_{};
};

// ------------------------------------------------------------------ the device

struct FuncAttributes {
  int max_dynamic_smem = static_cast<int>(kStaticSmemLimit);
};

std::mutex attributes_mutex;
std::map<const void*, FuncAttributes>& attributes() {
  static auto* m = new std::map<const void*, FuncAttributes>();
  return *m;
}

size_t parse_bytes(const char* env, size_t fallback) {
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  const double v = std::strtod(env, &end);
  TORCH_CHECK(end != env && v > 0, "CUDA emulator: cannot read a byte count from '", env, "'");
  const std::string unit = end;
  if (unit.empty()) return static_cast<size_t>(v);
  if (unit == "K" || unit == "k" || unit == "KiB") return static_cast<size_t>(v * 1024);
  TORCH_CHECK(false, "CUDA emulator: byte counts are bytes or KiB ('163K'), got '", env, "'");
}

// Dynamic shared memory of `bytes` (rounded to 16) ending at a PROT_NONE page.
char* smem_buffer(size_t bytes) {
  Emulator& e = emu();
  const size_t need = round_up(std::max<size_t>(bytes, 16), 16);
  if (need > e.smem_capacity) {
    if (e.smem_map != nullptr) munmap(e.smem_map, e.smem_capacity + page_size());
    e.smem_capacity = round_up(need, page_size());
    void* map = mmap(
        nullptr, e.smem_capacity + page_size(), PROT_READ | PROT_WRITE,
        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(map != MAP_FAILED, "CUDA emulator: cannot map shared memory");
    e.smem_map = static_cast<char*>(map);
    TORCH_CHECK(
        mprotect(e.smem_map + e.smem_capacity, page_size(), PROT_NONE) == 0,
        "CUDA emulator: mprotect failed");
  }
  return e.smem_map + e.smem_capacity - need;
}

}  // namespace

// ------------------------------------------------------------------ cuda_emu.h

void syncthreads() {
  Emulator& e = emu();
  if (++e.block_arrived == e.n_threads) {
    e.block_arrived = 0;
    for (int i = 0; i < e.n_threads; ++i) {
      Fiber& f = *e.pool[static_cast<size_t>(i)];
      if (f.state == State::kBlockWait) f.state = State::kReady;
    }
    wait(State::kReady, "__syncthreads");
    return;
  }
  wait(State::kBlockWait, "__syncthreads");
}

const uint64_t* warp_collective(unsigned mask, uint64_t bits, const char* what) {
  Emulator& e = emu();
  Fiber& f = *e.current;
  const int lane = f.linear % 32;
  const int warp = f.linear / 32;
  Warp& w = e.warps[static_cast<size_t>(warp)];
  const int lanes_here = std::min(32, e.n_threads - warp * 32);
  const unsigned existing = lanes_here == 32 ? 0xffffffffu : (1u << lanes_here) - 1;
  if (((mask >> lane) & 1u) == 0) {
    throw Failure(
        "CUDA emulator: " + thread_name(f) + " calls " + what + " with mask " + mask_hex(mask) +
        ", which does not name it, in " + where());
  }
  if ((mask & ~existing) != 0) {
    throw Failure(
        "CUDA emulator: " + thread_name(f) + " calls " + what + " with mask " + mask_hex(mask) +
        ", which names lanes this block does not have (" + mask_hex(existing) + "), in " +
        where());
  }
  if (w.arrived == 0) {
    w.expected = mask;
    w.what = what;
  } else if (w.expected != mask || (w.what != what && std::strcmp(w.what, what) != 0)) {
    throw Failure(
        "CUDA emulator: " + thread_name(f) + " calls " + what + " with mask " + mask_hex(mask) +
        " while lanes " + mask_hex(w.arrived) + " of its warp wait in " + w.what +
        " with mask " + mask_hex(w.expected) + ", in " + where());
  }
  const unsigned parity = w.generation & 1u;
  w.slots[parity][lane] = bits;
  w.arrived |= 1u << lane;
  if (w.arrived == w.expected) {
    w.arrived = 0;
    w.expected = 0;
    ++w.generation;
    for (int l = 0; l < lanes_here; ++l) {
      Fiber& other = *e.pool[static_cast<size_t>(warp * 32 + l)];
      if (other.state == State::kWarpWait) other.state = State::kReady;
    }
    wait(State::kReady, what);
  } else {
    wait(State::kWarpWait, what);
  }
  return w.slots[parity];
}

void bad_lane(const char* what, unsigned mask, int src) {
  throw Failure(
      "CUDA emulator: " + thread_name(*emu().current) + " reads lane " + std::to_string(src) +
      " in " + what + ", which its mask " + mask_hex(mask) + " does not name, in " + where());
}

void* dynamic_smem() { return emu().smem; }

void run_grid(const LaunchConfig& config, void (*body)(void*), void* arg) {
  Emulator& e = emu();
  const std::lock_guard<std::mutex> lock(e.launch_mutex);
  const int64_t threads = static_cast<int64_t>(config.block.x) * config.block.y * config.block.z;
  const int64_t blocks = static_cast<int64_t>(config.grid.x) * config.grid.y * config.grid.z;
  TORCH_CHECK(
      threads >= 1 && threads <= kMaxThreads && blocks >= 1,
      "CUDA error (emulated): invalid configuration argument: grid ", dim(config.grid),
      ", block ", dim(config.block), " (kernel ", kernel_name(config.kernel), ")");
  int allowed = static_cast<int>(kStaticSmemLimit);
  {
    const std::lock_guard<std::mutex> attributes_lock(attributes_mutex);
    auto found = attributes().find(config.kernel);
    if (found != attributes().end()) allowed = found->second.max_dynamic_smem;
  }
  TORCH_CHECK(
      config.smem <= static_cast<size_t>(allowed),
      "CUDA error (emulated): a launch of ", kernel_name(config.kernel), " asks for ",
      config.smem, " bytes of dynamic shared memory; the kernel's "
      "cudaFuncAttributeMaxDynamicSharedMemorySize allows ", allowed);

  e.config = &config;
  e.body = body;
  e.arg = arg;
  e.kernel.clear();
  e.failure.clear();
  e.n_threads = static_cast<int>(threads);
  e.order = order_from_env();
  if (e.order == Order::kShuffle || e.order == Order::kRandom) {
    const char* seed = std::getenv("GRADPROJ_EMU_SEED");
    e.rng.seed(seed != nullptr ? std::strtoull(seed, nullptr, 10) : 0);
  }
  e.launch_thread = pthread_self();
  for (int i = 0; i < e.n_threads; ++i) fiber(i);  // before the fault handler: may throw
  e.smem = smem_buffer(config.smem);
  const size_t poisoned = round_up(std::max<size_t>(config.smem, 16), 16);
  regs.block_dim = config.block;
  regs.grid_dim = config.grid;
  ++e.launches;
  e.last_kernel = config.kernel;
  e.last_smem = static_cast<int64_t>(config.smem);

  const FaultGuard faults;
  for (unsigned z = 0; z < config.grid.z; ++z) {
    for (unsigned y = 0; y < config.grid.y; ++y) {
      for (unsigned x = 0; x < config.grid.x; ++x) {
        regs.block_idx = dim3(x, y, z);
        // Shared memory starts as garbage on the GPU: NaN here, so a read before a
        // write shows in the result.
        std::memset(e.smem, 0xff, poisoned);
        ++e.blocks;
        run_block();
      }
    }
  }
}

}  // namespace detail

const cudaDeviceProp& device_properties() {
  static const cudaDeviceProp prop = [] {
    cudaDeviceProp p{};
    std::snprintf(p.name, sizeof(p.name), "gradproj CUDA emulator (CPU)");
    // GRADPROJ_EMU_CC: the compute capability as major * 10 + minor (90: H100).
    const char* cc = std::getenv("GRADPROJ_EMU_CC");
    const int capability = cc != nullptr ? std::atoi(cc) : 90;
    p.major = capability / 10;
    p.minor = capability % 10;
    const char* sms = std::getenv("GRADPROJ_EMU_SMS");
    p.multiProcessorCount = sms != nullptr ? std::max(1, std::atoi(sms)) : 3;
    p.warpSize = 32;
    p.maxThreadsPerBlock = detail::kMaxThreads;
    p.maxThreadsPerMultiProcessor = 2048;
    p.sharedMemPerBlock = detail::kStaticSmemLimit;
    p.sharedMemPerBlockOptin =
        detail::parse_bytes(std::getenv("GRADPROJ_EMU_SMEM_OPTIN"), 227 * 1024);
    p.sharedMemPerMultiprocessor = p.sharedMemPerBlockOptin + 1024;
    p.regsPerBlock = 65536;
    p.totalGlobalMem = size_t{1} << 36;
    return p;
  }();
  return prop;
}

}  // namespace gradproj_emu

// ------------------------------------------------------------------ runtime API

using gradproj_emu::device_properties;

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction:
      return "invalid device function";
  }
  return "unknown error";
}

// Launch errors throw from the launch; nothing is left pending.
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaPeekAtLastError() { return cudaSuccess; }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  *prop = device_properties();
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(
    int* blocks, const void* func, int threads, size_t smem) {
  if (func == nullptr || threads < 1 || threads > gradproj_emu::detail::kMaxThreads) {
    return cudaErrorInvalidValue;
  }
  const size_t per_sm = device_properties().sharedMemPerMultiprocessor;
  *blocks = smem == 0 ? 2 : static_cast<int>(std::min<size_t>(2, per_sm / smem));
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (func == nullptr) return cudaErrorInvalidDeviceFunction;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > device_properties().sharedMemPerBlockOptin) {
    return cudaErrorInvalidValue;
  }
  const std::lock_guard<std::mutex> lock(gradproj_emu::detail::attributes_mutex);
  gradproj_emu::detail::attributes()[func].max_dynamic_smem = value;
  return cudaSuccess;
}

// Events and streams order nothing: launches are synchronous. An event is a token.
cudaError_t cudaEventCreate(cudaEvent_t* event) {
  *event = reinterpret_cast<cudaEvent_t>(new char(0));
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  return cudaEventCreate(event);
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t) {
  return event != nullptr ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  return event != nullptr ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (event == nullptr) return cudaErrorInvalidValue;
  delete reinterpret_cast<char*>(event);
  return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t event, unsigned int) {
  return event != nullptr ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// ------------------------------------------------------------------ ops

namespace {

// [launches, blocks, thread switches] since the library was loaded.
std::vector<int64_t> emulator_stats() {
  auto& e = gradproj_emu::detail::emu();
  const std::lock_guard<std::mutex> lock(e.launch_mutex);
  return {e.launches, e.blocks, e.switches};
}

// The demangled name of the last launch's kernel ("" before any launch): which engine
// a launcher chose.
std::string emulator_last_kernel() {
  auto& e = gradproj_emu::detail::emu();
  const std::lock_guard<std::mutex> lock(e.launch_mutex);
  return e.last_kernel == nullptr ? std::string() : gradproj_emu::detail::kernel_name(e.last_kernel);
}

// The last launch's dynamic shared memory in bytes (0 before any launch): the layout a
// launcher chose where the kernel is the same (mma_rows.cuh [stacked]).
int64_t emulator_last_smem() {
  auto& e = gradproj_emu::detail::emu();
  const std::lock_guard<std::mutex> lock(e.launch_mutex);
  return e.last_smem;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gradproj_emu, m) {
  m.def("emulator_stats() -> int[]", &emulator_stats);
  m.def("emulator_last_kernel() -> str", &emulator_last_kernel);
  m.def("emulator_last_smem() -> int", &emulator_last_smem);
}
