// SPDX-License-Identifier: GPL-2.0
/*
 * dm-shared-snap C glue.  See glue.h.  No policy lives here: every decision is made in Rust.
 */
#include <linux/module.h>
#include <linux/device-mapper.h>
#include <linux/dm-io.h>
#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/crc32c.h>
#include <linux/vmalloc.h>
#include <linux/slab.h>
#include <linux/workqueue.h>
#include <linux/wait.h>
#include <linux/completion.h>
#include <linux/mutex.h>
#include <linux/random.h>

#include "glue.h"

#define DM_MSG_PREFIX "shared-snapshot"

/* ---- constants ------------------------------------------------------------------------- */

const struct dmss_consts dmss_consts = {
	.mapio_submitted = DM_MAPIO_SUBMITTED,
	.mapio_remapped = DM_MAPIO_REMAPPED,
	.mapio_kill = DM_MAPIO_KILL,
	.statustype_info = STATUSTYPE_INFO,
	.statustype_table = STATUSTYPE_TABLE,
};

/* ---- target types ---------------------------------------------------------------------- */

/* A registered target type and the Rust operations its callbacks forward to. */
struct dmss_target {
	struct target_type tt;
	const struct dmss_target_ops *ops;
};

static const struct dmss_target_ops *dmss_ops(struct dm_target *ti)
{
	return container_of(ti->type, struct dmss_target, tt)->ops;
}

static int dmss_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	return dmss_ops(ti)->ctr(ti, argc, argv);
}

static void dmss_dtr(struct dm_target *ti) { dmss_ops(ti)->dtr(ti); }
static int dmss_map(struct dm_target *ti, struct bio *bio) { return dmss_ops(ti)->map(ti, bio); }

static int dmss_end_io(struct dm_target *ti, struct bio *bio, blk_status_t *err)
{
	dmss_ops(ti)->end_io(ti, bio);
	return DM_ENDIO_DONE;
}

static void dmss_status(struct dm_target *ti, status_type_t type, unsigned int flags,
			char *result, unsigned int maxlen)
{
	if (maxlen)
		result[0] = 0;
	dmss_ops(ti)->status(ti, type, result, maxlen);
}

static int dmss_message(struct dm_target *ti, unsigned int argc, char **argv, char *result,
			unsigned int maxlen)
{
	return dmss_ops(ti)->message(ti, argc, argv, result, maxlen);
}

static void dmss_presuspend(struct dm_target *ti) { dmss_ops(ti)->presuspend(ti); }
static void dmss_presuspend_undo(struct dm_target *ti) { dmss_ops(ti)->presuspend_undo(ti); }
static void dmss_postsuspend(struct dm_target *ti) { dmss_ops(ti)->postsuspend(ti); }
static void dmss_resume(struct dm_target *ti) { dmss_ops(ti)->resume(ti); }

static int dmss_iterate_devices(struct dm_target *ti, iterate_devices_callout_fn fn, void *data)
{
	const struct dmss_target_ops *ops = dmss_ops(ti);
	struct dm_dev *d;
	unsigned int i;
	u64 len = 0;
	int r = 0;

	for (i = 0; !r && (d = ops->device(ti, i, &len)); i++)
		r = fn(ti, d, 0, len, data);
	return r;
}

struct dmss_target *dmss_target_register(const char *name, const unsigned int version[3],
					 const struct dmss_target_ops *ops, int *err)
{
	struct dmss_target *t = kzalloc(sizeof(*t), GFP_KERNEL);

	if (!t) {
		*err = -ENOMEM;
		return NULL;
	}
	t->ops = ops;
	t->tt.name = name;
	t->tt.version[0] = version[0];
	t->tt.version[1] = version[1];
	t->tt.version[2] = version[2];
	t->tt.module = THIS_MODULE;
	t->tt.ctr = dmss_ctr;
	t->tt.dtr = dmss_dtr;
	t->tt.map = dmss_map;
	t->tt.end_io = dmss_end_io;
	t->tt.status = dmss_status;
	t->tt.message = dmss_message;
	t->tt.presuspend = dmss_presuspend;
	t->tt.presuspend_undo = dmss_presuspend_undo;
	t->tt.postsuspend = dmss_postsuspend;
	t->tt.resume = dmss_resume;
	t->tt.iterate_devices = dmss_iterate_devices;
	*err = dm_register_target(&t->tt);
	if (*err) {
		kfree(t);
		return NULL;
	}
	return t;
}

void dmss_target_unregister(struct dmss_target *t)
{
	dm_unregister_target(&t->tt);
	kfree(t);
}

/* ---- dm_target ------------------------------------------------------------------------- */

void *dmss_ti_private(struct dm_target *ti) { return ti->private; }
void dmss_ti_set_private(struct dm_target *ti, void *p) { ti->private = p; }
void dmss_ti_set_error(struct dm_target *ti, const char *msg) { ti->error = (char *)msg; }
u64 dmss_ti_begin(struct dm_target *ti) { return ti->begin; }
u64 dmss_ti_len(struct dm_target *ti) { return ti->len; }

int dmss_ti_setup(struct dm_target *ti, u32 max_io_len, unsigned int per_io_data_size,
		  unsigned int num_flush_bios)
{
	ti->per_io_data_size = per_io_data_size;
	ti->num_flush_bios = num_flush_bios;
	ti->num_discard_bios = 0;
	return max_io_len ? dm_set_target_max_io_len(ti, max_io_len) : 0;
}

u32 dmss_ti_devt(struct dm_target *ti)
{
	return disk_devt(dm_disk(dm_table_get_md(ti->table)));
}

void dmss_ti_event(struct dm_target *ti) { dm_table_event(ti->table); }
int dmss_ti_writable(struct dm_target *ti) { return !!(dm_table_get_mode(ti->table) & BLK_OPEN_WRITE); }

/* ---- devices --------------------------------------------------------------------------- */

struct dm_dev *dmss_get_device(struct dm_target *ti, const char *path, int *err)
{
	struct dm_dev *d;

	*err = dm_get_device(ti, path, dm_table_get_mode(ti->table), &d);
	return *err ? NULL : d;
}

void dmss_put_device(struct dm_target *ti, struct dm_dev *d) { dm_put_device(ti, d); }
u64 dmss_dev_sectors(struct dm_dev *d) { return bdev_nr_sectors(d->bdev); }
int dmss_dev_zoned(struct dm_dev *d) { return bdev_is_zoned(d->bdev); }
u32 dmss_dev_devt(struct dm_dev *d) { return d->bdev->bd_dev; }
const char *dmss_dev_name(struct dm_dev *d) { return d->name; }

/* ---- bios ------------------------------------------------------------------------------ */

unsigned int dmss_bio_op(struct bio *bio) { return bio_op(bio); }
u64 dmss_bio_sector(struct bio *bio) { return bio->bi_iter.bi_sector; }
u32 dmss_bio_sectors(struct bio *bio) { return bio_sectors(bio); }

/*
 * Called from map only, for a data bio (never a duplicated flush) and 0 < n < its length.
 * dm refuses to shorten writes to zoned devices (BUG_ON), so this fails there instead; the
 * constructors refuse zoned devices anyway.
 */
int dmss_bio_accept_partial(struct bio *bio, u32 n)
{
	if (bdev_is_zoned(bio->bi_bdev) || !n || n >= bio_sectors(bio))
		return -EINVAL;
	dm_accept_partial_bio(bio, n);
	return 0;
}

void dmss_bio_remap(struct bio *bio, struct dm_dev *d, u64 sector)
{
	bio_set_dev(bio, d->bdev);
	bio->bi_iter.bi_sector = sector;
}

void dmss_bio_endio(struct bio *bio, int err)
{
	bio->bi_status = errno_to_blk_status(err);
	bio_endio(bio);
}

void dmss_bio_submit(struct bio *bio) { dm_submit_bio_remap(bio, NULL); }
u64 *dmss_bio_pbd(struct bio *bio) { return dm_per_bio_data(bio, sizeof(u64)); }

/* ---- worker ---------------------------------------------------------------------------- */

struct dmss_worker {
	struct workqueue_struct *wq;
	struct work_struct work;
	spinlock_t lock;
	struct bio_list bios;
	void (*fn)(void *ctx);
	void *ctx;
};

static void dmss_work_fn(struct work_struct *work)
{
	struct dmss_worker *w = container_of(work, struct dmss_worker, work);

	w->fn(w->ctx);
}

struct dmss_worker *dmss_worker_create(void (*fn)(void *ctx), void *ctx)
{
	struct dmss_worker *w = kzalloc(sizeof(*w), GFP_KERNEL);

	if (!w)
		return NULL;
	/*
	 * Per-CPU (bound), as kcopyd's: idle work runs on the CPU that queues it, so a
	 * submitter that waits for its write hands its CPU to the worker instead of waking
	 * another one.  Queued again while it runs, the work stays on the CPU it runs on
	 * (a workqueue never runs one work item twice at once), so under steady load it
	 * shares that CPU with its submitter rather than moving to an idle one.
	 */
	w->wq = alloc_workqueue("dm-shared-snap", WQ_MEM_RECLAIM, 1);
	if (!w->wq) {
		kfree(w);
		return NULL;
	}
	INIT_WORK(&w->work, dmss_work_fn);
	spin_lock_init(&w->lock);
	bio_list_init(&w->bios);
	w->fn = fn;
	w->ctx = ctx;
	return w;
}

void dmss_worker_destroy(struct dmss_worker *w)
{
	/* From its own work item this would wait for itself: leak rather than hang. */
	if (WARN_ON_ONCE(current_work() == &w->work))
		return;
	destroy_workqueue(w->wq);
	WARN_ON(!bio_list_empty(&w->bios));
	kfree(w);
}

void dmss_worker_defer(struct dmss_worker *w, struct bio *bio)
{
	unsigned long flags;

	spin_lock_irqsave(&w->lock, flags);
	bio_list_add(&w->bios, bio);
	spin_unlock_irqrestore(&w->lock, flags);
	queue_work(w->wq, &w->work);
}

struct bio *dmss_worker_pop(struct dmss_worker *w)
{
	unsigned long flags;
	struct bio *bio;

	spin_lock_irqsave(&w->lock, flags);
	bio = bio_list_pop(&w->bios);
	spin_unlock_irqrestore(&w->lock, flags);
	return bio;
}

void dmss_worker_push_front(struct dmss_worker *w, struct bio *bio)
{
	unsigned long flags;

	spin_lock_irqsave(&w->lock, flags);
	bio_list_add_head(&w->bios, bio);
	spin_unlock_irqrestore(&w->lock, flags);
}

void dmss_worker_kick(struct dmss_worker *w) { queue_work(w->wq, &w->work); }
/* cond_resched() is a macro (and a static call under PREEMPT_DYNAMIC): Rust calls it here. */
void dmss_cond_resched(void) { cond_resched(); }
void dmss_worker_flush(struct dmss_worker *w)
{
	if (!WARN_ON_ONCE(current_work() == &w->work))
		flush_workqueue(w->wq);
}

/* ---- mutex ----------------------------------------------------------------------------- */

struct mutex *dmss_mutex_create(void)
{
	struct mutex *m = kzalloc(sizeof(*m), GFP_KERNEL);

	if (m)
		mutex_init(m);
	return m;
}

void dmss_mutex_destroy(struct mutex *m)
{
	mutex_destroy(m);
	kfree(m);
}

void dmss_mutex_lock(struct mutex *m) { mutex_lock(m); }
int dmss_mutex_trylock(struct mutex *m) { return mutex_trylock(m); }
void dmss_mutex_unlock(struct mutex *m) { mutex_unlock(m); }

static DEFINE_MUTEX(dmss_registry_mutex);
void dmss_registry_lock(void) { mutex_lock(&dmss_registry_mutex); }
void dmss_registry_unlock(void) { mutex_unlock(&dmss_registry_mutex); }

/* ---- in-flight counter ----------------------------------------------------------------- */

struct dmss_inflight {
	atomic_t n;
	wait_queue_head_t wq;
};

struct dmss_inflight *dmss_inflight_create(void)
{
	struct dmss_inflight *f = kzalloc(sizeof(*f), GFP_KERNEL);

	if (f) {
		atomic_set(&f->n, 0);
		init_waitqueue_head(&f->wq);
	}
	return f;
}

void dmss_inflight_destroy(struct dmss_inflight *f) { kfree(f); }
void dmss_inflight_inc(struct dmss_inflight *f) { atomic_inc(&f->n); }

void dmss_inflight_dec(struct dmss_inflight *f)
{
	if (atomic_dec_and_test(&f->n))
		wake_up_all(&f->wq);
}

void dmss_inflight_wait_zero(struct dmss_inflight *f)
{
	wait_event(f->wq, !atomic_read(&f->n));
}

/* ---- dm-io ----------------------------------------------------------------------------- */

struct dm_io_client *dmss_io_client_create(void)
{
	struct dm_io_client *c = dm_io_client_create();

	return IS_ERR(c) ? NULL : c;
}

void dmss_io_client_destroy(struct dm_io_client *c) { dm_io_client_destroy(c); }

int dmss_io(struct dm_io_client *c, struct dm_dev *d, u64 sector, u32 count, void *buf,
	    blk_opf_t opf)
{
	struct dm_io_region region = { .bdev = d->bdev, .sector = sector, .count = count };
	struct dm_io_request req = { .bi_opf = opf, .client = c, .notify.fn = NULL };
	unsigned long error_bits = 0;
	int r;

	if (!buf) {
		req.mem.type = DM_IO_KMEM;
		req.mem.ptr.addr = NULL;
	} else if (is_vmalloc_addr(buf)) {
		req.mem.type = DM_IO_VMA;
		req.mem.ptr.vma = buf;
	} else {
		req.mem.type = DM_IO_KMEM;
		req.mem.ptr.addr = buf;
	}
	r = dm_io(&req, 1, &region, &error_bits, IOPRIO_DEFAULT);
	if (!r && error_bits)
		r = -EIO;
	return r;
}

/* ---- chunk copier --------------------------------------------------------------------- */

/*
 * Copies runs of sectors through one preallocated buffer with dm-io: all reads of a group of
 * runs that fits the buffer are issued at once and waited for, then all writes.  The worker
 * queues a batch's copies and waits for them once; nothing is allocated on this path except
 * dm-io's bios, which come from its mempool-backed bioset.
 */
#define DMSS_COPY_BUF (2u << 20)
#define DMSS_COPY_RUNS 64

struct dmss_copy_run {
	struct block_device *src, *dst;
	sector_t ss, ds, n;
};

struct dmss_copier {
	struct dm_io_client *io;
	void *buf;
	unsigned int nruns;
	struct dmss_copy_run runs[DMSS_COPY_RUNS];
	atomic_t pending;
	atomic_t errors;
	struct completion done;
};

struct dmss_copier *dmss_copier_create(void)
{
	struct dmss_copier *c = kzalloc(sizeof(*c), GFP_KERNEL);

	if (!c)
		return NULL;
	c->io = dm_io_client_create();
	if (IS_ERR(c->io)) {
		kfree(c);
		return NULL;
	}
	c->buf = vmalloc(DMSS_COPY_BUF);
	if (!c->buf) {
		dm_io_client_destroy(c->io);
		kfree(c);
		return NULL;
	}
	atomic_set(&c->pending, 1);
	atomic_set(&c->errors, 0);
	init_completion(&c->done);
	return c;
}

void dmss_copier_destroy(struct dmss_copier *c)
{
	vfree(c->buf);
	dm_io_client_destroy(c->io);
	kfree(c);
}

static void dmss_copy_io_done(unsigned long error, void *context)
{
	struct dmss_copier *c = context;

	if (error)
		atomic_inc(&c->errors);
	if (atomic_dec_and_test(&c->pending))
		complete(&c->done);
}

/* Waits for every I/O issued since the last wait. */
static void dmss_copy_settle(struct dmss_copier *c)
{
	if (!atomic_dec_and_test(&c->pending))
		wait_for_completion(&c->done);
	atomic_set(&c->pending, 1);
	reinit_completion(&c->done);
}

/*
 * Issues the reads (or the writes) of the group of pieces that starts at sector `pos` of run
 * `i` and fills at most the buffer; returns where the next group starts.  Called twice with
 * the same start, it issues the same pieces.
 */
static void dmss_copy_group(struct dmss_copier *c, unsigned int *i, sector_t *pos, bool write)
{
	size_t used = 0;

	while (*i < c->nruns && used < DMSS_COPY_BUF) {
		struct dmss_copy_run *r = &c->runs[*i];
		sector_t n = min_t(sector_t, r->n - *pos, (DMSS_COPY_BUF - used) >> SECTOR_SHIFT);
		struct dm_io_region region = {
			.bdev = write ? r->dst : r->src,
			.sector = (write ? r->ds : r->ss) + *pos,
			.count = n,
		};
		struct dm_io_request req = {
			.bi_opf = (write ? REQ_OP_WRITE : REQ_OP_READ) | REQ_SYNC,
			.mem.type = DM_IO_VMA,
			.mem.ptr.vma = c->buf + used,
			.notify.fn = dmss_copy_io_done,
			.notify.context = c,
			.client = c->io,
		};

		atomic_inc(&c->pending);
		dm_io(&req, 1, &region, NULL, IOPRIO_DEFAULT);
		used += (size_t)n << SECTOR_SHIFT;
		*pos += n;
		if (*pos == r->n) {
			(*i)++;
			*pos = 0;
		}
	}
}

/* Copies every queued run; the errors are counted in c->errors. */
static void dmss_copy_run_all(struct dmss_copier *c)
{
	unsigned int i = 0;
	sector_t pos = 0;

	while (i < c->nruns) {
		unsigned int wi = i;
		sector_t wpos = pos;

		dmss_copy_group(c, &i, &pos, false);
		dmss_copy_settle(c);
		if (atomic_read(&c->errors))
			break;
		dmss_copy_group(c, &wi, &wpos, true);
		dmss_copy_settle(c);
	}
	c->nruns = 0;
}

void dmss_copy(struct dmss_copier *c, struct dm_dev *src, u64 src_sector, struct dm_dev *dst,
	       u64 dst_sector, u64 count)
{
	if (c->nruns == DMSS_COPY_RUNS)
		dmss_copy_run_all(c);
	c->runs[c->nruns++] = (struct dmss_copy_run){
		.src = src->bdev, .dst = dst->bdev, .ss = src_sector, .ds = dst_sector, .n = count,
	};
}

int dmss_copy_wait(struct dmss_copier *c)
{
	dmss_copy_run_all(c);
	return atomic_xchg(&c->errors, 0) ? -EIO : 0;
}

/* Forgets the copies still queued (none of them is in flight: runs complete synchronously). */
void dmss_copy_discard(struct dmss_copier *c)
{
	c->nruns = 0;
	atomic_set(&c->errors, 0);
}

/* ---- misc ------------------------------------------------------------------------------ */

u32 dmss_crc32c(const void *data, size_t len) { return ~crc32c(~0, data, len); }
u64 dmss_random_u64(void) { return get_random_u64(); }
u64 dmss_now_ns(void) { return ktime_get_ns(); }
