/* The short way, compiled: READ and WRITE of a FUSE file served straight
 * from the thread that read them, without the interpreter.
 *
 * blksnapd's FUSE reader threads call bs_serve() (through ctypes, which lets
 * go of Python's lock for the call). It reads requests from its /dev/fuse fd
 * and serves the READs and WRITEs of the files (node ids) bound to a device
 * whose short way is open (struct bs_way); every other request, and any
 * READ or WRITE it cannot finish cleanly, it returns to Python untouched,
 * which serves it the long way (blksnap/frontends/fuse_session.py).
 *
 * What a way allows is set by the engine (blksnap/engine/device.py,
 * Device.refresh_short_way), only with the way closed and drained:
 *   BS_READS    the device's reads go to its backing store as they are
 *               (no filter, or only a tracker);
 *   BS_WRITES   its writes too (no filter, or a tracker with no snapshot
 *               taken);
 *   BS_TRACKED  and each write marks the tracker's CBT write map first
 *               (blksnap/engine/cbt.py, CbtMap.mark);
 *   BS_STORED   a snapshot is taken: a write goes on only if every chunk it
 *               touches is in diff storage already (a rewrite), else back to
 *               Python, which copies the chunk first (DiffArea.cow). A chunk's
 *               entry in the chunk map is set once its copy is safe and never
 *               cleared while the snapshot lives;
 *   BS_IMAGE    the way of a snapshot image: a read of chunks none of which
 *               is stored reads the device's backing store, and is given back
 *               if one became stored meanwhile (DiffArea.read's check: a
 *               chunk is published before the device write that changes it
 *               goes on) or the snapshot is corrupted (its error word, set
 *               before copy-on-write stops); it counts in the image's stats.
 *
 * The way is the device's gate for these requests (blksnap/engine/gate.py):
 * a request counts itself in (inflight) and then looks at the mode; the
 * engine closes the way (mode 0) and then waits for inflight to reach 0. With
 * both sides sequentially consistent, a request either sees the way closed
 * or is waited for: none gets past a drain.
 *
 * The CBT mark with write intent keeps CbtMap.mark's order: the map is marked
 * *before* the per-block "intent durable" bytes (iok) are read; a checkpoint
 * clears those bytes, then calls bs_fence(), then copies the map. So a write
 * that finds its blocks durable was marked before the copy, and one that does
 * not goes back to Python, which waits for its intent to be durable.
 *
 * Requests for Python are served one at a time (struct bs_turn): a thread
 * takes the turn before it returns one, and gives it when it calls bs_serve
 * again or is about to wait (Python's may_block hook calls bs_turn_give).
 * With every thread in Python at once they would pass Python's lock to and
 * fro, which costs more CPU than the requests themselves (measured: rewrites
 * under a snapshot at 2.5x the CPU of one thread at a time). A holder busy
 * with one request for TURN_STALL_NS without giving the turn loses it (it
 * finishes its request, then waits like the others): a request that waits
 * without saying so, say for a write through a device this process serves,
 * must not stop the others.
 *
 * Nothing here allocates per request or keeps state of its own beyond the
 * ways, node tables and turns Python gave it. Plain C11, no Python headers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BS_READS 1u
#define BS_WRITES 2u
#define BS_TRACKED 4u
#define BS_STORED 8u
#define BS_IMAGE 16u

/* linux/fuse.h (protocol 7.x): the sizes and opcodes used here. */
#define IN_HEADER 40
#define RW_IN 40 /* fuse_read_in and fuse_write_in are both 40 bytes */
#define RW_END (IN_HEADER + RW_IN)
#define OUT_HEADER 16
#define OP_READ 15
#define OP_WRITE 16

struct bs_way {
	_Atomic uint32_t mode;
	_Atomic uint32_t inflight;
	int32_t fd;
	uint32_t block_shift;
	uint64_t size;
	uint64_t piece; /* writes longer than this go down in pieces of it (0: whole) */
	uint8_t *map; /* the CBT write map (BS_TRACKED) */
	const uint8_t *iok; /* per block: write intent durable (NULL: no intent) */
	uint64_t blocks; /* entries of map and iok */
	uint32_t active; /* the number a write marks */
	uint32_t chunk_shift; /* BS_STORED: the snapshot's chunk size */
	const int64_t *chunks; /* BS_STORED: the chunk map (location + 1; 0: not stored) */
	uint64_t capacity; /* BS_STORED: the capacity frozen at take */
	const int64_t *error; /* BS_IMAGE: the snapshot's error (0: healthy) */
	int64_t *stats; /* BS_IMAGE: bytes read, reads */
	_Atomic uint64_t reads, writes, returned;
};

struct bs_entry {
	_Atomic uint64_t key; /* node id + 1; EMPTY, or GONE (a node unbound) */
	struct bs_way *_Atomic way;
};

#define EMPTY 0
#define GONE UINT64_MAX

struct bs_table {
	uint64_t mask;
	unsigned shift; /* 64 - log2(entries) */
	struct bs_entry e[];
};

/* --- ways: made by the engine, one per device or image, never freed (a few
 * dozen bytes each: a reader thread may have looked one up just before its
 * file was unbound) --- */

struct bs_way *bs_way_new(void)
{
	return calloc(1, sizeof(struct bs_way));
}

/* Close the way; the requests still inside (bs_way_close waits for them). */
uint32_t bs_way_shut(struct bs_way *w)
{
	atomic_store(&w->mode, 0);
	return atomic_load(&w->inflight);
}

/* Close the way and wait until no request is inside. */
void bs_way_close(struct bs_way *w)
{
	struct timespec nap = {0, 20000};

	if (!bs_way_shut(w))
		return;
	while (atomic_load(&w->inflight))
		nanosleep(&nap, NULL);
}

/* Open the way with what it allows; only while closed and drained. */
void bs_way_open(struct bs_way *w, uint32_t mode, int32_t fd, uint64_t size, uint64_t piece,
		 uint8_t *map, uint32_t block_shift, uint64_t blocks, uint32_t active,
		 const uint8_t *iok, const int64_t *chunks, uint32_t chunk_shift, uint64_t capacity,
		 const int64_t *error, int64_t *stats)
{
	w->error = error;
	w->stats = stats;
	w->chunks = chunks;
	w->chunk_shift = chunk_shift;
	w->capacity = capacity;
	w->fd = fd;
	w->size = size;
	w->piece = piece;
	w->map = map;
	w->block_shift = block_shift;
	w->blocks = blocks;
	w->active = active;
	w->iok = iok;
	atomic_store(&w->mode, mode);
}

uint32_t bs_way_mode(struct bs_way *w)
{
	return atomic_load(&w->mode);
}

/* Requests served here: reads, writes; and READs/WRITEs given back. */
void bs_way_counts(struct bs_way *w, uint64_t out[3])
{
	out[0] = atomic_load_explicit(&w->reads, memory_order_relaxed);
	out[1] = atomic_load_explicit(&w->writes, memory_order_relaxed);
	out[2] = atomic_load_explicit(&w->returned, memory_order_relaxed);
}

void bs_fence(void)
{
	atomic_thread_fence(memory_order_seq_cst);
}

/* *p += n, atomically (counters C and Python both add to). */
void bs_add64(int64_t *p, int64_t n)
{
	__atomic_fetch_add(p, n, __ATOMIC_RELAXED);
}

/* --- node ids: which way the requests of a FUSE file take (bound by the
 * FUSE session from one thread at a time when a device's file is added or
 * removed; read by every reader thread). Open addressing, linear probing:
 * a node unbound leaves GONE, which a later bind reuses. Node ids are never
 * given out twice, so a key read the same before and after the way belongs
 * to that way, and a file handle of a device removed (its node id unbound)
 * is never served here. --- */

static inline uint64_t home(const struct bs_table *t, uint64_t id)
{
	return id * 0x9E3779B97F4A7C15ull >> t->shift; /* Fibonacci hashing */
}

struct bs_table *bs_table_new(unsigned bits)
{
	struct bs_table *t = calloc(1, sizeof(*t) + sizeof(struct bs_entry) * (1ull << bits));

	if (t) {
		t->mask = (1ull << bits) - 1;
		t->shift = 64 - bits;
	}
	return t;
}

void bs_table_free(struct bs_table *t)
{
	free(t);
}

/* 0, or -1 if the table is full (the node's requests then go the long way). */
int bs_table_bind(struct bs_table *t, uint64_t id, struct bs_way *w)
{
	struct bs_entry *free_slot = NULL;
	uint64_t i = home(t, id), n;

	for (n = 0; n <= t->mask; n++, i = (i + 1) & t->mask) {
		struct bs_entry *e = &t->e[i];
		uint64_t k = atomic_load_explicit(&e->key, memory_order_relaxed);

		if (k == id + 1) {
			atomic_store_explicit(&e->key, GONE, memory_order_release);
			free_slot = e;
			break;
		}
		if (k == GONE && !free_slot)
			free_slot = e;
		if (k == EMPTY) {
			if (!free_slot)
				free_slot = e;
			break;
		}
	}
	if (!free_slot)
		return -1;
	atomic_store_explicit(&free_slot->way, w, memory_order_release);
	atomic_store_explicit(&free_slot->key, id + 1, memory_order_release);
	return 0;
}

void bs_table_unbind(struct bs_table *t, uint64_t id)
{
	uint64_t i = home(t, id), n;

	for (n = 0; n <= t->mask; n++, i = (i + 1) & t->mask) {
		uint64_t k = atomic_load_explicit(&t->e[i].key, memory_order_relaxed);

		if (k == id + 1) {
			atomic_store_explicit(&t->e[i].key, GONE, memory_order_release);
			return;
		}
		if (k == EMPTY)
			return;
	}
}

/* The way of node id, or NULL. */
static struct bs_way *lookup(struct bs_table *t, uint64_t id)
{
	uint64_t i = home(t, id), n;

	for (n = 0; n <= t->mask; n++, i = (i + 1) & t->mask) {
		struct bs_entry *e = &t->e[i];
		uint64_t k = atomic_load_explicit(&e->key, memory_order_acquire);
		struct bs_way *w;

		if (k == EMPTY)
			return NULL;
		if (k != id + 1)
			continue;
		w = atomic_load_explicit(&e->way, memory_order_acquire);
		if (atomic_load_explicit(&e->key, memory_order_acquire) != id + 1)
			return NULL;
		return w;
	}
	return NULL;
}

/* --- the turn to serve in Python --- */

#define TURN_STALL_NS 5000000L

struct bs_holder {
	uint64_t served; /* turns given back so far (under the turn's mutex) */
};

struct bs_turn {
	pthread_mutex_t m;
	pthread_cond_t c;
	struct bs_holder *owner;
};

static __thread struct bs_holder me;

struct bs_turn *bs_turn_new(void)
{
	struct bs_turn *t = calloc(1, sizeof(*t));

	if (t) {
		pthread_mutex_init(&t->m, NULL);
		pthread_cond_init(&t->c, NULL);
	}
	return t;
}

void bs_turn_free(struct bs_turn *t)
{
	if (t) {
		pthread_cond_destroy(&t->c);
		pthread_mutex_destroy(&t->m);
		free(t);
	}
}

/* Wait for the turn, or take it from a holder that has not given it back
 * for TURN_STALL_NS. */
static void turn_take(struct bs_turn *t)
{
	struct bs_holder *seen = NULL;
	uint64_t seen_served = 0;
	struct timespec until;

	pthread_mutex_lock(&t->m);
	while (t->owner && t->owner != &me) {
		clock_gettime(CLOCK_REALTIME, &until);
		until.tv_nsec += TURN_STALL_NS;
		if (until.tv_nsec >= 1000000000L) {
			until.tv_sec++;
			until.tv_nsec -= 1000000000L;
		}
		if (pthread_cond_timedwait(&t->c, &t->m, &until) != ETIMEDOUT)
			continue;
		if (t->owner && t->owner == seen && t->owner->served == seen_served)
			break; /* stalled */
		seen = t->owner;
		seen_served = seen ? seen->served : 0;
	}
	t->owner = &me;
	pthread_mutex_unlock(&t->m);
}

/* Give the turn back if this thread holds it. */
void bs_turn_give(struct bs_turn *t)
{
	pthread_mutex_lock(&t->m);
	me.served++;
	if (t->owner == &me) {
		t->owner = NULL;
		pthread_cond_signal(&t->c);
	}
	pthread_mutex_unlock(&t->m);
}

/* --- serving --- */

static inline uint32_t get32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return v;
}

static inline uint64_t get64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return v;
}

/* Count a request in; the way's mode if it allows ``need``, else 0 (and
 * counted out again). */
static uint32_t enter(struct bs_way *w, uint32_t need)
{
	uint32_t mode;

	atomic_fetch_add(&w->inflight, 1);
	mode = atomic_load(&w->mode);
	if ((mode & need) == need)
		return mode;
	atomic_fetch_sub_explicit(&w->inflight, 1, memory_order_release);
	return 0;
}

static void leave(struct bs_way *w)
{
	atomic_fetch_sub_explicit(&w->inflight, 1, memory_order_release);
}

/* All of len bytes at off, written (in pieces of piece, if not 0) or read;
 * -1 on an error or a short transfer (the long way then decides). */
static int io_all(int write, int fd, uint8_t *p, size_t len, uint64_t off, uint64_t piece)
{
	while (len) {
		size_t n = piece && len > piece ? piece : len;
		ssize_t r = write ? pwrite(fd, p, n, (off_t)off) : pread(fd, p, n, (off_t)off);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (r == 0)
			return -1;
		p += r;
		off += (uint64_t)r;
		len -= (size_t)r;
	}
	return 0;
}

/* Mark blocks first..last under the active number; 1 if the write may go
 * on now, 0 if its write intent is not durable (Python waits for it). */
static int mark(struct bs_way *w, uint64_t offset, uint64_t length)
{
	uint64_t first = offset >> w->block_shift;
	uint64_t last = (offset + length - 1) >> w->block_shift;
	uint8_t active = (uint8_t)w->active;
	uint64_t b;

	if (last >= w->blocks)
		return 0;
	for (b = first; b <= last; b++)
		__atomic_store_n(&w->map[b], active, __ATOMIC_RELAXED);
	if (!w->iok)
		return 1;
	atomic_thread_fence(memory_order_seq_cst);
	for (b = first; b <= last; b++)
		if (!__atomic_load_n(&w->iok[b], __ATOMIC_RELAXED))
			return 0;
	return 1;
}

/* Is every chunk of offset..offset+length in diff storage (stored 1), or
 * none of them (stored 0)? */
static int chunks_all(struct bs_way *w, uint64_t offset, uint64_t length, int stored)
{
	uint64_t c, last = (offset + length - 1) >> w->chunk_shift;

	for (c = offset >> w->chunk_shift; c <= last; c++)
		if ((__atomic_load_n(&w->chunks[c], __ATOMIC_ACQUIRE) != 0) != stored)
			return 0;
	return 1;
}

/* Is every chunk of the write in diff storage? */
static int stored(struct bs_way *w, uint64_t offset, uint64_t length)
{
	return offset + length <= w->capacity && chunks_all(w, offset, length, 1);
}

/* Is no chunk of the read in diff storage, and the snapshot healthy? */
static int none_stored(struct bs_way *w, uint64_t offset, uint64_t length)
{
	return !__atomic_load_n(w->error, __ATOMIC_ACQUIRE) && chunks_all(w, offset, length, 0);
}

/* The out-header of a reply of len bytes (error 0) to unique. */
static void put_header(uint8_t *out, uint32_t len, uint64_t unique)
{
	int32_t err = 0;

	memcpy(out, &len, 4);
	memcpy(out + 4, &err, 4);
	memcpy(out + 8, &unique, 8);
}

/* Send one reply; 0, or -errno (ENOENT, an interrupted request, is 0). */
static int reply(int fd, struct iovec *iov, int n)
{
	for (;;) {
		if (writev(fd, iov, n) >= 0)
			return 0;
		if (errno == EINTR)
			continue;
		return errno == ENOENT ? 0 : -errno;
	}
}

/* 1: served; 0: not served, the request as it came is for Python;
 * -errno: the reply could not be sent. */
static int serve_write(int fd, struct bs_way *w, uint8_t *buf, uint64_t unique, uint64_t offset,
		       uint32_t size)
{
	uint8_t out[OUT_HEADER + 8];
	struct iovec iov = {out, sizeof(out)};
	uint32_t zero = 0, mode;
	int r;

	if (!size || offset + size > w->size || offset + size < offset)
		return 0;
	mode = enter(w, BS_WRITES);
	if (!mode)
		return 0;
	if ((mode & BS_STORED) && !stored(w, offset, size)) {
		leave(w);
		return 0;
	}
	if ((mode & BS_TRACKED) && !mark(w, offset, size)) {
		leave(w);
		return 0;
	}
	if (io_all(1, w->fd, buf + RW_END, size, offset, w->piece) < 0) {
		leave(w);
		return 0;
	}
	leave(w);
	atomic_fetch_add_explicit(&w->writes, 1, memory_order_relaxed);
	put_header(out, sizeof(out), unique);
	memcpy(out + 16, &size, 4);
	memcpy(out + 20, &zero, 4);
	r = reply(fd, &iov, 1);
	return r ? r : 1;
}

static int serve_read(int fd, struct bs_way *w, uint8_t *buf, size_t bufsize, uint64_t unique,
		      uint64_t offset, uint32_t size)
{
	/* The data goes after the request, its header over the request's last
	 * bytes once read: a request given back is as it came. */
	uint8_t *data = buf + RW_END, *out = data - OUT_HEADER;
	struct iovec iov;
	uint32_t len;
	int r;

	if (!size || offset + size > w->size || offset + size < offset)
		return 0;
	if (RW_END + (size_t)size > bufsize)
		return 0;
	uint32_t mode = enter(w, BS_READS);

	if (!mode)
		return 0;
	if ((mode & BS_IMAGE) && !none_stored(w, offset, size)) {
		leave(w);
		return 0;
	}
	if (io_all(0, w->fd, data, size, offset, 0) < 0) {
		leave(w);
		return 0;
	}
	if (mode & BS_IMAGE) {
		if (!none_stored(w, offset, size)) {
			leave(w);
			return 0;
		}
		bs_add64(&w->stats[0], size);
		bs_add64(&w->stats[1], 1);
	}
	leave(w);
	atomic_fetch_add_explicit(&w->reads, 1, memory_order_relaxed);
	len = OUT_HEADER + size;
	put_header(out, len, unique);
	iov.iov_base = out;
	iov.iov_len = len;
	r = reply(fd, &iov, 1);
	return r ? r : 1;
}

/* Serve requests read from fd until one is for Python.
 *
 * Gives the turn back first if this thread holds it. Returns the length of
 * a request for Python (in buf, as it came), the turn taken; 0 if a reply
 * could not be sent (*reply_err: its errno; the caller logs it and calls
 * again); or -errno if reading fd failed (ENODEV: the connection is gone).
 * EINTR, EAGAIN and ENOENT (a request interrupted before it was read) are
 * read past, as the long way does.
 */
static ssize_t serve(int fd, uint8_t *buf, size_t bufsize, struct bs_table *t, int *reply_err);

ssize_t bs_serve(int fd, uint8_t *buf, size_t bufsize, struct bs_table *t, struct bs_turn *turn,
		 int *reply_err)
{
	ssize_t n;

	bs_turn_give(turn);
	n = serve(fd, buf, bufsize, t, reply_err);
	if (n > 0)
		turn_take(turn);
	return n;
}

static ssize_t serve(int fd, uint8_t *buf, size_t bufsize, struct bs_table *t, int *reply_err)
{
	for (;;) {
		ssize_t n = read(fd, buf, bufsize);
		uint32_t len, op, size;
		uint64_t unique, nodeid, offset;
		struct bs_way *w;
		int r;

		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
				continue;
			return -errno;
		}
		if (n < RW_END)
			return n;
		len = get32(buf);
		op = get32(buf + 4);
		if ((op != OP_READ && op != OP_WRITE) || len != (uint64_t)n)
			return n;
		unique = get64(buf + 8);
		nodeid = get64(buf + 16);
		offset = get64(buf + IN_HEADER + 8);
		size = get32(buf + IN_HEADER + 16);
		w = lookup(t, nodeid);
		if (!w)
			return n;
		if (op == OP_WRITE) {
			if ((uint64_t)n != (uint64_t)RW_END + size)
				return n;
			r = serve_write(fd, w, buf, unique, offset, size);
		} else {
			if (n != RW_END)
				return n;
			r = serve_read(fd, w, buf, bufsize, unique, offset, size);
		}
		if (r == 0) {
			atomic_fetch_add_explicit(&w->returned, 1, memory_order_relaxed);
			return n;
		}
		if (r < 0) {
			*reply_err = -r;
			return 0;
		}
	}
}
