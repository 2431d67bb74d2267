/*
 * Facts of the virtio split ring, the vhost-user inflight region and the
 * virtio-scsi request framing that both processes and every C file of vscsid
 * use: the one definition. Integer constants only, so that cffi's cdef can
 * read this text as it is (vscsid.virtio._ring and the data-plane engine both
 * export it to Python; vscsid/virtio/defs.py and the other Python modules take
 * their values from there).
 */

/* split-ring flags (virtio 1.x, 2.7) */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1
#define VIRTQ_DESC_SIZE 16
#define VIRTQ_MAX_SIZE 32768

/* The state of each descriptor head on the device side. A head is BUSY from
 * the moment it is popped (or resubmitted after a crash) until it is pushed to
 * the used ring, DONE until that used entry is published, then FREE. Only a
 * FREE head may be popped: a driver that offers a head the device still holds
 * has broken the ring. Completion bookkeeping therefore never exceeds the
 * queue size: every pushed head is a distinct DONE head. */
#define VSD_HEAD_FREE 0
#define VSD_HEAD_BUSY 1
#define VSD_HEAD_DONE 2

/* Guest memory regions every layer maps: the memory slots offered with
 * VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS (GET_MAX_MEM_SLOTS answers this).
 * SET_MEM_TABLE itself carries at most VHOST_MEMORY_BASELINE_NREGIONS. */
#define VSD_MAX_REGIONS 32
#define VHOST_MEMORY_BASELINE_NREGIONS 8

/* The inflight region of one queue (vhost-user INFLIGHT_SHMFD, split rings):
 *   u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
 *   desc[desc_num]: u8 inflight; u8 padding[5]; u16 next; u64 counter;
 * each queue's region is rounded up to VSD_INFLIGHT_ALIGN bytes. vscsid uses the
 * first padding byte of an entry to count how often the request was resubmitted
 * after its worker died (the poison-request quarantine). */
#define VSD_INFLIGHT_VERSION 1
#define VSD_INFLIGHT_ALIGN 64
#define VSD_INFLIGHT_HEADER 16
#define VSD_INFLIGHT_DESC 16
#define VSD_INFLIGHT_OFF_VERSION 8
#define VSD_INFLIGHT_OFF_DESC_NUM 10
#define VSD_INFLIGHT_OFF_LAST_BATCH 12
#define VSD_INFLIGHT_OFF_USED_IDX 14
#define VSD_INFLIGHT_E_INFLIGHT 0
#define VSD_INFLIGHT_E_RESUBMITS 1
#define VSD_INFLIGHT_E_COUNTER 8

/* virtio-scsi request framing (virtio 1.x, 5.6.6): the fixed parts of
 * virtio_scsi_cmd_req {u8 lun[8]; le64 id; u8 task_attr, prio, crn; u8 cdb[]}
 * and virtio_scsi_cmd_resp {le32 sense_len, resid; le16 status_qualifier;
 * u8 status, response; u8 sense[]}, and the default cdb/sense sizes. */
#define VIRTIO_SCSI_REQ_HDR 19
#define VIRTIO_SCSI_RESP_HDR 12
/* where the fields of virtio_scsi_cmd_resp lie (the driver side reads them) */
#define VIRTIO_SCSI_RESP_OFF_SENSE_LEN 0
#define VIRTIO_SCSI_RESP_OFF_RESIDUAL 4
#define VIRTIO_SCSI_RESP_OFF_STATUS 10
#define VIRTIO_SCSI_RESP_OFF_RESPONSE 11
#define VIRTIO_SCSI_CDB_DEFAULT_SIZE 32
#define VIRTIO_SCSI_SENSE_DEFAULT_SIZE 96
#define VIRTIO_SCSI_S_OK 0
