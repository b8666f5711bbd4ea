/*
 * Exact capture of Python function entries and exits, for ophamin-trace.
 *
 * bcc C, compiled once per target with the interpreter's layout as -D macros (OFF_*),
 * the strategy (PY_EVAL_FRAME for 3.9/3.10, else the 3.11+ RESUME/frame-clear strategy)
 * and TARGET_TGID. Handlers (one job each):
 *   on_entry       - a Python frame starts or resumes running (3.9/3.10: eval-loop entry,
 *                    frame in rsi; 3.11+: a RESUME-family handler, frame from the thread state)
 *   on_exit        - a frame ends (3.9/3.10: the eval loop's exit call, retval in rdx; 3.11+:
 *                    the frame-clear function, frame in rdi)
 *   on_eval_entry  - 3.11+: the eval loop is entered from C: learn the thread state (rdi);
 *                    3.11: remember a target frame (rsi) with the stack pointer of this call
 *   on_eval_return - 3.11 (uretprobe): that eval call returns: the frame entered from C
 *                    has exited (rax = result, NULL on exception)
 * On 3.11, frames entered from C end at the eval loop's return, because an LTO build may
 * inline the frame clear into the C caller (Debian's 3.11 does), where no probe can see it;
 * the frame-clear probe then skips the one frame the return already closed.
 *   sched_process_exec - the target exec'd: every later hit is ignored (counted: execs)
 * Filtering is one LRU-hash lookup on the code object's address; a code object not yet
 * seen is classified once by hashing its (qual)name and comparing a path suffix of its
 * file name against the spec's targets, so functions defined after attach are found too.
 * Only target frames reach user space, through a ring buffer; every drop is counted.
 * Every target call is also counted and timed here, in `call_stats`, whether or not its
 * events reach user space: under a load no reader keeps up with, the per-function counts and
 * durations stay exact while the spans that could not be carried are counted as dropped.
 */
#include <uapi/linux/ptrace.h>

#define MAX_ARGS 6
#define PARENTS 2        /* the nearest open span frames above an entry, for its parent */
#define ANCESTOR_WALK 24 /* caller frames looked at to find them */
#define NBUCKETS 256     /* call_stats: log-linear duration buckets, 4 per power of two: all of u64 */
#define STACK_DEPTH 256
#define EVAL_DEPTH 64 /* target frames entered from C, nested, per thread (= the uretprobe limit) */
/* co_flags of code whose frames outlive a return to C (suspended generators/coroutines):
 * their eval-loop return is a yield, not an exit, so only the frame clear ends them. */
#define CO_SUSPENDABLE (0x20 | 0x80 | 0x200) /* GENERATOR | COROUTINE | ASYNC_GENERATOR */

#define EV_ENTRY 1
#define EV_EXIT 2
#define EV_EXIT_EXC 3
#define EV_SUSPEND 4 /* 3.9/3.10: a generator frame yields (leaves the eval loop alive) */
#define EV_RESUME 5  /* 3.11+: RESUME after a yield or await (oparg != 0), not a call's start */

enum counter {
    C_ENTRY_HITS, C_EXIT_HITS, C_TARGET_ENTRIES, C_TARGET_EXITS, C_DROPPED, C_NO_TSTATE,
    C_READ_FAULTS, C_STACK_OVERFLOW, C_CLASSIFIED, C_EVAL_RETURNS_LOST, C_OPEN_FULL, C_FRAME_REG_MISMATCH,
    C_SUBMITTED,
    C_DROPPED_ENTRIES, C_DROPPED_EXITS, /* C_DROPPED split by kind: entries seen + dropped = entries made */
    C_EXECS, C_COUNTERS
};

struct target_cfg { u32 nargs; u8 arg_index[MAX_ARGS]; u8 span; u8 pad; }; /* span: 0 for event targets */

struct arg_val {
    u64 obj;
    u64 type;
    u8 head[32];  /* the object's bytes from offset 16: sizes, values */
    u8 data[48];  /* compact-ASCII string bytes, for str arguments */
};

struct event {
    u64 ts;
    u32 tid;
    u16 kind;
    u16 nargs;
    u32 target_id;
    u32 pad;
    u64 frame;
    u64 code;
    u64 start;        /* exits: when the call began; 0 if before attach (else its entry was dropped) */
    u64 exc_type;     /* exits by exception: the exception's type object */
    char exc_name[48];
#ifdef WITH_SCHED
    struct sched_acct sched;
    u64 rss;
#endif
    /* Exits end here (EV_SIZE_EXIT), entries of targets without attributes after the
     * parents (EV_SIZE_ENTRY): the ring carries and user space decodes only what is set. */
    u64 parents[PARENTS]; /* entries: the nearest caller frames open as span targets (0: none) */
    struct arg_val args[MAX_ARGS];
};
#define EV_SIZE_EXIT __builtin_offsetof(struct event, parents)
#define EV_SIZE_ENTRY __builtin_offsetof(struct event, args)

/* starts: 0 for a resume, whose call began before (3.9/3.10 generators keep their first
 * start in gen_starts); nearest[i]: 1 + the index of the nearest span target (event targets
 * are never parents) at or below i, 0 if none: an entry's parents without a loop. */
struct tstack {
    u32 depth; u32 pad;
    u64 frames[STACK_DEPTH];
    u64 starts[STACK_DEPTH];
    u32 nearest[STACK_DEPTH];
};

/* Per spec target (index = target id), per CPU: the calls that started since attach, and those
 * that ended, timed from their start. */
struct call_stat { u64 started; u64 calls; u64 errors; u64 total_ns; u64 max_ns; u64 hist[NBUCKETS]; };

BPF_ARRAY(targets, struct target_cfg, 1024);
BPF_PERCPU_ARRAY(call_stats, struct call_stat, NTARGETS);
BPF_HASH(tstates, u32, u64, 16384);
BPF_PERCPU_ARRAY(counters, u64, C_COUNTERS);
BPF_PERCPU_ARRAY(scratch, struct event, 1);
#ifdef PY_EVAL_FRAME
/* Keyed by thread state: entry and exit sites both receive it, and user space can seed it
 * (3.9/3.10 thread states carry no kernel TID). */
BPF_HASH(stacks, u64, struct tstack, 16384);
BPF_ARRAY(zero_stack, struct tstack, 1);
BPF_TABLE("lru_hash", u64, u64, gen_starts, 16384); /* suspended generator frame -> its first start */
#endif
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_ARRAY(exec_at, u64, 1); /* when the target exec'd: its old image and frames are gone */
/* 1 while the tracer attaches (user space clears it once the running frames are seeded): on
 * 3.11+ an exit of a target frame nobody registered is then a call that began before the entry
 * probes went in, reported so that it is counted cut at attach, not lost unseen. */
BPF_ARRAY(attaching, u32, 1);

static __always_inline void count(int c) {
    u64 *v = counters.lookup(&c);
    if (v) (*v)++;
}

#include "pyframe.h" /* classify(): is a code object a target? (shared with bpf/sample.c) */


/* The spec target a frame runs (0 if none), its code object and co_flags. */
static __always_inline u32 frame_target(u64 frame, u64 *code, u32 *flags) {
    *code = read_ptr(frame + OFF_FRAME_CODE);
    return classify(*code, flags);
}

/* Duration bucket: 0..3 ns exact, then 4 buckets per power of two (each within 19 %). */
static __always_inline u32 bucket(u64 d) {
    if (d < 4) return d;
    u32 l = bpf_log2l(d) - 1; /* bcc's floor(log2) + 1 */
    return (4 * (l - 1) + ((d >> (l - 2)) & 3)) & (NBUCKETS - 1); /* the mask: for the verifier */
}

/* A target call ended: count and time it (start 0: it began before attach, not timed). */
static __always_inline void account(u32 target_id, u64 start, u64 end, int error) {
    if (!start || end < start) return;
    struct call_stat *s = call_stats.lookup(&target_id);
    if (!s) return;
    u64 d = end - start;
    __sync_fetch_and_add(&s->calls, 1); /* percpu, but a preempted handler may share it */
    s->total_ns += d;
    if (d > s->max_ns) s->max_ns = d;
    if (error) s->errors++;
    s->hist[bucket(d)]++;
}

/* A target call started (not a resume, not a frame already open). */
static __always_inline void count_start(u32 target_id) {
    struct call_stat *s = call_stats.lookup(&target_id);
    if (s) __sync_fetch_and_add(&s->started, 1);
}

static __always_inline struct event *new_event(u64 ts, u32 tid, u16 kind, u32 target_id, u64 frame, u64 code) {
    u32 z = 0;
    struct event *e = scratch.lookup(&z);
    if (!e) return 0;
    e->ts = ts;
    e->tid = tid;
    e->kind = kind;
    e->nargs = 0;
    e->target_id = target_id;
    e->frame = frame;
    e->code = code;
    e->start = 0;
    e->exc_type = 0;
    e->exc_name[0] = 0;
#ifdef WITH_SCHED
    sched_read(tid, e->ts, &e->sched);
    e->rss = rss_read();
#endif
    return e;
}

/* Wake the reader only every WAKE_EVERY events per CPU. A wakeup per event lets the scheduler
 * run the tracer on the target's CPU at once, stalling the target for as long as the tracer
 * takes to turn the event into a span (hundreds of µs, measured in parity); the reader also
 * drains the ring on a timer, so an unwoken event waits at most one poll interval. */
#define WAKE_EVERY 512
static __always_inline void submit(struct event *e, u64 size) {
    u32 k = C_SUBMITTED;
    u64 *n = counters.lookup(&k);
    u64 flags = BPF_RB_NO_WAKEUP;
    if (n && ++(*n) % WAKE_EVERY == 0) flags = BPF_RB_FORCE_WAKEUP;
    if (events.ringbuf_output(e, size, flags) != 0) {
        count(C_DROPPED);
        count(e->kind == EV_ENTRY || e->kind == EV_RESUME ? C_DROPPED_ENTRIES : C_DROPPED_EXITS);
    }
}

static __always_inline void capture_args(struct event *e, u64 frame, u32 target_id) {
    struct target_cfg *cfg = targets.lookup(&target_id);
    if (!cfg) return;
    u32 n = cfg->nargs;
    if (!n) return;
    /* Only the parameters: slots past them are other locals, or past the frame altogether. */
    int argc = 0, kwonly = 0;
    bpf_probe_read_user(&argc, sizeof(argc), (void *)(e->code + OFF_CODE_ARGCOUNT));
    bpf_probe_read_user(&kwonly, sizeof(kwonly), (void *)(e->code + OFF_CODE_KWONLYARGCOUNT));
    if (argc + kwonly < (int)n) n = argc + kwonly > 0 ? argc + kwonly : 0;
    for (int i = 0; i < MAX_ARGS; i++) {
        if (i >= n) break;
        struct arg_val *a = &e->args[i];
        u64 idx = cfg->arg_index[i];
        a->obj = read_ptr(frame + OFF_FRAME_LOCALSPLUS + idx * 8);
        a->type = a->obj ? read_ptr(a->obj + OFF_OBJECT_TYPE) : 0;
        if (a->obj) {
            /* An object at the end of its pool may end where the next page was never touched:
             * a read past the object then fails whole. Read less until it succeeds, and say how
             * much was read (bits 56+ of type), so a value is never decoded from missing bytes. */
            u64 got = sizeof(a->head);
            if (bpf_probe_read_user(a->head, sizeof(a->head), (void *)(a->obj + 16)) != 0) {
                got = 16;
                if (bpf_probe_read_user(a->head, 16, (void *)(a->obj + 16)) != 0) {
                    got = 8;
                    if (bpf_probe_read_user(a->head, 8, (void *)(a->obj + 16)) != 0) got = 0;
                }
            }
            if (a->type == STR_TYPE && got == sizeof(a->head)) {
                /* Only its characters: the bytes after a short string may be unreadable. */
                u64 len = *(u64 *)(a->head + (OFF_UNICODE_LENGTH - 16));
                u32 m = len > sizeof(a->data) ? sizeof(a->data) : (u32)len;
                if (m && bpf_probe_read_user(a->data, m, (void *)(a->obj + OFF_ASCII_DATA)) != 0) got = 0;
            }
            a->type |= got << 56;
        }
        e->nargs = i + 1;
    }
}

static __always_inline void fill_exception(struct event *e, u64 tstate) {
#if OFF_TSTATE_CURRENT_EXCEPTION >= 0
    u64 exc = read_ptr(tstate + OFF_TSTATE_CURRENT_EXCEPTION);
    u64 type = exc ? read_ptr(exc + OFF_OBJECT_TYPE) : 0;
#else
    u64 type = read_ptr(tstate + OFF_TSTATE_CUREXC_TYPE);
#endif
    e->exc_type = type;
    if (type) {
        u64 name = read_ptr(type + OFF_TYPE_NAME);
        bpf_probe_read_user_str(e->exc_name, sizeof(e->exc_name), (void *)name);
    }
}

/* The probes stay armed across an exec (the perf events belong to the task), and a new
 * CPython image would feed them frames of another program: after an exec, nothing. A raw
 * tracepoint: it needs no tracefs format file (unreadable without root), and the task
 * running it is the one that exec'd. */
RAW_TRACEPOINT_PROBE(sched_process_exec) {
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET_TGID) return 0;
    u32 z = 0;
    u64 ts = bpf_ktime_get_ns();
    exec_at.update(&z, &ts);
    count(C_EXECS);
    return 0;
}

static __always_inline int target_pid(u32 *tid) {
    u64 id = bpf_get_current_pid_tgid();
    *tid = (u32)id;
    if ((id >> 32) != TARGET_TGID) return 0;
    u32 z = 0;
    u64 *execd = exec_at.lookup(&z);
    return !(execd && *execd);
}

/* Span targets are the only parents: an event target's frame is never one. */
static __always_inline u32 is_span(u32 target_id) {
    struct target_cfg *cfg = targets.lookup(&target_id);
    return cfg ? cfg->span : 1;
}

static __always_inline int emit_entry(u64 ts, u32 tid, u16 kind, u64 frame, u64 code, u32 target_id,
                                      u64 parent0, u64 parent1) {
    struct event *e = new_event(ts, tid, kind, target_id, frame, code);
    if (!e) return 0;
    e->parents[0] = parent0;
    e->parents[1] = parent1;
    capture_args(e, frame, target_id);
    count(C_TARGET_ENTRIES);
    submit(e, e->nargs ? sizeof(*e) : EV_SIZE_ENTRY);
    return 0;
}

#ifdef PY_EVAL_FRAME
/* ---- 3.9 / 3.10: every frame runs _PyEval_EvalFrameDefault(tstate, frame, throwflag) ---- */

int on_entry(struct pt_regs *ctx) {
    u32 tid;
    if (!target_pid(&tid)) return 0;
    count(C_ENTRY_HITS);
    u64 frame = PT_REGS_PARM2(ctx);
    u64 code;
    u32 flags;
    u32 target_id = frame_target(frame, &code, &flags);
    if (!target_id) return 0;
    u64 ts = bpf_ktime_get_ns();
    /* Target frames are stacked per thread so the exit site (which does not see the frame)
     * can tell whose exit it is; the stack below is also this frame's open callers. */
    u64 tstate = PT_REGS_PARM1(ctx);
    u32 z = 0;
    struct tstack *empty = zero_stack.lookup(&z); /* never written: an all-zero template */
    if (!empty) return 0;
    struct tstack *st = stacks.lookup_or_try_init(&tstate, empty);
    if (!st) return 0;
    u32 d = st->depth;
    if (d >= STACK_DEPTH) { count(C_STACK_OVERFLOW); return 0; }
    /* A generator frame entering for the second time on is a resume, not a call's start. */
#if PY_MINOR >= 10
    s8 fstate = 0;
    bpf_probe_read_user(&fstate, 1, (void *)(frame + OFF_FRAME_STATE));
    u16 kind = fstate == -2 ? EV_ENTRY : EV_RESUME; /* FRAME_CREATED */
#else
    int lasti = 0;
    bpf_probe_read_user(&lasti, sizeof(lasti), (void *)(frame + OFF_FRAME_PREV_INSTR));
    u16 kind = lasti == -1 ? EV_ENTRY : EV_RESUME; /* f_lasti is -1 until the first instruction */
#endif
    u32 n0 = d ? st->nearest[(d - 1) & (STACK_DEPTH - 1)] : 0;
    u32 n1 = n0 > 1 ? st->nearest[(n0 - 2) & (STACK_DEPTH - 1)] : 0;
    u64 p0 = n0 ? st->frames[(n0 - 1) & (STACK_DEPTH - 1)] : 0;
    u64 p1 = n1 ? st->frames[(n1 - 1) & (STACK_DEPTH - 1)] : 0;
    st->frames[d & (STACK_DEPTH - 1)] = frame;
    st->starts[d & (STACK_DEPTH - 1)] = kind == EV_ENTRY ? ts : 0;
    st->nearest[d & (STACK_DEPTH - 1)] = is_span(target_id) ? d + 1 : n0;
    st->depth = d + 1;
    if (kind == EV_ENTRY) count_start(target_id);
    return emit_entry(ts, tid, kind, frame, code, target_id, p0, p1);
}

int on_exit(struct pt_regs *ctx) {
    u32 tid;
    if (!target_pid(&tid)) return 0;
    count(C_EXIT_HITS);
    u64 tstate = PT_REGS_PARM1(ctx);
    struct tstack *st = stacks.lookup(&tstate);
    if (!st || st->depth == 0) return 0;
    u32 d = st->depth - 1;
    u64 top = st->frames[d & (STACK_DEPTH - 1)];
    /* At exit_eval_frame, tstate->frame already holds the exiting frame's f_back: the
     * exiting frame is our top target frame exactly when their f_back agree. */
    u64 cur = read_ptr(tstate + OFF_TSTATE_FRAME);
    if (read_ptr(top + OFF_FRAME_BACK) != cur) return 0;
    st->depth = d;
    u64 ts = bpf_ktime_get_ns();
    u64 start = st->starts[d & (STACK_DEPTH - 1)];
    u64 retval = PT_REGS_PARM3(ctx);
    u16 kind = EV_EXIT;
    if (!retval) {
        kind = EV_EXIT_EXC;
    } else {
        /* A generator that yields leaves the eval loop with its frame still alive. */
#if PY_MINOR >= 10
        s8 fstate = 0;
        bpf_probe_read_user(&fstate, 1, (void *)(top + OFF_FRAME_STATE));
        if (fstate == -1) kind = EV_SUSPEND; /* FRAME_SUSPENDED */
#else
        u64 stacktop = read_ptr(top + OFF_FRAME_STACKTOP);
        if (stacktop) kind = EV_SUSPEND;
#endif
    }
    u64 code;
    u32 flags;
    u32 target_id = frame_target(top, &code, &flags);
    /* A generator's call runs from its first start to its last exit, across suspensions. */
    if (kind == EV_SUSPEND) {
        if (start) gen_starts.update(&top, &start);
    } else {
        if (!start) {
            u64 *first = gen_starts.lookup(&top);
            if (first) { start = *first; gen_starts.delete(&top); }
        }
        account(target_id, start, ts, kind == EV_EXIT_EXC);
    }
    struct event *e = new_event(ts, tid, kind, target_id, top, code);
    if (!e) return 0;
    e->start = start;
    if (kind == EV_EXIT_EXC) fill_exception(e, tstate);
    count(C_TARGET_EXITS);
    submit(e, EV_SIZE_EXIT);
    return 0;
}

#else
/* ---- 3.11+: calls are inlined; RESUME marks a frame starting (or resuming) ---- */

/* Target frames now running or suspended, by address. The exit probe fires for every frame
 * the process releases: one lookup here (a miss, almost always) is all a non-target costs.
 * The value's code address guards against a stale entry whose exit was never seen; start is
 * when the call began (0: before attach, or unknown). User space seeds it at attach with the
 * target frames already on the threads' stacks. */
struct open_frame { u64 code; u64 start; u32 target_id; u32 span; };
BPF_HASH(open_frames, u64, struct open_frame, 65536);


static __always_inline u64 current_frame(u64 tstate) {
#if OFF_TSTATE_CURRENT_FRAME >= 0
    return read_ptr(tstate + OFF_TSTATE_CURRENT_FRAME);
#else
    u64 cframe = read_ptr(tstate + OFF_TSTATE_CFRAME);
    return cframe ? read_ptr(cframe + OFF_CFRAME_CURRENT_FRAME) : 0;
#endif
}

/* A RESUME handler runs with `frame` in a register and the RESUME code unit ({opcode, oparg})
 * at `instr`, or (instr == 0) at frame->prev_instr: read only for a target, as every read
 * here is paid on every Python call. oparg 0 is a call's start, else a resume after yield/await. */
static __always_inline int entry_at(struct pt_regs *ctx, u64 frame, u64 instr) {
    u32 tid;
    if (!target_pid(&tid)) return 0;
    count(C_ENTRY_HITS);
#ifdef VERIFY_FRAME_REG
    /* Tests only: the register the plan proved must hold the frame the thread state names. */
    u64 *vts = tstates.lookup(&tid);
    if (vts && current_frame(*vts) != frame) count(C_FRAME_REG_MISMATCH);
#endif
    if (!frame) return 0;
    u64 code;
    u32 flags;
    u32 target_id = frame_target(frame, &code, &flags);
    if (!target_id) return 0;
    u64 ts = bpf_ktime_get_ns();
    if (!instr) instr = read_ptr(frame + OFF_FRAME_PREV_INSTR);
    u8 oparg = 0;
    bpf_probe_read_user(&oparg, 1, (void *)(instr + 1));
    /* A resume, or a RESUME run again (3.12+ re-runs it after instrumenting), finds its frame
     * open and keeps the call's start; a resume of a frame never seen starts nothing timed. */
    struct open_frame of = {.code = code, .start = oparg ? 0 : ts, .target_id = target_id,
                            .span = is_span(target_id)};
    int started = !oparg;
    if (open_frames.insert(&frame, &of) != 0) {
        struct open_frame *cur = open_frames.lookup(&frame);
        if (!cur) count(C_OPEN_FULL);
        else if (cur->code != code) *cur = of; /* a stale entry: this address holds a new call */
        else started = 0;                      /* this call is open already */
    }
    if (started) count_start(target_id);
    /* The parents: the nearest callers open as span targets (scalars: the verifier refuses
     * what clang makes of a stack array indexed by a counter). */
    u64 p0 = 0, p1 = 0;
    u64 f = frame;
    for (int i = 0; i < ANCESTOR_WALK; i++) {
        f = read_ptr(f + OFF_FRAME_BACK);
        if (!f) break;
        struct open_frame *p = open_frames.lookup(&f);
        if (p && p->span) {
            if (p0) { p1 = f; break; }
            p0 = f;
        }
    }
    return emit_entry(ts, tid, oparg ? EV_RESUME : EV_ENTRY, frame, code, target_id, p0, p1);
}

/* One handler per (frame register, where the instruction pointer is) a site needs; the plan
 * proves the register (the handler's store to frame->prev_instr) and the engine instantiates
 * ENTRY_AT_REG(frame_reg) (prev_instr already stored) or ENTRY_AT_REGS(frame_reg, instr_reg)
 * (the store is the probed instruction itself, so its source register holds the pointer). */
#define ENTRY_AT_REG(F) \
    int on_entry_##F(struct pt_regs *ctx) { return entry_at(ctx, ctx->F, 0); }
#define ENTRY_AT_REGS(F, I) \
    int on_entry_##F##_##I(struct pt_regs *ctx) { return entry_at(ctx, ctx->F, ctx->I); }

/* Where the plan cannot prove a register: the frame from the thread state (two more reads). */
int on_entry(struct pt_regs *ctx) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 *ts = tstates.lookup(&tid);
    if (!ts) { count(C_NO_TSTATE); return 0; }
    return entry_at(ctx, current_frame(*ts), 0);
}

/* Take `frame` out of the open set if it is a target frame; its target id (0 if none) and start. */
static __always_inline u32 close_frame(u64 frame, u64 *code, u64 *start) {
    struct open_frame *of = open_frames.lookup(&frame);
    if (!of) return 0;
    u64 want = of->code;
    u32 target_id = of->target_id;
    *start = of->start;
    open_frames.delete(&frame);
    *code = read_ptr(frame + OFF_FRAME_CODE);
    return *code == want ? target_id : 0;
}

static __always_inline void emit_exit(u32 tid, u64 frame, u64 code, u32 target_id, u64 start, int by_exception) {
    u64 now = bpf_ktime_get_ns();
    struct event *e = new_event(now, tid, EV_EXIT, target_id, frame, code);
    if (!e) return;
    e->start = start;
    u64 *ts = tstates.lookup(&tid);
    if (ts) {
        fill_exception(e, *ts);
        if (by_exception || e->exc_type) e->kind = EV_EXIT_EXC;
    }
    account(target_id, start, now, e->kind == EV_EXIT_EXC);
    count(C_TARGET_EXITS);
    submit(e, EV_SIZE_EXIT);
}

#ifdef ENTRY_FRAMES_END_AT_RETURN
/* 3.11: a frame entered from C is cleared by its C caller after the eval loop returns, and
 * an LTO build may inline that clear where no probe sees it; so such frames end at the eval
 * loop's return (a uretprobe). 3.12+ clear every frame inside the eval loop, before it
 * returns through its entry shim frame, so the frame-clear probe sees them all there. */
struct eval_call { u64 frame; u64 sp; };
struct estack { u32 depth; u32 pad; struct eval_call calls[EVAL_DEPTH]; };
BPF_HASH(estacks, u32, struct estack, 4096);
BPF_ARRAY(zero_estack, struct estack, 1);

static __always_inline void push_entry_frame(struct pt_regs *ctx, u32 tid, u64 frame) {
    u64 code;
    u32 flags;
    u32 target_id = frame_target(frame, &code, &flags);
    if (!target_id || (flags & CO_SUSPENDABLE)) return;
    u32 z = 0;
    struct estack *empty = zero_estack.lookup(&z); /* never written: an all-zero template */
    if (!empty) return;
    struct estack *st = estacks.lookup_or_try_init(&tid, empty);
    if (!st) return;
    u32 d = st->depth;
    if (d >= EVAL_DEPTH) { count(C_STACK_OVERFLOW); return; }
    /* The stack pointer at entry identifies this call: its return has sp + 8. */
    st->calls[d & (EVAL_DEPTH - 1)].frame = frame;
    st->calls[d & (EVAL_DEPTH - 1)].sp = PT_REGS_SP(ctx);
    st->depth = d + 1;
}

int on_eval_return(struct pt_regs *ctx) {
    u32 tid;
    if (!target_pid(&tid)) return 0;
    count(C_EXIT_HITS);
    struct estack *st = estacks.lookup(&tid);
    if (!st || st->depth == 0) return 0;
    u64 sp = PT_REGS_SP(ctx) - 8;
    /* Stacked calls have strictly decreasing sp. Those below this one's sp are calls whose
     * return probe the kernel did not install (uretprobes nest at most 64 deep per task):
     * they are over, unseen; drop them, counted. */
    u32 d = st->depth;
    u32 keep = 0;
#pragma clang loop unroll(full)
    for (int i = 0; i < EVAL_DEPTH; i++) {
        if (i < d && st->calls[i].sp >= sp) keep = i + 1;
    }
    for (u32 lost = keep; lost < d && lost < EVAL_DEPTH; lost++) count(C_EVAL_RETURNS_LOST);
    st->depth = keep;
    if (keep == 0 || st->calls[(keep - 1) & (EVAL_DEPTH - 1)].sp != sp) return 0; /* not a target's call */
    u64 frame = st->calls[(keep - 1) & (EVAL_DEPTH - 1)].frame;
    st->depth = keep - 1;
    /* Closing it here also makes the frame-clear probe, where it follows, pass it over. */
    u64 code, start = 0;
    u32 target_id = close_frame(frame, &code, &start);
    if (target_id) emit_exit(tid, frame, code, target_id, start, PT_REGS_RC(ctx) == 0);
    return 0;
}
#else
static __always_inline void push_entry_frame(struct pt_regs *ctx, u32 tid, u64 frame) {}
#endif

int on_eval_entry(struct pt_regs *ctx) {
    u32 tid;
    if (!target_pid(&tid)) return 0;
    u64 ts = PT_REGS_PARM1(ctx);
    tstates.update(&tid, &ts);
    push_entry_frame(ctx, tid, PT_REGS_PARM2(ctx));
    return 0;
}

int on_exit(struct pt_regs *ctx) {
    u32 tid;
    if (!target_pid(&tid)) return 0;
    count(C_EXIT_HITS);
    u64 frame = PT_REGS_PARM1(ctx);
    u64 code, start = 0;
    u32 target_id = close_frame(frame, &code, &start);
    if (!target_id) {
        u32 z = 0;
        u32 *a = attaching.lookup(&z);
        u32 flags;
        if (a && *a) target_id = frame_target(frame, &code, &flags);
    }
    if (target_id) emit_exit(tid, frame, code, target_id, start, 0);
    return 0;
}
#endif
