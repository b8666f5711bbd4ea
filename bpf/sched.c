/*
 * Scheduler and memory accounting per thread of one process, for ophamin-trace.
 *
 * Plain bcc C. Compile with -DTARGET_TGID=<pid> and the running kernel's task_struct
 * offsets from its BTF (-DTASK_PID_OFF, -DTASK_TGID_OFF, -DTASK_SUM_EXEC_OFF: see
 * tracer/correlate/btf.py; the kernel headers bcc compiles with are Debian's, not the
 * running kernel's, so no kernel struct is ever read through them). Optional:
 * -DTASK_ARRIVAL_OFF (task_struct.sched_info.last_arrival, where CONFIG_SCHED_INFO is set),
 * -DRSS_GRANULARITY=<bytes> (default 1 MiB), -DSCHED_MAX_CPUS=<n> (default 64; a power of
 * two, at most 64), -DSCHED_NR_CPUS=<possible CPUs> and -DSCHED_PAGE_FAULTS (only where
 * the exceptions:page_fault_user tracepoint exists, x86).
 *
 * Standalone (tracer/correlate/sched.py) or concatenated into the capture program, which
 * calls sched_read() from its own uprobe handlers.
 *
 * Why raw tracepoints: a classic (perf-event) tracepoint program is skipped whenever the
 * CPU's bpf_prog_active is held (a map syscall from user space, an interrupted kprobe or
 * perf program), losing sched_wakeup events. Raw tracepoint programs only skip when they
 * themselves are already running on that CPU; the kernel counts each skip per program
 * ("recursion_misses", read back by the loader).
 *
 * Why se.sum_exec_runtime: on some kernels not every context switch reaches the
 * sched_switch tracepoint (measured on this project's 6.18 VM: about 1 switch-in in 100
 * of a busy thread is never reported, while its switch-outs all are). Each interval is
 * therefore closed at a switch with the CPU time the kernel itself charged the thread
 * meanwhile, read from the task, so a missed switch-in costs no on-CPU time; the
 * unreported transitions are counted in sched_health.
 *
 * Every interval is closed in the kernel: per event the cost is a map lookup, one or two
 * reads of the task and a few adds, whatever the switch rate; nothing is emitted per switch.
 */

#ifndef TARGET_TGID
#error "compile with -DTARGET_TGID=<pid>"
#endif
#if !defined(TASK_PID_OFF) || !defined(TASK_TGID_OFF) || !defined(TASK_SUM_EXEC_OFF)
#error "compile with the task_struct offsets from the kernel's BTF (tracer.correlate.btf)"
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

#define SCHED_F_EXEC 1      /* sum_exec_ns holds the kernel's value at last_ts */
#define SCHED_F_IN_SEEN 2   /* ON_CPU since a reported switch-in (last_ts is its time) */
#define SCHED_MAX_CARRY 1000000ULL /* ns; see sched_close_exact */
#define SCHED_TASK_DEAD 0x80 /* TASK_DEAD in the raw prev_state: the thread's last switch */

struct sched_acct {
    u64 on_cpu_ns;
    u64 run_queue_ns;
    u64 blocked_ns;
    u64 last_ts;       /* start of the open interval (CLOCK_MONOTONIC ns) */
    u32 state;         /* SCHED_ST_*; 8-aligned, with voluntary: see sched_wakeup_common */
    u32 voluntary;     /* switches out while blocking */
    u32 involuntary;   /* switches out while still runnable (preempted, yield) */
    u32 migrations;    /* sched_migrate_task events for this thread */
    u64 cpu_mask;      /* every CPU (< 64) the thread has run on since it was first seen */
    u32 cpu;           /* CPU of the reader at sched_read() time; 0 in the map */
    u32 switch_ins;    /* times the thread was put on a CPU */
    u32 page_faults;   /* user page faults (minor + major); 0 without SCHED_PAGE_FAULTS */
    u32 flags;         /* SCHED_F_* */
    u64 sum_exec_ns;   /* the kernel's se.sum_exec_runtime of the thread at last_ts */
    u64 carry_ns;      /* of it, CPU not yet counted in on_cpu_ns (see sched_close_exact) */
    /* Filled by sched_read() only (0 in the map): the process at the same instant. */
    u64 proc_on_cpu_ns;     /* on-CPU ns of all the target's threads */
    u64 proc_page_faults;   /* user page faults of all the target's threads */
    u64 rss_bytes;          /* resident set, file + anon + shmem */
    /* Switch-ins per CPU, wrapping: a span's CPUs are those whose count moved between its
     * entry and exit snapshots, plus the CPU it entered on. */
    u16 cpu_runs[SCHED_MAX_CPUS];
};

struct sched_proc_acct {
    u64 on_cpu_ns;   /* closed on-CPU intervals of all the target's threads */
    u64 page_faults; /* user page faults of all the target's threads */
};

struct sched_cpu_slot {
    u32 tid;         /* target thread on this CPU now, 0 if none */
    u32 arrival_ok;  /* arrival_off has been measured on this CPU */
    u64 since;       /* when it was switched in */
    u64 last_switch; /* the last context switch this CPU reported (any task without
                      * TASK_ARRIVAL_OFF, else the target's) */
    s64 arrival_off; /* CLOCK_MONOTONIC minus the scheduler's clock, from a reported switch-in */
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

/* Transitions the tracepoints did not report, noticed at the next event of the thread: a
 * switch-in of a thread already on a CPU (its switch-out was missed), a switch-out of one
 * not on a CPU (its switch-in was missed: no time lost, the kernel's CPU time closes the
 * interval), a snapshot on a thread not on a CPU (the same, but the start of its running
 * slice is estimated), a switch-in of one still blocked (its wakeup was missed); and
 * threads the map had no room for. */
#define SCHED_H_MISSED_OUT 0
#define SCHED_H_MISSED_IN 1
#define SCHED_H_MISSED_IN_SNAPSHOT 2
#define SCHED_H_MISSED_WAKEUP 3
#define SCHED_H_MAP_FULL 4
#define SCHED_H_COUNTERS 5

BPF_HASH(sched_threads, u32, struct sched_acct, SCHED_MAX_THREADS);
BPF_ARRAY(sched_proc, struct sched_proc_acct, 1);
BPF_ARRAY(sched_cpu_cur, struct sched_cpu_slot, SCHED_MAX_CPUS);
BPF_PERCPU_ARRAY(sched_health, u64, SCHED_H_COUNTERS);
BPF_ARRAY(rss_state, struct rss_state, 1);
/* An all-zero value to insert from: a struct this size on the BPF stack would leave the
 * capture program's uprobe handlers little of their 512 bytes. Never written. */
BPF_ARRAY(sched_zero, struct sched_acct, 1);
BPF_RINGBUF_OUTPUT(rss_samples, 16);

static __always_inline int sched_is_target_current(void)
{
    return (bpf_get_current_pid_tgid() >> 32) == TARGET_TGID;
}

static __always_inline void sched_count(int c)
{
    u64 *v = sched_health.lookup(&c);
    if (v)
        (*v)++;
}

/* (tgid << 32) | pid of a task, as bpf_get_current_pid_tgid() gives them for current. */
static __always_inline u64 sched_task_ids(u64 task)
{
    u32 ids[2] = {};
    bpf_probe_read_kernel(ids, sizeof(ids), (void *)(task + TASK_PID_OFF));
    return ((u64)ids[1] << 32) | ids[0];
}

/* The kernel's CPU time of a task (se.sum_exec_runtime): exact for a task that is not
 * running, and for prev at sched_switch (the scheduler has just updated it). */
static __always_inline u64 sched_task_exec(u64 task)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)(task + TASK_SUM_EXEC_OFF));
    return v;
}

static __always_inline struct sched_acct *sched_entry(u32 tid)
{
    struct sched_acct *a = sched_threads.lookup(&tid);
    if (a)
        return a;
    int z = 0;
    struct sched_acct *zero = sched_zero.lookup(&z);
    if (zero)
        sched_threads.insert(&tid, zero);
    a = sched_threads.lookup(&tid);
    if (!a)
        sched_count(SCHED_H_MAP_FULL);
    return a;
}

static __always_inline void sched_add_on_cpu(struct sched_acct *a, u64 d)
{
    a->on_cpu_ns += d;
    int z = 0;
    struct sched_proc_acct *p = sched_proc.lookup(&z);
    if (p)
        __sync_fetch_and_add(&p->on_cpu_ns, d);
}

/*
 * Close [last_ts, now) of a thread that is not running at `now`, `exec` being its exact
 * sum_exec_runtime. The CPU the kernel charged it meanwhile is on-CPU time, whichever
 * transitions were reported; the rest of the interval is waiting, counted in the bucket of
 * the state it was left in (time a running thread's CPU was taken by the hypervisor or by
 * interrupts counts as run-queue time). Without a baseline (first seen running) the clock
 * decides.
 */
static __always_inline void sched_close_exact(struct sched_acct *a, u64 now, u64 exec)
{
    u64 wall = now > a->last_ts ? now - a->last_ts : 0;
    u64 cpu = 0;
    u64 base = a->sum_exec_ns - a->carry_ns;
    if ((a->flags & SCHED_F_EXEC) && exec >= base)
        cpu = exec - base;
    else if (a->state == SCHED_ST_ON_CPU)
        cpu = wall;
    /* The kernel's slice runs from its own clock reads, a µs or so before each
     * tracepoint: it can exceed the wall time between two tracepoints. The excess is
     * carried into the next interval (at most SCHED_MAX_CARRY) so the buckets still
     * partition the wall time and no CPU time is lost. */
    u64 carry = 0;
    if (cpu > wall) {
        carry = cpu - wall;
        cpu = wall;
        if (carry > SCHED_MAX_CARRY)
            carry = 0;
    }
    if (a->state != SCHED_ST_UNKNOWN) {
        sched_add_on_cpu(a, cpu);
        if (a->state == SCHED_ST_BLOCKED)
            a->blocked_ns += wall - cpu;
        else
            a->run_queue_ns += wall - cpu;
    }
    a->sum_exec_ns = exec;
    a->carry_ns = carry;
    a->flags |= SCHED_F_EXEC;
}

static __always_inline void sched_mark_on_cpu(struct sched_acct *a, u32 tid, u32 cpu, u64 now,
                                              struct sched_cpu_slot *slot, u32 reported)
{
    a->state = SCHED_ST_ON_CPU;
    a->last_ts = now;
    a->flags = reported ? a->flags | SCHED_F_IN_SEEN : a->flags & ~SCHED_F_IN_SEEN;
    a->switch_ins++;
    if (cpu < 64)
        a->cpu_mask |= 1ULL << cpu;
    if (cpu < SCHED_MAX_CPUS)
        a->cpu_runs[cpu & (SCHED_MAX_CPUS - 1)]++;
    if (slot) {
        slot->tid = tid;
        slot->since = now;
    }
}

RAW_TRACEPOINT_PROBE(sched_switch)
{
    /* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
     *          unsigned int prev_state); prev is current. */
    u64 prev_id = bpf_get_current_pid_tgid();
    u32 prev = (u32)prev_id;
    u64 next_task = ctx->args[2];
    u64 next_id = sched_task_ids(next_task);
    u32 next = (u32)next_id;
    int prev_is_target = prev != 0 && (prev_id >> 32) == TARGET_TGID;
    int next_is_target = next != 0 && (next_id >> 32) == TARGET_TGID;
#ifdef TASK_ARRIVAL_OFF
    /* Most switches on the machine are not the target's: leave before any clock read. */
    if (!prev_is_target && !next_is_target)
        return 0;
#endif
    u32 cpu = bpf_get_smp_processor_id();
    u64 now = bpf_ktime_get_ns();
    struct sched_cpu_slot *slot = sched_cpu_cur.lookup(&cpu);
    if (slot) {
        /* Without the scheduler's arrival stamp, an unreported switch-in is dated from
         * the last switch this CPU reported: every switch keeps that time. */
        slot->last_switch = now;
        if (slot->tid != 0 && slot->tid != prev)
            slot->tid = 0; /* its switch-out went unreported: it is not running here */
    }
    if (!prev_is_target && !next_is_target)
        return 0;

    if (prev_is_target) {
        if (slot && slot->tid == prev)
            slot->tid = 0;
        u64 exec = sched_task_exec(ctx->args[1]);
        u64 st = ctx->args[3];
        struct sched_acct *a = sched_entry(prev);
#ifdef TASK_ARRIVAL_OFF
        if (a && slot && a->state == SCHED_ST_ON_CPU && (a->flags & SCHED_F_IN_SEEN)) {
            /* The scheduler stamped this slice's switch-in with its own clock; we saw it
             * at last_ts. Their difference converts such stamps (see sched_read). */
            u64 arrival = 0;
            bpf_probe_read_kernel(&arrival, sizeof(arrival), (void *)(ctx->args[1] + TASK_ARRIVAL_OFF));
            if (arrival) {
                slot->arrival_off = (s64)(a->last_ts - arrival);
                slot->arrival_ok = 1;
            }
        }
#endif
        if (a) {
            if (a->state != SCHED_ST_ON_CPU && a->state != SCHED_ST_UNKNOWN)
                sched_count(SCHED_H_MISSED_IN);
            sched_close_exact(a, now, exec);
            if (st & SCHED_TASK_DEAD) {
                /* Last switch of an exiting thread: its time is banked in sched_proc;
                 * free its TID for reuse. */
                sched_threads.delete(&prev);
            } else {
                if (!(ctx->args[0] & 1) && st != 0) {
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

    if (next_is_target) {
        /* A thread gets its entry at its first switch-in after attach. */
        struct sched_acct *na = sched_entry(next);
        if (na) {
            if (na->state == SCHED_ST_ON_CPU)
                sched_count(SCHED_H_MISSED_OUT);
            else if (na->state == SCHED_ST_BLOCKED)
                sched_count(SCHED_H_MISSED_WAKEUP);
            sched_close_exact(na, now, sched_task_exec(next_task));
            sched_mark_on_cpu(na, next, cpu, now, slot, 1);
        }
    }
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_wakeup)
{
    /* TP_PROTO(struct task_struct *p) */
    u64 ids = sched_task_ids(ctx->args[0]);
    if ((ids >> 32) != TARGET_TGID)
        return 0;
    u32 tid = (u32)ids;
    struct sched_acct *a = sched_threads.lookup(&tid);
    if (!a || a->state != SCHED_ST_BLOCKED)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 since = a->last_ts;
    /* The thread's switch-in may run on another CPU meanwhile: only the handler that
     * moves it out of BLOCKED may close the blocked interval, or an on-CPU slice would be
     * rewritten as waiting. 64-bit compare-and-swap over state and voluntary (adjacent,
     * 8-aligned; this target's clang has no 32-bit BPF cmpxchg); state is the low half. */
    u64 *sv = (u64 *)&a->state;
    u64 old = *sv;
    if ((u32)old != SCHED_ST_BLOCKED)
        return 0;
    u64 want = (old & ~0xffffffffULL) | SCHED_ST_RUNNABLE;
    if (__sync_val_compare_and_swap(sv, old, want) != old)
        return 0;
    if (now > since)
        a->blocked_ns += now - since;
    a->last_ts = now;
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_migrate_task)
{
    /* TP_PROTO(struct task_struct *p, int dest_cpu) */
    u64 ids = sched_task_ids(ctx->args[0]);
    if ((ids >> 32) != TARGET_TGID)
        return 0;
    u32 tid = (u32)ids;
    struct sched_acct *a = sched_threads.lookup(&tid);
    if (a)
        a->migrations++;
    return 0;
}

#ifdef SCHED_PAGE_FAULTS
/* Counted for threads already known (from their first switch-in or snapshot), and for
 * the process as a whole. TP_PROTO(unsigned long address, struct pt_regs *regs,
 * unsigned long error_code); the faulting thread is current. */
RAW_TRACEPOINT_PROBE(page_fault_user)
{
    if (!sched_is_target_current())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct sched_acct *a = sched_threads.lookup(&tid);
    if (a)
        a->page_faults++;
    int z = 0;
    struct sched_proc_acct *p = sched_proc.lookup(&z);
    if (p)
        __sync_fetch_and_add(&p->page_faults, 1);
    return 0;
}
#endif

/*
 * kmem:rss_stat fires where the counter changes: usually in a thread of the owning
 * process (curr=1), sometimes elsewhere (reclaim, another process's madvise, exit).
 * The target's mm_id is learnt from an event raised by the target itself with curr=1;
 * after that, events are matched on mm_id alone. `size` is in bytes on 6.x. A classic
 * tracepoint: the value is computed by the kernel for the event (a raw tracepoint would
 * have to read the mm). A skipped event leaves one member stale until its next change.
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

/* On-CPU ns of all the target's threads up to `now`, open slices included. Taken at span
 * entry and exit; minus the span thread's own delta it is what the rest of the process
 * ran meanwhile. */
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
 * Snapshot of one thread at `now`, the still-open interval added to the bucket of its
 * current state, plus the process figures at the same instant. Call it from a probe
 * running ON that thread (tid == current): the thread is on a CPU at that instant, so a
 * thread not seen yet is started here, and one whose switch-in was not reported is put on
 * the CPU when the scheduler says it arrived (sched_info.last_arrival, converted with the
 * offset measured at this CPU's last reported switch-in; without it, from the last switch
 * this CPU reported, which is early by however long the task before it ran). Deltas
 * between two reads on the thread then cover the wall time between them exactly.
 */
static __always_inline void sched_read(u32 tid, u64 now, struct sched_acct *out)
{
    u32 cpu = bpf_get_smp_processor_id();
    struct sched_acct *a = sched_threads.lookup(&tid);
    if ((u32)bpf_get_current_pid_tgid() == tid && sched_is_target_current()) {
        struct sched_cpu_slot *slot = sched_cpu_cur.lookup(&cpu);
        if (!a) {
            a = sched_entry(tid);
            if (a)
                sched_mark_on_cpu(a, tid, cpu, now, slot, 0);
        } else if (a->state != SCHED_ST_ON_CPU) {
            sched_count(SCHED_H_MISSED_IN_SNAPSHOT);
            u64 since = slot && slot->last_switch > a->last_ts ? slot->last_switch : a->last_ts;
            if (since > now)
                since = now;
#ifdef TASK_ARRIVAL_OFF
            if (slot && slot->arrival_ok) {
                u64 arrival = 0;
                bpf_probe_read_kernel(&arrival, sizeof(arrival),
                                      (void *)(bpf_get_current_task() + TASK_ARRIVAL_OFF));
                u64 est = arrival + (u64)slot->arrival_off;
                if (arrival && est > since && est <= now)
                    since = est;
            }
#endif
            if (since > a->last_ts) {
                if (a->state == SCHED_ST_BLOCKED)
                    a->blocked_ns += since - a->last_ts;
                else
                    a->run_queue_ns += since - a->last_ts;
            }
            sched_mark_on_cpu(a, tid, cpu, since, slot, 0);
        }
    }
    if (!a) {
        __builtin_memset(out, 0, sizeof(*out));
        out->last_ts = now;
    } else {
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
    }
    out->cpu = cpu;
    out->proc_on_cpu_ns = sched_proc_read(now);
    int z = 0;
    struct sched_proc_acct *p = sched_proc.lookup(&z);
    out->proc_page_faults = p ? p->page_faults : 0;
    out->rss_bytes = rss_read();
}
