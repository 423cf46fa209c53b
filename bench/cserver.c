/* The request loop of blksnapd's FUSE session, compiled: a measuring stick.
 *
 * Serves one file, /disk, as bench/ownnull.py does: with FILE, each read a
 * pread and each write a pwrite of FILE straight from the thread that read
 * the request; without, writes return at once and reads return zeroes.
 * Same mount options, INIT flags (blksnap/frontends/fuse_proto.py:
 * WANTED_FLAGS, max_background 64, 1 MiB requests), direct-I/O files and
 * reader threads on cloned fds as blksnapd's session; unlike it, every
 * thread reads its own fd at once (there is no interpreter lock to pass).
 * fio on a loop device over it measures what the kernel's side of FUSE
 * and the backing file's page cache cost without Python: the ceiling a
 * compiled request loop for blksnapd's short ways could approach.
 *
 * Built by bench/fuse_bench.py with the machine's C compiler; bench only.
 * Usage: cserver MOUNTPOINT SIZE THREADS [FILE]; prints "ready" once
 * mounted, serves until SIGTERM or SIGINT, then unmounts.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_IO (1u << 20)
#define READ_BUF (MAX_IO + 65536) /* a WRITE's headers and its data */
#define FILE_ID 2

static int backing = -1;
static uint64_t disk_size;
static const char *mountpoint;

static void fill_attr(struct fuse_attr *a, uint64_t nodeid)
{
	memset(a, 0, sizeof(*a));
	a->ino = nodeid;
	a->blksize = 4096;
	if (nodeid == FUSE_ROOT_ID) {
		a->mode = S_IFDIR | 0755;
		a->nlink = 2;
	} else {
		a->mode = S_IFREG | 0644;
		a->nlink = 1;
		a->size = disk_size;
		a->blocks = disk_size / 512;
	}
}

/* One answer, one writev. ENOENT: the request was interrupted meanwhile. */
static void answer(int fd, uint64_t unique, int err, const void *body, size_t len)
{
	struct fuse_out_header h = {
		.len = (uint32_t)(sizeof(h) + (err ? 0 : len)),
		.error = -err,
		.unique = unique,
	};
	struct iovec v[2] = {{&h, sizeof(h)}, {(void *)body, len}};
	if (writev(fd, v, err || !len ? 1 : 2) < 0 && errno != ENOENT && errno != ENODEV)
		perror("cserver: writev");
}

static void init_reply(int fd, uint64_t unique, const struct fuse_init_in *in)
{
	struct fuse_init_out out = {0};
	out.major = FUSE_KERNEL_VERSION;
	out.minor = in->minor < FUSE_KERNEL_MINOR_VERSION ? in->minor : FUSE_KERNEL_MINOR_VERSION;
	out.max_readahead = in->max_readahead;
	out.flags = in->flags & (FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO |
				 FUSE_MAX_PAGES | FUSE_PARALLEL_DIROPS | FUSE_INIT_EXT);
	out.max_background = 64;
	out.congestion_threshold = 48;
	out.max_write = MAX_IO;
	out.max_pages = MAX_IO / 4096;
	answer(fd, unique, 0, &out, sizeof(out));
}

static void *serve(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char *buf = aligned_alloc(4096, READ_BUF);
	char *data = aligned_alloc(4096, MAX_IO);
	if (!buf || !data)
		abort();
	memset(data, 0, MAX_IO);
	for (;;) {
		ssize_t n = read(fd, buf, READ_BUF);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
				continue;
			if (errno != ENODEV)
				perror("cserver: read");
			return NULL;
		}
		if ((size_t)n < sizeof(struct fuse_in_header))
			continue;
		const struct fuse_in_header *in = (const void *)buf;
		const void *arg = buf + sizeof(*in);
		uint64_t unique = in->unique;
		switch (in->opcode) {
		case FUSE_WRITE: {
			const struct fuse_write_in *w = arg;
			ssize_t done = w->size;
			if (backing >= 0)
				done = pwrite(backing, (const char *)(w + 1), w->size, (off_t)w->offset);
			if (done < 0) {
				answer(fd, unique, errno, NULL, 0);
				break;
			}
			struct fuse_write_out out = {.size = (uint32_t)done};
			answer(fd, unique, 0, &out, sizeof(out));
			break;
		}
		case FUSE_READ: {
			const struct fuse_read_in *r = arg;
			size_t len = r->size > MAX_IO ? MAX_IO : r->size;
			if (r->offset >= disk_size)
				len = 0;
			else if (len > disk_size - r->offset)
				len = disk_size - r->offset;
			ssize_t got = (ssize_t)len;
			if (backing >= 0 && len)
				got = pread(backing, data, len, (off_t)r->offset);
			if (got < 0)
				answer(fd, unique, errno, NULL, 0);
			else
				answer(fd, unique, 0, data, (size_t)got);
			break;
		}
		case FUSE_INIT:
			init_reply(fd, unique, arg);
			break;
		case FUSE_LOOKUP: {
			if (in->nodeid != FUSE_ROOT_ID || strcmp(arg, "disk") != 0) {
				answer(fd, unique, ENOENT, NULL, 0);
				break;
			}
			struct fuse_entry_out e = {.nodeid = FILE_ID, .generation = 1,
						   .entry_valid = 1, .attr_valid = 1};
			fill_attr(&e.attr, FILE_ID);
			answer(fd, unique, 0, &e, sizeof(e));
			break;
		}
		case FUSE_GETATTR:
		case FUSE_SETATTR: { /* (a size change is not refused: nothing here asks) */
			struct fuse_attr_out out = {.attr_valid = 1};
			fill_attr(&out.attr, in->nodeid);
			answer(fd, unique, 0, &out, sizeof(out));
			break;
		}
		case FUSE_OPEN:
		case FUSE_OPENDIR: {
			struct fuse_open_out out = {.fh = in->nodeid};
			if (in->opcode == FUSE_OPEN)
				out.open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
			answer(fd, unique, 0, &out, sizeof(out));
			break;
		}
		case FUSE_STATFS: {
			struct fuse_statfs_out out = {0};
			out.st.bsize = out.st.frsize = 4096;
			out.st.namelen = 255;
			answer(fd, unique, 0, &out, sizeof(out));
			break;
		}
		case FUSE_FORGET:
		case FUSE_BATCH_FORGET:
			break; /* no answer */
		case FUSE_READDIR: /* (empty: nothing here lists the directory) */
		case FUSE_RELEASE:
		case FUSE_RELEASEDIR:
		case FUSE_FLUSH:
		case FUSE_FSYNC:
		case FUSE_ACCESS:
		case FUSE_DESTROY:
			answer(fd, unique, 0, NULL, 0);
			break;
		default: /* INTERRUPT among them: the kernel sends no more */
			answer(fd, unique, ENOSYS, NULL, 0);
		}
	}
}

static void stop(int sig)
{
	(void)sig;
	umount2(mountpoint, MNT_DETACH);
	_exit(0);
}

int main(int argc, char **argv)
{
	if (argc < 4 || argc > 5) {
		fprintf(stderr, "usage: cserver MOUNTPOINT SIZE THREADS [FILE]\n");
		return 2;
	}
	mountpoint = argv[1];
	disk_size = strtoull(argv[2], NULL, 0);
	int threads = atoi(argv[3]);
	if (argc == 5) {
		backing = open(argv[4], O_RDWR | O_CLOEXEC);
		if (backing < 0) {
			perror(argv[4]);
			return 1;
		}
		/* the page cache as blksnapd keeps a backing file's (ownnull.py too) */
		posix_fadvise(backing, 0, 0, POSIX_FADV_RANDOM);
		posix_fadvise(backing, 0, 0, POSIX_FADV_DONTNEED);
	}
	int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		perror("/dev/fuse");
		return 1;
	}
	char opts[128];
	snprintf(opts, sizeof(opts), "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", fd);
	if (mount("cserver", mountpoint, "fuse.cserver", MS_NOSUID | MS_NODEV, opts) != 0) {
		perror("mount");
		return 1;
	}
	signal(SIGTERM, stop);
	signal(SIGINT, stop);
	for (int i = 1; i < threads; i++) {
		int clone = open("/dev/fuse", O_RDWR | O_CLOEXEC);
		uint32_t master = (uint32_t)fd;
		pthread_t t;
		if (clone < 0 || ioctl(clone, FUSE_DEV_IOC_CLONE, &master) != 0 ||
		    pthread_create(&t, NULL, serve, (void *)(intptr_t)clone) != 0) {
			perror("cserver: reader thread");
			stop(0);
		}
	}
	printf("ready\n");
	fflush(stdout);
	serve((void *)(intptr_t)fd);
	umount2(mountpoint, MNT_DETACH);
	return 0;
}
