/*
 * Exact capture of Python function entries and exits, for ophamin-trace.
 *
 * bcc C, compiled once per target with the interpreter's layout as -D macros (OFF_*),
 * the strategy (PY_EVAL_FRAME for 3.9/3.10, else the 3.11+ RESUME/frame-clear strategy)
 * and TARGET_TGID. Handlers (one job each):
 *   on_entry   - a Python frame starts or resumes running (3.9/3.10: eval-loop entry,
 *                frame in rsi; 3.11+: a RESUME-family handler, frame from the thread state)
 *   on_exit    - a frame ends (3.9/3.10: the eval loop's exit call, retval in rdx; 3.11+:
 *                the frame-clear function, frame in rdi)
 *   on_tstate  - 3.11+: eval-loop entry hands us the thread state (rdi), learnt per TID
 *   sched_process_exec - the target exec'd: every later hit is ignored (counted: execs)
 * Filtering is one LRU-hash lookup on the code object's address; a code object not yet
 * seen is classified once by hashing its (qual)name and comparing a path suffix of its
 * file name against the spec's targets, so functions defined after attach are found too.
 * Only target frames reach user space, through a ring buffer; every drop is counted.
 */
#include <uapi/linux/ptrace.h>

#define NAME_MAX_BYTES 64
#define MAX_SLOTS 4
#define MAX_ARGS 6
#define ANCESTORS 24
#define STACK_DEPTH 256

#define EV_ENTRY 1
#define EV_EXIT 2
#define EV_EXIT_EXC 3
#define EV_SUSPEND 4 /* 3.9/3.10: a generator frame yields (leaves the eval loop alive) */

enum counter {
    C_ENTRY_HITS, C_EXIT_HITS, C_TARGET_ENTRIES, C_TARGET_EXITS, C_DROPPED, C_NO_TSTATE,
    C_READ_FAULTS, C_STACK_OVERFLOW, C_CLASSIFIED,
    C_DROPPED_ENTRIES, C_DROPPED_EXITS, /* C_DROPPED split by kind: entries seen + dropped = entries made */
    C_EXECS, C_COUNTERS
};

struct code_info {
    u64 name_obj;  /* the code's (qual)name object when classified: detects address reuse */
    u32 target_id; /* 0 = not a target */
    u32 pad;
};
struct name_key { u64 hash; u32 slot; u32 pad; };
struct name_val {
    u32 target_id;
    u32 suffix_len;  /* bytes compared at the end of co_filename */
    u64 suffix_hash;
    u32 firstlineno; /* 0 = any */
    u32 exact;       /* 1 = the whole file name must match (a script run by path) */
};
struct target_cfg { u32 nargs; u8 arg_index[MAX_ARGS]; u8 pad[2]; };

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
    u64 exc_type;     /* exits by exception: the exception's type object */
    char exc_name[48];
    u64 ancestors[ANCESTORS]; /* entries: the caller frames, nearest first */
#ifdef WITH_SCHED
    struct sched_acct sched;
    u64 rss;
#endif
    struct arg_val args[MAX_ARGS];
};

struct tstack { u32 depth; u32 pad; u64 frames[STACK_DEPTH]; };

BPF_TABLE("lru_hash", u64, struct code_info, code_cache, 65536);
BPF_HASH(names, struct name_key, struct name_val, 1024);
BPF_ARRAY(targets, struct target_cfg, 1024);
BPF_HASH(tstates, u32, u64, 16384);
BPF_PERCPU_ARRAY(counters, u64, C_COUNTERS);
BPF_PERCPU_ARRAY(scratch, struct event, 1);
struct strbuf_t { char b[NAME_MAX_BYTES + 16]; }; /* slack: clang unrolls the hash loop past the end */
BPF_PERCPU_ARRAY(strbuf, struct strbuf_t, 1);
#ifdef PY_EVAL_FRAME
BPF_HASH(stacks, u32, struct tstack, 16384);
BPF_ARRAY(zero_stack, struct tstack, 1);
#endif
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_ARRAY(exec_at, u64, 1); /* when the target exec'd: its old image and frames are gone */

static __always_inline void count(int c) {
    u64 *v = counters.lookup(&c);
    if (v) (*v)++;
}

static __always_inline u64 read_ptr(u64 addr) {
    u64 v = 0;
    if (bpf_probe_read_user(&v, sizeof(v), (void *)addr) != 0) count(C_READ_FAULTS);
    return v;
}

/* FNV-1a over the length and the first NAME_MAX_BYTES bytes (user space hashes alike). */
static __always_inline u64 fnv(const char *buf, u32 len) {
    u64 h = 0xcbf29ce484222325ULL;
    h ^= len; h *= 0x100000001b3ULL;
    /* Fully unrolled: the verifier then sees constant offsets into the buffer. */
#pragma clang loop unroll(full)
    for (int i = 0; i < NAME_MAX_BYTES; i++) {
        if (i < len) { h ^= (u8)buf[i]; h *= 0x100000001b3ULL; }
    }
    return h;
}

/* Hash of bytes [start, start+len) of a compact-ASCII str object; 0 if not compact ASCII. */
static __always_inline u64 str_hash(u64 obj, u32 start, u32 len) {
    u32 z = 0;
    struct strbuf_t *sb = strbuf.lookup(&z);
    if (!sb) return 0;
    char *buf = sb->b;
    u32 state = 0;
    bpf_probe_read_user(&state, sizeof(state), (void *)(obj + OFF_UNICODE_STATE));
    if (!((state >> OFF_UNICODE_ASCII_SHIFT) & 1) || !((state >> OFF_UNICODE_COMPACT_SHIFT) & 1))
        return 0;
    u32 n = len > NAME_MAX_BYTES ? NAME_MAX_BYTES : len;
    if (n == 0) return fnv(buf, 0);
    if (bpf_probe_read_user(buf, n & (NAME_MAX_BYTES - 1) ? n & (NAME_MAX_BYTES - 1) : NAME_MAX_BYTES,
                            (void *)(obj + OFF_ASCII_DATA + start)) != 0)
        return 0;
    return fnv(buf, len);
}

static __always_inline u64 str_len(u64 obj) {
    u64 n = 0;
    bpf_probe_read_user(&n, sizeof(n), (void *)(obj + OFF_UNICODE_LENGTH));
    return n;
}

/* Is this code object a target? Cached per code address; a cached entry is trusted only
 * while the code still points at the same name object (code memory gets reused). */
static __always_inline u32 classify(u64 code) {
    u64 name_obj = read_ptr(code + OFF_CODE_MATCH_NAME);
    struct code_info *ci = code_cache.lookup(&code);
    if (ci && ci->name_obj == name_obj) return ci->target_id;
    count(C_CLASSIFIED);
    struct code_info fresh = {.name_obj = name_obj, .target_id = 0};
    u64 nlen = str_len(name_obj);
    struct name_key k = {.hash = str_hash(name_obj, 0, nlen), .slot = 0};
    u64 file = 0;
    u64 flen = 0;
    for (int s = 0; s < MAX_SLOTS; s++) {
        k.slot = s;
        struct name_val *nv = names.lookup(&k);
        if (!nv) break;
        if (!file) { file = read_ptr(code + OFF_CODE_FILENAME); flen = str_len(file); }
        if (nv->exact ? flen != nv->suffix_len : flen < nv->suffix_len) continue;
        if (str_hash(file, flen - nv->suffix_len, nv->suffix_len) != nv->suffix_hash) continue;
        if (nv->firstlineno) {
            u32 line = 0;
            bpf_probe_read_user(&line, sizeof(line), (void *)(code + OFF_CODE_FIRSTLINENO));
            if (line != nv->firstlineno) continue;
        }
        fresh.target_id = nv->target_id;
        break;
    }
    code_cache.update(&code, &fresh);
    return fresh.target_id;
}

/* The spec target a frame runs (0 if none), and its code object. */
static __always_inline u32 frame_target(u64 frame, u64 *code) {
    *code = read_ptr(frame + OFF_FRAME_CODE);
    return classify(*code);
}

static __always_inline struct event *new_event(u32 tid, u16 kind, u32 target_id, u64 frame, u64 code) {
    u32 z = 0;
    struct event *e = scratch.lookup(&z);
    if (!e) return 0;
    e->ts = bpf_ktime_get_ns();
    e->tid = tid;
    e->kind = kind;
    e->nargs = 0;
    e->target_id = target_id;
    e->frame = frame;
    e->code = code;
    e->exc_type = 0;
    e->exc_name[0] = 0;
#ifdef WITH_SCHED
    sched_read(tid, e->ts, &e->sched);
    e->rss = rss_read();
#endif
    return e;
}

static __always_inline void submit(struct event *e) {
    if (events.ringbuf_output(e, sizeof(*e), 0) != 0) {
        count(C_DROPPED);
        count(e->kind == EV_ENTRY ? C_DROPPED_ENTRIES : C_DROPPED_EXITS);
    }
}

static __always_inline void capture_args(struct event *e, u64 frame, u32 target_id) {
    struct target_cfg *cfg = targets.lookup(&target_id);
    if (!cfg) return;
    u32 n = cfg->nargs;
    for (int i = 0; i < MAX_ARGS; i++) {
        if (i >= n) break;
        struct arg_val *a = &e->args[i];
        u64 idx = cfg->arg_index[i];
        a->obj = read_ptr(frame + OFF_FRAME_LOCALSPLUS + idx * 8);
        a->type = a->obj ? read_ptr(a->obj + OFF_OBJECT_TYPE) : 0;
        if (a->obj) {
            bpf_probe_read_user(a->head, sizeof(a->head), (void *)(a->obj + 16));
            bpf_probe_read_user(a->data, sizeof(a->data), (void *)(a->obj + OFF_ASCII_DATA));
        }
        e->nargs = i + 1;
    }
}

static __always_inline void fill_ancestors(struct event *e, u64 frame) {
    u64 f = frame;
    for (int i = 0; i < ANCESTORS; i++) {
        f = f ? read_ptr(f + OFF_FRAME_BACK) : 0;
        e->ancestors[i] = f;
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

static __always_inline int emit_entry(u32 tid, u64 frame, u64 code, u32 target_id) {
    struct event *e = new_event(tid, EV_ENTRY, target_id, frame, code);
    if (!e) return 0;
    fill_ancestors(e, frame);
    capture_args(e, frame, target_id);
    count(C_TARGET_ENTRIES);
    submit(e);
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
    u32 target_id = frame_target(frame, &code);
    if (!target_id) return 0;
    /* Target frames are stacked per thread so the exit site (which does not see the frame)
     * can tell whose exit it is. */
    u32 z = 0;
    struct tstack *empty = zero_stack.lookup(&z); /* never written: an all-zero template */
    if (!empty) return 0;
    struct tstack *st = stacks.lookup_or_try_init(&tid, empty);
    if (!st) return 0;
    u32 d = st->depth;
    if (d >= STACK_DEPTH) { count(C_STACK_OVERFLOW); return 0; }
    st->frames[d & (STACK_DEPTH - 1)] = frame;
    st->depth = d + 1;
    return emit_entry(tid, frame, code, target_id);
}

int on_exit(struct pt_regs *ctx) {
    u32 tid;
    if (!target_pid(&tid)) return 0;
    count(C_EXIT_HITS);
    struct tstack *st = stacks.lookup(&tid);
    if (!st || st->depth == 0) return 0;
    u32 d = st->depth - 1;
    u64 top = st->frames[d & (STACK_DEPTH - 1)];
    /* At exit_eval_frame, tstate->frame already holds the exiting frame's f_back: the
     * exiting frame is our top target frame exactly when their f_back agree. */
    u64 tstate = PT_REGS_PARM1(ctx);
    u64 cur = read_ptr(tstate + OFF_TSTATE_FRAME);
    if (read_ptr(top + OFF_FRAME_BACK) != cur) return 0;
    st->depth = d;
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
    struct event *e = new_event(tid, kind, frame_target(top, &code), top, code);
    if (!e) return 0;
    if (kind == EV_EXIT_EXC) fill_exception(e, tstate);
    count(C_TARGET_EXITS);
    submit(e);
    return 0;
}

#else
/* ---- 3.11+: calls are inlined; RESUME marks a frame starting (or resuming) ---- */

int on_tstate(struct pt_regs *ctx) {
    u32 tid;
    if (!target_pid(&tid)) return 0;
    u64 ts = PT_REGS_PARM1(ctx);
    tstates.update(&tid, &ts);
    return 0;
}

static __always_inline u64 current_frame(u64 tstate) {
#if OFF_TSTATE_CURRENT_FRAME >= 0
    return read_ptr(tstate + OFF_TSTATE_CURRENT_FRAME);
#else
    u64 cframe = read_ptr(tstate + OFF_TSTATE_CFRAME);
    return cframe ? read_ptr(cframe + OFF_CFRAME_CURRENT_FRAME) : 0;
#endif
}

int on_entry(struct pt_regs *ctx) {
    u32 tid;
    if (!target_pid(&tid)) return 0;
    count(C_ENTRY_HITS);
    u64 *ts = tstates.lookup(&tid);
    if (!ts) { count(C_NO_TSTATE); return 0; }
    u64 frame = current_frame(*ts);
    if (!frame) return 0;
    u64 code;
    u32 target_id = frame_target(frame, &code);
    if (!target_id) return 0;
    return emit_entry(tid, frame, code, target_id);
}

int on_exit(struct pt_regs *ctx) {
    u32 tid;
    if (!target_pid(&tid)) return 0;
    count(C_EXIT_HITS);
    u64 frame = PT_REGS_PARM1(ctx);
    u64 code;
    u32 target_id = frame_target(frame, &code);
    if (!target_id) return 0;
    struct event *e = new_event(tid, EV_EXIT, target_id, frame, code);
    if (!e) return 0;
    u64 *ts = tstates.lookup(&tid);
    if (ts) {
        fill_exception(e, *ts);
        if (e->exc_type) e->kind = EV_EXIT_EXC;
    }
    count(C_TARGET_EXITS);
    submit(e);
    return 0;
}
#endif
