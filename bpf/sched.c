/*
 * Scheduler and memory accounting per thread of one process, for ophamin-trace.
 *
 * Plain bcc C. Compile with -DTARGET_TGID=<pid>; optional -DRSS_GRANULARITY=<bytes>
 * (default 1 MiB), -DSCHED_MAX_CPUS=<n> (default 64; a power of two, at most 64),
 * -DSCHED_NR_CPUS=<possible CPUs> and -DSCHED_PAGE_FAULTS (only where the
 * exceptions:page_fault_user tracepoint exists, x86).
 *
 * Standalone (tracer/correlate/sched.py) or concatenated into the capture program, which
 * calls sched_read(), sched_proc_read() and rss_read() from its own uprobe handlers.
 *
 * Only tracepoint arguments and bpf helpers are used: the kernel headers bcc compiles
 * with (Debian 6.1) do not match the running kernel, so no kernel struct is ever read.
 *
 * Every interval is closed in the kernel: the cost per event is a hash lookup and a few
 * adds, whatever the switch rate, and nothing is emitted per switch.
 */

#ifndef TARGET_TGID
#error "compile with -DTARGET_TGID=<pid>"
#endif
#ifndef RSS_GRANULARITY
#define RSS_GRANULARITY (1ULL << 20)
#endif
#ifndef SCHED_MAX_CPUS
#define SCHED_MAX_CPUS 64
#endif
#ifndef SCHED_NR_CPUS
#define SCHED_NR_CPUS SCHED_MAX_CPUS /* possible CPUs; the loader passes the real count */
#endif
#ifndef SCHED_MAX_THREADS
#define SCHED_MAX_THREADS 16384
#endif

/* Thread states as this accounting sees them (not the kernel's __state). */
#define SCHED_ST_UNKNOWN 0
#define SCHED_ST_ON_CPU 1
#define SCHED_ST_RUNNABLE 2 /* on a run queue, waiting for a CPU */
#define SCHED_ST_BLOCKED 3  /* sleeping: I/O, lock, timer, futex ... */

/*
 * sched_switch's prev_state is the *reported* state: bits 0..7 are TASK_REPORT
 * (S D T t X Z P I), and TASK_REPORT_MAX (0x100 on 6.x, "R+" in the trace output) marks
 * a preempted task. A task that stays runnable reports 0 (yield, cond_resched) or 0x100
 * (preempted); anything in the low byte means it went to sleep or is dying.
 */
#define SCHED_REPORT_MASK 0xffUL
#define SCHED_REPORT_DEAD 0x30UL /* EXIT_DEAD | EXIT_ZOMBIE: the thread's last switch */
#define SCHED_CLONE_THREAD 0x00010000ULL

struct sched_acct {
    u64 on_cpu_ns;
    u64 run_queue_ns;
    u64 blocked_ns;
    u64 last_ts;       /* start of the open interval (CLOCK_MONOTONIC ns) */
    u32 state;         /* SCHED_ST_* */
    u32 voluntary;     /* switches out while blocking */
    u32 involuntary;   /* switches out while still runnable (preempted, yield) */
    u32 migrations;    /* sched_migrate_task events for this thread */
    u64 cpu_mask;      /* every CPU (< 64) the thread has run on since it was first seen */
    u32 cpu;           /* CPU of the reader at sched_read() time; 0 in the map */
    u32 switch_ins;    /* times the thread was put on a CPU */
    u32 page_faults;   /* user page faults (minor + major); 0 without SCHED_PAGE_FAULTS */
    u32 reserved;
    /* Switch-ins per CPU, wrapping: a span's CPUs are those whose count moved between its
     * entry and exit snapshots, plus the CPU it entered on. */
    u16 cpu_runs[SCHED_MAX_CPUS];
};

struct sched_proc_acct {
    u64 on_cpu_ns; /* closed on-CPU intervals of all the target's threads */
};

struct sched_cpu_slot {
    u32 tid; /* target thread on this CPU now, 0 if none */
    u32 pad;
    u64 since;
};

struct rss_state {
    u64 member[4];   /* bytes: MM_FILEPAGES, MM_ANONPAGES, MM_SWAPENTS, MM_SHMEMPAGES */
    u64 total;       /* file + anon + shmem */
    u64 last_emitted;
    u64 last_ts;
    u64 events;      /* rss_stat events accepted */
    u64 emitted;     /* samples written to rss_samples */
    u64 dropped;     /* samples lost to a full ring buffer */
    u32 mm_id;       /* the target's mm, learnt from its own first event */
    u32 mm_known;
};

struct rss_sample {
    u64 ts;
    u64 total;
    u64 file;
    u64 anon;
    u64 shmem;
};

BPF_HASH(sched_threads, u32, struct sched_acct, SCHED_MAX_THREADS);
BPF_ARRAY(sched_proc, struct sched_proc_acct, 1);
BPF_ARRAY(sched_cpu_cur, struct sched_cpu_slot, SCHED_MAX_CPUS);
BPF_ARRAY(rss_state, struct rss_state, 1);
/* An all-zero value to insert from: a 192-byte struct on the BPF stack would leave the
 * capture program's uprobe handlers little of their 512 bytes. Never written. */
BPF_ARRAY(sched_zero, struct sched_acct, 1);
BPF_RINGBUF_OUTPUT(rss_samples, 16);

static __always_inline int sched_is_target_current(void)
{
    return (bpf_get_current_pid_tgid() >> 32) == TARGET_TGID;
}

static __always_inline void sched_close_interval(struct sched_acct *a, u64 now)
{
    if (now <= a->last_ts)
        return;
    u64 d = now - a->last_ts;
    if (a->state == SCHED_ST_ON_CPU) {
        a->on_cpu_ns += d;
        int z = 0;
        struct sched_proc_acct *p = sched_proc.lookup(&z);
        if (p)
            __sync_fetch_and_add(&p->on_cpu_ns, d);
    } else if (a->state == SCHED_ST_RUNNABLE) {
        a->run_queue_ns += d;
    } else if (a->state == SCHED_ST_BLOCKED) {
        a->blocked_ns += d;
    }
}

static __always_inline void sched_mark_on_cpu(struct sched_acct *a, u32 tid, u32 cpu, u64 now)
{
    a->state = SCHED_ST_ON_CPU;
    a->last_ts = now;
    a->switch_ins++;
    if (cpu < 64)
        a->cpu_mask |= 1ULL << cpu;
    if (cpu < SCHED_MAX_CPUS) {
        a->cpu_runs[cpu & (SCHED_MAX_CPUS - 1)]++;
        struct sched_cpu_slot *s = sched_cpu_cur.lookup(&cpu);
        if (s) {
            s->tid = tid;
            s->since = now;
        }
    }
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u32 prev = args->prev_pid;
    u32 next = args->next_pid;
    /* prev is current: its tgid is known without reading the task. next's is not, but a
     * thread of the target has an entry by the time it is switched in. Most switches on
     * the machine are neither: leave before reading any clock. */
    int prev_is_target = prev != 0 && sched_is_target_current();
    struct sched_acct *na = next != 0 ? sched_threads.lookup(&next) : 0;
    if (!prev_is_target && !na)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u32 cpu = bpf_get_smp_processor_id();

    if (prev_is_target) {
        struct sched_cpu_slot *s = sched_cpu_cur.lookup(&cpu);
        if (s && s->tid == prev)
            s->tid = 0;
        long st = args->prev_state & SCHED_REPORT_MASK;
        struct sched_acct *a = sched_threads.lookup(&prev);
        if (st & SCHED_REPORT_DEAD) {
            /* Last switch of an exiting thread: bank its slice, free its TID for reuse. */
            if (a) {
                sched_close_interval(a, now);
                sched_threads.delete(&prev);
            }
        } else {
            if (!a) {
                int z = 0;
                struct sched_acct *zero = sched_zero.lookup(&z);
                if (zero)
                    sched_threads.insert(&prev, zero);
                a = sched_threads.lookup(&prev);
            }
            if (a) {
                sched_close_interval(a, now);
                if (st != 0) {
                    a->voluntary++;
                    a->state = SCHED_ST_BLOCKED;
                } else {
                    a->involuntary++;
                    a->state = SCHED_ST_RUNNABLE;
                }
                a->last_ts = now;
            }
        }
    }

    if (na) {
        sched_close_interval(na, now);
        sched_mark_on_cpu(na, next, cpu, now);
    }
    return 0;
}

static __always_inline void sched_wakeup_common(u32 tid)
{
    struct sched_acct *a = sched_threads.lookup(&tid);
    if (!a || a->state != SCHED_ST_BLOCKED)
        return;
    u64 now = bpf_ktime_get_ns();
    u64 since = a->last_ts;
    /* The thread's switch-in may run on another CPU meanwhile: only the handler that
     * moves it out of BLOCKED may close the blocked interval, or an on-CPU slice
     * would be rewritten as waiting. */
    /* 64-bit compare-and-swap over state and voluntary (adjacent, 8-aligned; this
     * target's clang has no 32-bit BPF cmpxchg). state is the low half (little-endian). */
    u64 *sv = (u64 *)&a->state;
    u64 old = *sv;
    if ((u32)old != SCHED_ST_BLOCKED)
        return;
    u64 want = (old & ~0xffffffffULL) | SCHED_ST_RUNNABLE;
    if (__sync_val_compare_and_swap(sv, old, want) != old)
        return;
    if (now > since)
        a->blocked_ns += now - since;
    a->last_ts = now;
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    sched_wakeup_common(args->pid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    sched_wakeup_common(args->pid);
    return 0;
}

/* A new thread of the target: fires in the creating thread, before the first wakeup,
 * so the new thread's very first slice is accounted. */
TRACEPOINT_PROBE(task, task_newtask)
{
    if (!(args->clone_flags & SCHED_CLONE_THREAD) || !sched_is_target_current())
        return 0;
    u32 tid = args->pid;
    int z = 0;
    struct sched_acct *zero = sched_zero.lookup(&z);
    if (zero)
        sched_threads.update(&tid, zero);
    struct sched_acct *a = sched_threads.lookup(&tid);
    if (a) {
        a->state = SCHED_ST_BLOCKED;
        a->last_ts = bpf_ktime_get_ns();
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_migrate_task)
{
    u32 tid = args->pid;
    struct sched_acct *a = sched_threads.lookup(&tid);
    if (a)
        a->migrations++;
    return 0;
}

#ifdef SCHED_PAGE_FAULTS
/* Faults are counted only for threads already known: a thread is known from its first
 * switch (or its first sched_read), which costs no faults worth counting. */
TRACEPOINT_PROBE(exceptions, page_fault_user)
{
    if (!sched_is_target_current())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct sched_acct *a = sched_threads.lookup(&tid);
    if (a)
        a->page_faults++;
    return 0;
}
#endif

/*
 * Snapshot of one thread's counters at `now`, the still-open interval added to the bucket
 * of its current state. Call it from a probe running ON that thread (tid == current):
 * then the thread is on a CPU, and a thread not seen yet (no switch since attach) is
 * started here as on-CPU, so deltas between two reads on that thread are exact.
 */
static __always_inline void sched_read(u32 tid, u64 now, struct sched_acct *out)
{
    u32 cpu = bpf_get_smp_processor_id();
    struct sched_acct *a = sched_threads.lookup(&tid);
    if (!a && (u32)bpf_get_current_pid_tgid() == tid && sched_is_target_current()) {
        int z = 0;
        struct sched_acct *zero = sched_zero.lookup(&z);
        if (zero)
            sched_threads.insert(&tid, zero);
        a = sched_threads.lookup(&tid);
        if (a)
            sched_mark_on_cpu(a, tid, cpu, now);
    }
    if (!a) {
        __builtin_memset(out, 0, sizeof(*out));
        out->last_ts = now;
        out->cpu = cpu;
        return;
    }
    __builtin_memcpy(out, a, sizeof(*out));
    if (now > a->last_ts) {
        u64 d = now - a->last_ts;
        if (a->state == SCHED_ST_ON_CPU)
            out->on_cpu_ns += d;
        else if (a->state == SCHED_ST_RUNNABLE)
            out->run_queue_ns += d;
        else if (a->state == SCHED_ST_BLOCKED)
            out->blocked_ns += d;
    }
    out->last_ts = now;
    out->cpu = cpu;
}

/* On-CPU ns of all the target's threads up to `now`, open slices included. The capture
 * takes it at span entry and exit; minus the span thread's own delta it is what the rest
 * of the process ran meanwhile. */
static __always_inline u64 sched_proc_read(u64 now)
{
    int z = 0;
    u64 total = 0;
    struct sched_proc_acct *p = sched_proc.lookup(&z);
    if (p)
        total = p->on_cpu_ns;
#pragma unroll
    for (u32 i = 0; i < SCHED_NR_CPUS && i < SCHED_MAX_CPUS; i++) {
        u32 k = i;
        struct sched_cpu_slot *s = sched_cpu_cur.lookup(&k);
        if (s && s->tid != 0 && now > s->since)
            total += now - s->since;
    }
    return total;
}

/*
 * kmem:rss_stat fires where the counter changes: usually in a thread of the owning
 * process (curr=1), sometimes elsewhere (reclaim, another process's madvise, exit).
 * The target's mm_id is learnt from an event raised by the target itself with curr=1;
 * after that, events are matched on mm_id alone. `size` is in bytes on 6.x.
 */
TRACEPOINT_PROBE(kmem, rss_stat)
{
    int z = 0;
    struct rss_state *r = rss_state.lookup(&z);
    if (!r)
        return 0;
    if (r->mm_known) {
        if (args->mm_id != r->mm_id)
            return 0;
    } else {
        if (!args->curr || !sched_is_target_current())
            return 0;
        r->mm_id = args->mm_id;
        r->mm_known = 1;
    }
    int m = args->member;
    if (m < 0 || m > 3)
        return 0;
    long size = args->size;
    r->member[m & 3] = size > 0 ? (u64)size : 0;
    u64 total = r->member[0] + r->member[1] + r->member[3];
    u64 now = bpf_ktime_get_ns();
    r->total = total;
    r->last_ts = now;
    r->events++;
    u64 moved = total > r->last_emitted ? total - r->last_emitted : r->last_emitted - total;
    if (moved < RSS_GRANULARITY)
        return 0;
    struct rss_sample *s = rss_samples.ringbuf_reserve(sizeof(struct rss_sample));
    if (!s) {
        r->dropped++;
        return 0;
    }
    s->ts = now;
    s->total = total;
    s->file = r->member[0];
    s->anon = r->member[1];
    s->shmem = r->member[3];
    rss_samples.ringbuf_submit(s, 0);
    r->last_emitted = total;
    r->emitted++;
    return 0;
}

/* The target's resident set (file + anon + shmem) in bytes, as of its last change. */
static __always_inline u64 rss_read(void)
{
    int z = 0;
    struct rss_state *r = rss_state.lookup(&z);
    return r ? r->total : 0;
}
