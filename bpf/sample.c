/*
 * Sampled capture of Python functions, for ophamin-trace --mode sampled.
 *
 * No probe sits on the interpreter: the cost is per sample, not per call. Handlers:
 *   on_sample     - a CPU-clock perf event (N Hz per CPU): if a target thread is on the
 *                   CPU, walk its Python frame chain and report the spec functions on it
 *   sched_switch  - a target thread leaves a CPU: walk its stack once more (it cannot change
 *                   until the thread runs again, so the time off CPU belongs to that stack);
 *                   it comes back: report when, so user space closes the off-CPU interval
 * The thread state is found by the thread pointer (fs base = pthread_self(), the tstate's
 * thread_id on every version), from a map user space fills by walking the interpreter's
 * thread list. A sample of any other process returns after one comparison; a target stack
 * with no spec function on it is reported only once, when the last one leaves it.
 *
 * Compiled with the layout's OFF_* macros, TARGET_TGID, TASK_PID_OFF (task_struct pid/tgid),
 * TASK_FSBASE_OFF (task_struct thread.fsbase) and MIN_WALK_GAP_NS.
 */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>

#define SAMPLE_DEPTH 128 /* frames walked per sample, innermost first */
#define WALK_BURST 64    /* switch-out walks a thread may make at once (see sample_current) */

#define K_ON_CPU 1      /* a periodic sample on a CPU */
#define K_OFF_CPU 2     /* the thread leaves a CPU: this stack holds until K_BACK */
#define K_BACK 3        /* the thread is put back on a CPU (no stack: the K_OFF_CPU one holds) */
#define F_TRUNCATED 1   /* frames beyond SAMPLE_DEPTH were not looked at */
#define F_NO_STACK 2    /* not walked (over the thread's budget): user space assumes its last stack */

enum counter {
    C_SAMPLES, C_WALKS, C_FRAMES, C_NO_TSTATE, C_READ_FAULTS, C_CLASSIFIED, C_SUBMITTED,
    C_DROPPED, C_TRUNCATED, C_SWITCH_OUTS, C_WALKS_SKIPPED, C_COUNTERS
};

/* One frame, innermost first: id is its spec target, 0 for none, NOT_CACHED when the
 * cache does not know its code object yet; call (spec targets only) is a hash of the
 * objects its first parameters hold, which tells two calls at one frame address apart. */
struct ent { u64 frame; u64 code; u64 call; u32 id; u32 pad; };
#define CALL_KEY_ARGS 4
struct sample {
    u64 ts;
    u32 tid;
    u16 kind;
    u16 n;
    u32 cpu;
    u16 flags;
    u16 targets;    /* frames running a spec function */
    u64 ptr;        /* the thread pointer (pthread_self()): user space's key to the thread state */
    u64 prev_seen;  /* the last moment before this one its stack was known (walked, or back on
                     * a CPU after a walked switch-out), reported or not: a start's lower bound */
    struct ent e[SAMPLE_DEPTH];
};
#define SAMPLE_HEAD __builtin_offsetof(struct sample, e)
struct thread_st {
    u64 tat;         /* switch-out walks: the budget's "theoretical arrival time" (GCRA) */
    u32 had_targets; /* the last walk found spec functions (an empty stack is then reported) */
    u32 off_pending; /* a K_OFF_CPU was reported: report the K_BACK */
    u32 reported;    /* its first walk is always reported: user space then knows it was seen */
    u32 off_walked;  /* its last switch-out was walked: the stack is known until it runs again */
    u64 last_seen;   /* see struct sample.prev_seen */
};

BPF_PERCPU_ARRAY(counters, u64, C_COUNTERS);
BPF_HASH(tstates, u64, u64, 16384);               /* thread pointer -> PyThreadState* */
BPF_TABLE("lru_hash", u32, struct thread_st, threads, 16384);
BPF_PERCPU_ARRAY(scratch, struct sample, 1);
BPF_RINGBUF_OUTPUT(samples, RINGBUF_PAGES);

static __always_inline void count(int c) {
    u64 *v = counters.lookup(&c);
    if (v) (*v)++;
}

#include "pyframe.h"

#define MAX2(a, b) ((a) > (b) ? (a) : (b))
/* Bytes of a frame that hold its code object, its link back and its owner, 8-aligned. */
#define FRAME_HEAD ((MAX2(MAX2(OFF_FRAME_CODE, OFF_FRAME_BACK), OFF_FRAME_OWNER) / 8 + 1) * 8)

static __always_inline u64 current_frame(u64 tstate) {
#if OFF_TSTATE_FRAME >= 0
    return read_ptr(tstate + OFF_TSTATE_FRAME);
#elif OFF_TSTATE_CFRAME >= 0
    u64 cframe = read_ptr(tstate + OFF_TSTATE_CFRAME);
    return cframe ? read_ptr(cframe + OFF_CFRAME_CURRENT_FRAME) : 0;
#else
    return read_ptr(tstate + OFF_TSTATE_CURRENT_FRAME);
#endif
}

#define WAKE_EVERY 64
static __always_inline void emit(struct sample *s) {
    /* The reader is woken only every WAKE_EVERY samples per CPU: a wakeup per sample would
     * cost the target's CPU an interrupt and a reschedule each time (measured: ~9 µs per
     * sample); never waking would leave a reader that sleeps in its poll to find the ring full. */
    u32 k = C_SUBMITTED;
    u64 *sub = counters.lookup(&k);
    u64 wake = sub && ++(*sub) % WAKE_EVERY == 0 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
    /* Only the frames walked travel. */
    u64 size = SAMPLE_HEAD + (u64)(s->n & (2 * SAMPLE_DEPTH - 1)) * sizeof(struct ent);
    if (size > sizeof(*s)) size = sizeof(*s);
    if (samples.ringbuf_output(s, size, wake) != 0) count(C_DROPPED);
}

/* The parameters' objects, hashed (the first CALL_KEY_ARGS of them; a slot past the
 * parameters is a local that changes during the call, so it is left out). */
static __always_inline u64 call_key(u64 frame, u64 code) {
    u64 slot[CALL_KEY_ARGS] = {};
    int argc = 0, kwonly = 0;
    bpf_probe_read_user(&argc, sizeof(argc), (void *)(code + OFF_CODE_ARGCOUNT));
    bpf_probe_read_user(&kwonly, sizeof(kwonly), (void *)(code + OFF_CODE_KWONLYARGCOUNT));
    bpf_probe_read_user(slot, sizeof(slot), (void *)(frame + OFF_FRAME_LOCALSPLUS));
    u64 n = (u64)(argc + kwonly), h = 0xcbf29ce484222325ULL;
#pragma unroll
    for (int i = 0; i < CALL_KEY_ARGS; i++) {
        u64 keep = -(u64)(i < n); /* no branch: all ones for a parameter slot */
        h = (h ^ (slot[i] & keep)) * 0x100000001b3ULL;
    }
    return h;
}

/* Walk the current thread's frames into s->e; s->n of them. 0: no tstate to start from.
 * Each frame is looked up in the classification cache; a code object it does not know yet
 * goes to user space (id NOT_CACHED), which classifies it from the target's memory and fills
 * the cache, so no name is hashed here. One loop, no branch on a read's result (a failed
 * read leaves 0 and the walk ends): the verifier's work stays linear in the depth. */
static __always_inline int walk(struct sample *s) {
    u64 fsbase = s->ptr;
    u64 *ts = tstates.lookup(&fsbase);
    if (!ts) { count(C_NO_TSTATE); return 0; }
    count(C_WALKS);
    u64 frame = current_frame(*ts);
    /* The depth lives in the map value, not in a register: each of the loop's exits would
     * otherwise carry its own constant into the rest of the program, and the verifier would
     * walk that rest once per depth. */
    s->n = 0;
    for (int i = 0; i < SAMPLE_DEPTH; i++) {
        if (!frame) break;
        /* One read per frame: the code object, the link back and the owner are all in its
         * first FRAME_HEAD bytes. */
        u64 head[FRAME_HEAD / 8] = {};
        bpf_probe_read_user(head, sizeof(head), (void *)frame);
        u64 code = head[OFF_FRAME_CODE / 8], back = head[OFF_FRAME_BACK / 8];
#if OFF_FRAME_OWNER >= 0 && PY_MINOR >= 12
        if (((u8 *)head)[OFF_FRAME_OWNER] == 3) code = 0; /* FRAME_OWNED_BY_CSTACK: an entry shim */
#endif
        u32 id = code ? classify_cached(code) : 0;
        struct ent *e = &s->e[i & (SAMPLE_DEPTH - 1)];
        e->frame = frame;
        e->code = code;
        e->id = id;
        s->targets += id != 0; /* in the map value, not a register: states still merge */
        s->n = i + 1;
        frame = back;
    }
    if (frame) { s->flags |= F_TRUNCATED; count(C_TRUNCATED); }
    /* A second pass, for the spec targets only: their call keys. */
    for (int i = 0; i < SAMPLE_DEPTH; i++) {
        if (i >= s->n) break;
        struct ent *e = &s->e[i & (SAMPLE_DEPTH - 1)];
        e->call = 0;
        if (e->id && e->id != NOT_CACHED) e->call = call_key(e->frame, e->code);
    }
    u32 z = C_FRAMES;
    u64 *f = counters.lookup(&z);
    if (f) *f += s->n;
    return 1;
}

static __always_inline struct sample *start(u32 tid, u16 kind, u64 now, u64 task) {
    u32 z = 0;
    struct sample *s = scratch.lookup(&z);
    if (!s) return 0;
    s->ptr = 0;
    s->prev_seen = 0;
    bpf_probe_read_kernel(&s->ptr, sizeof(s->ptr), (void *)(task + TASK_FSBASE_OFF));
    s->ts = now;
    s->tid = tid;
    s->kind = kind;
    s->n = 0;
    s->cpu = bpf_get_smp_processor_id();
    s->flags = 0;
    s->targets = 0;
    return s;
}

/* Walk and report the current (target) thread's stack, if there is something to say. */
static __always_inline void sample_current(u32 tid, u16 kind, u64 now) {
    struct thread_st fresh = {};
    struct thread_st *st = threads.lookup(&tid);
    if (!st) {
        threads.update(&tid, &fresh);
        st = threads.lookup(&tid);
        if (!st) return;
    }
    struct sample *s = start(tid, kind, now, bpf_get_current_task());
    if (!s) return;
    /* Switch-out walks are budgeted per thread: one per MIN_WALK_GAP_NS on average, bursts
     * of WALK_BURST; a thread switching faster is walked that often and no more. */
    u64 tat = st->tat > now ? st->tat : now;
    if (kind == K_OFF_CPU && tat - now > WALK_BURST * MIN_WALK_GAP_NS) {
        /* Over budget: no walk; user space takes its last stack for this one. */
        count(C_WALKS_SKIPPED);
        st->off_walked = 0;
        if (!st->had_targets) return;
        s->flags |= F_NO_STACK;
        st->off_pending = 1;
        emit(s);
        return;
    }
    if (!walk(s)) return;
    if (kind == K_OFF_CPU) st->tat = tat + MIN_WALK_GAP_NS;
    s->prev_seen = st->last_seen;
    st->last_seen = now;
    st->off_walked = kind == K_OFF_CPU;
    u32 targets = s->targets;
    if (!targets && !st->had_targets && st->reported) return; /* nothing was, nothing is */
    st->reported = 1;
    st->had_targets = targets != 0;
    if (kind == K_OFF_CPU) st->off_pending = targets != 0;
    if (!targets) s->n = 0; /* the last spec function left: the stack itself does not matter */
    emit(s);
}

int on_sample(struct bpf_perf_event_data *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TARGET_TGID || (u32)id == 0) return 0;
    count(C_SAMPLES);
    sample_current((u32)id, K_ON_CPU, bpf_ktime_get_ns());
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_switch)
{
    /* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, ...);
     * prev is current: its memory is the one bpf_probe_read_user reads. */
    u64 id = bpf_get_current_pid_tgid();
    u64 now = bpf_ktime_get_ns();
    if ((id >> 32) == TARGET_TGID && (u32)id != 0) {
        count(C_SWITCH_OUTS);
        sample_current((u32)id, K_OFF_CPU, now);
    }
    u32 ids[2] = {}; /* next's pid, tgid */
    bpf_probe_read_kernel(ids, sizeof(ids), (void *)(ctx->args[2] + TASK_PID_OFF));
    if (ids[1] != TARGET_TGID || ids[0] == 0) return 0;
    u32 tid = ids[0];
    struct thread_st *st = threads.lookup(&tid);
    if (!st) {
        /* Not on a CPU since attach: it comes back with the stack user space read at attach. */
        struct thread_st fresh = {.last_seen = now};
        threads.update(&tid, &fresh);
    } else {
        if (st->off_walked) st->last_seen = now; /* the stack walked when it left still holds */
        if (!st->off_pending) return 0;
        st->off_pending = 0;
    }
    struct sample *s = start(tid, K_BACK, now, ctx->args[2]);
    if (s) emit(s);
    return 0;
}
