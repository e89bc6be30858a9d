/* SPDX-License-Identifier: GPL-2.0 */
/*
 * dm-shared-snap C glue: the small C surface the Rust binding layer (dm/) calls.
 * It builds one target_type per registered Rust target type, forwards its callbacks to that
 * type's operations table, and wraps inline helpers and C structures (bio fields, dm-io,
 * workqueue, wait queues) that Rust-for-Linux 6.12 does not expose.  It knows no target.
 */
#ifndef DMSS_GLUE_H
#define DMSS_GLUE_H

#include <linux/types.h>
#include <linux/blk_types.h>

struct dm_target;
struct dm_dev;
struct bio;
struct dm_io_client;
struct mutex;
struct dmss_worker;
struct dmss_inflight;
struct dmss_copier;
struct dmss_target;

/*
 * Kernel constants the Rust side needs but cannot get from kernel::bindings (device-mapper.h
 * is not in the 6.12 bindings): read from this one object, so no value is written twice.
 */
struct dmss_consts {
	int mapio_submitted;
	int mapio_remapped;
	int mapio_kill;
	int statustype_info;
	int statustype_table;
};
extern const struct dmss_consts dmss_consts;

/*
 * The operations of one target type, implemented in Rust (one table per type).  Each
 * function receives the dm_target; the glue finds the table through ti->type.
 */
struct dmss_target_ops {
	int (*ctr)(struct dm_target *ti, unsigned int argc, char **argv);
	void (*dtr)(struct dm_target *ti);
	int (*map)(struct dm_target *ti, struct bio *bio);
	void (*end_io)(struct dm_target *ti, struct bio *bio);
	/* result[0] is set to NUL by the glue when maxlen > 0. */
	void (*status)(struct dm_target *ti, int type, char *result, unsigned int maxlen);
	int (*message)(struct dm_target *ti, unsigned int argc, char **argv, char *result,
		       unsigned int maxlen);
	void (*presuspend)(struct dm_target *ti);
	void (*presuspend_undo)(struct dm_target *ti);
	void (*postsuspend)(struct dm_target *ti);
	void (*resume)(struct dm_target *ti);
	/* Device idx and its length in sectors (*len), NULL past the last. */
	struct dm_dev *(*device)(struct dm_target *ti, unsigned int idx, u64 *len);
};

/* Registration: a target_type named `name` (which must outlive it) over `ops`. */
struct dmss_target *dmss_target_register(const char *name, const unsigned int version[3],
					 const struct dmss_target_ops *ops, int *err);
void dmss_target_unregister(struct dmss_target *t);

/* dm_target. */
void *dmss_ti_private(struct dm_target *ti);
void dmss_ti_set_private(struct dm_target *ti, void *p);
void dmss_ti_set_error(struct dm_target *ti, const char *msg);
u64 dmss_ti_begin(struct dm_target *ti);
u64 dmss_ti_len(struct dm_target *ti);
int dmss_ti_setup(struct dm_target *ti, u32 max_io_len, unsigned int per_io_data_size,
		  unsigned int num_flush_bios);
u32 dmss_ti_devt(struct dm_target *ti);
void dmss_ti_event(struct dm_target *ti);
int dmss_ti_writable(struct dm_target *ti);

/* Devices. */
struct dm_dev *dmss_get_device(struct dm_target *ti, const char *path, int *err);
void dmss_put_device(struct dm_target *ti, struct dm_dev *d);
u64 dmss_dev_sectors(struct dm_dev *d);
int dmss_dev_zoned(struct dm_dev *d);
u32 dmss_dev_devt(struct dm_dev *d);
const char *dmss_dev_name(struct dm_dev *d);

/* Bios. */
unsigned int dmss_bio_op(struct bio *bio);
u64 dmss_bio_sector(struct bio *bio);
u32 dmss_bio_sectors(struct bio *bio);
int dmss_bio_accept_partial(struct bio *bio, u32 n);
void dmss_bio_remap(struct bio *bio, struct dm_dev *d, u64 sector);
void dmss_bio_endio(struct bio *bio, int err);
void dmss_bio_submit(struct bio *bio);
u64 *dmss_bio_pbd(struct bio *bio);

/* Worker: a bio list and a work item on a WQ_MEM_RECLAIM workqueue. */
struct dmss_worker *dmss_worker_create(void (*fn)(void *ctx), void *ctx);
void dmss_worker_destroy(struct dmss_worker *w);
void dmss_worker_defer(struct dmss_worker *w, struct bio *bio);
struct bio *dmss_worker_pop(struct dmss_worker *w);
void dmss_worker_push_front(struct dmss_worker *w, struct bio *bio);
void dmss_worker_kick(struct dmss_worker *w);
void dmss_cond_resched(void);
void dmss_worker_flush(struct dmss_worker *w);

/* A mutex with trylock. */
struct mutex *dmss_mutex_create(void);
void dmss_mutex_destroy(struct mutex *m);
void dmss_mutex_lock(struct mutex *m);
int dmss_mutex_trylock(struct mutex *m);
void dmss_mutex_unlock(struct mutex *m);

/* The registry lock (one global mutex). */
void dmss_registry_lock(void);
void dmss_registry_unlock(void);

/* In-flight counter that can be waited on until zero. */
struct dmss_inflight *dmss_inflight_create(void);
void dmss_inflight_destroy(struct dmss_inflight *f);
void dmss_inflight_inc(struct dmss_inflight *f);
void dmss_inflight_dec(struct dmss_inflight *f);
void dmss_inflight_wait_zero(struct dmss_inflight *f);

/* Synchronous metadata I/O through dm-io. */
struct dm_io_client *dmss_io_client_create(void);
void dmss_io_client_destroy(struct dm_io_client *c);
/* opf: the request's operation and flags (REQ_OP_*, REQ_*); buf NULL for an empty flush. */
int dmss_io(struct dm_io_client *c, struct dm_dev *d, u64 sector, u32 count, void *buf,
	    blk_opf_t opf);

/* Chunk copies with dm-io through one buffer, run and waited for as a batch. */
struct dmss_copier *dmss_copier_create(void);
void dmss_copier_destroy(struct dmss_copier *c);
void dmss_copy(struct dmss_copier *c, struct dm_dev *src, u64 src_sector, struct dm_dev *dst,
	       u64 dst_sector, u64 count);
int dmss_copy_wait(struct dmss_copier *c);
void dmss_copy_discard(struct dmss_copier *c);

/* Misc. */
u32 dmss_crc32c(const void *data, size_t len);
u64 dmss_random_u64(void);
u64 dmss_now_ns(void);

#endif
