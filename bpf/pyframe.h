/*
 * What the capture and sampling programs share: reading the target's Python objects and
 * deciding whether a code object is one of the spec's targets.
 *
 * The includer defines, before including: TARGET_TGID, the layout's OFF_* macros,
 * OFF_CODE_MATCH_NAME (co_qualname on 3.11+, co_name before), an enum with C_READ_FAULTS
 * and C_CLASSIFIED, and `count(int)`.
 */
#define NAME_MAX_BYTES 64
#define MAX_SLOTS 4

struct code_info {
    u64 name_obj;  /* the code's (qual)name object when classified: detects address reuse */
    u32 target_id; /* 0 = not a target */
    u32 flags;     /* co_flags */
};
struct name_key { u64 hash; u32 slot; u32 pad; };
struct name_val {
    u32 target_id;
    u32 suffix_len;  /* bytes compared at the end of co_filename */
    u64 suffix_hash;
    u32 firstlineno; /* 0 = any */
    u32 exact;       /* 1 = the whole file name must match (a script run by path) */
};

BPF_TABLE("lru_hash", u64, struct code_info, code_cache, 65536);
BPF_HASH(names, struct name_key, struct name_val, 1024);
struct strbuf_t { char b[NAME_MAX_BYTES + 16]; }; /* slack: clang unrolls the hash loop past the end */
BPF_PERCPU_ARRAY(strbuf, struct strbuf_t, 1);

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

#define NOT_CACHED 0xffffffffu
/* classify()'s fast half: the target id if this code object is cached, else NOT_CACHED. */
static __always_inline u32 classify_cached(u64 code) {
    u64 name_obj = read_ptr(code + OFF_CODE_MATCH_NAME);
    struct code_info *ci = code_cache.lookup(&code);
    return ci && ci->name_obj == name_obj ? ci->target_id : NOT_CACHED;
}

/* Is this code object a target? Cached per code address; a cached entry is trusted only
 * while the code still points at the same name object (code memory gets reused). */
static __always_inline u32 classify(u64 code, u32 *flags) {
    u64 name_obj = read_ptr(code + OFF_CODE_MATCH_NAME);
    struct code_info *ci = code_cache.lookup(&code);
    if (ci && ci->name_obj == name_obj) {
        *flags = ci->flags;
        return ci->target_id;
    }
    count(C_CLASSIFIED);
    struct code_info fresh = {.name_obj = name_obj, .target_id = 0};
    bpf_probe_read_user(&fresh.flags, sizeof(fresh.flags), (void *)(code + OFF_CODE_FLAGS));
    *flags = fresh.flags;
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
