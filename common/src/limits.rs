//! Every limit of the system, named in one place.
//!
//! Each constant is checked where input arrives (a frame off the wire, a
//! record handed to a segment, a connection accepted). Exceeding one is an
//! error with the limit's name in it, never a silent truncation or an
//! unbounded queue.

/// Largest frame payload accepted on the wire. Larger length fields close the
/// connection before any payload byte is buffered.
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Largest page size a volume may be configured with.
pub const PAGE_BYTES_MAX: usize = 64 * 1024;

/// Most pages in one protection group. A segment indexes its PG's pages
/// with one 4-byte slot per page (`storage_node::page_index`), so this also
/// bounds that index to 256 MiB. The default 10 GiB PG of 8 KiB pages is
/// 1.25 Mi pages (5 MiB of slots).
pub const PAGES_PER_PG_MAX: u64 = 64 * 1024 * 1024;

/// Largest body of one redo record (the operation's bytes).
pub const RECORD_BODY_BYTES_MAX: usize = PAGE_BYTES_MAX + 64;

/// Most records in one append request frame.
pub const RECORDS_PER_APPEND_MAX: usize = 8192;

/// Largest group-commit batch a segment writes with one write + one
/// fdatasync. A repairing segment fills its writes with hydrate batches:
/// on this one-disk machine an 8 MiB write + fdatasync moved 390-690 MB/s
/// where a 3 MiB one moved 125-560 MB/s (the flush is paid per write).
pub const LOG_BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Most bytes a segment queues behind its in-flight disk write before it
/// refuses appends (queue depth for the disk).
pub const SEGMENT_QUEUED_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Most frames queued for sending on one connection. A full queue means the
/// peer is slow: the writer skips that segment and retransmits later, so one
/// slow node never stalls the others.
pub const CONNECTION_SEND_QUEUE_FRAMES_MAX: usize = 4096;

/// Most client connections a storage node serves at once.
pub const NODE_CONNECTIONS_MAX: usize = 1024;

/// Most segments one storage node hosts.
pub const NODE_SEGMENTS_MAX: usize = 4096;

/// Most bytes of encoded records the volume writer keeps for retransmission
/// to segments that have not acknowledged them yet. Past it the oldest are
/// dropped and a lagging segment must be repaired from its peers.
pub const WRITER_RETAINED_BYTES_MAX: usize = 512 * 1024 * 1024;

/// Largest error message carried in an error response.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;

/// Aurora's LSN allocation limit: no LSN is allocated above VDL + this.
pub const LSN_ALLOCATION_LIMIT_DEFAULT: u64 = 10_000_000;

/// Largest LSN allocation limit a writer may use. A recovering writer
/// truncates `(VDL, VDL + this]`: whatever limit its predecessor used, no
/// record it could have written lies above the range.
pub const LSN_ALLOCATION_LIMIT_MAX: u64 = 10_000_000;

/// Most bytes of encoded records a writer lets wait unsent for a later
/// send (`VolumeClient::write_deferred`): a long transaction's changes
/// still flow, in frames of about this size, and keep VDL moving.
pub const DEFERRED_RECORD_BYTES_MAX: usize = 256 * 1024;

/// Most truncation ranges a volume's segments keep (one per recovery that
/// wrote something before the next one). A recovery that would need more
/// is refused with this limit's name.
pub const TRUNCATIONS_MAX: usize = 1024;

/// Most bytes of records one [`crate::message::RecordBatch`] carries.
pub const RECORD_BATCH_BYTES_MAX: usize = 1024 * 1024;

/// Most bytes of versions and records one
/// [`crate::message::HydrateBatch`] carries: three quarters of a frame. A
/// repairing segment logs as many whole batches as fit in one log write
/// with the appends queued meanwhile (two, with 8 MiB writes).
pub const HYDRATE_BATCH_BYTES_MAX: usize = FRAME_PAYLOAD_BYTES_MAX / 4 * 3;
const _: () = assert!(HYDRATE_BATCH_BYTES_MAX + 64 * 1024 < FRAME_PAYLOAD_BYTES_MAX);

/// Slack reserved in every log write for entry headers and padding.
pub const ENTRY_OVERHEAD_GUARD: usize = 256;

/// Segment replicas of every protection group (two in each of three AZs).
pub const SEGMENTS_PER_PG: usize = 6;
/// Acknowledgements that make a write durable in its PG.
pub const WRITE_QUORUM: usize = 4;
/// Segment slots of a PG: its six segments, plus the incoming one while a
/// membership change replaces one of them (slot 6).
pub const SEGMENT_SLOTS: usize = SEGMENTS_PER_PG + 1;
/// Bytes of a peer address in a membership request at most.
pub const ADDRESS_BYTES_MAX: usize = 255;
/// Segments whose answers meet every write quorum.
pub const READ_QUORUM: usize = 3;

/// Largest block of a block volume (the file system's large blocks).
pub const BLOCK_BYTES_MAX: usize = 64 * 1024;

/// Versions of one block a block segment keeps: the newest under each of
/// the last few fencing tokens. A read that must skip a version written by
/// a fenced lease after its fence falls back to an older one (see
/// `storage_node::block_segment`).
pub const BLOCK_HISTORY_MAX: usize = 4;

/// Most lease epochs one block segment records as fenced. A fence beyond it
/// is refused, so a dead workstation's recovery waits rather than run
/// unfenced.
pub const FENCED_EPOCHS_MAX: usize = 4096;

/// Most blocks one fence acknowledgement lists; a longer list is paged.
pub const FENCE_ACK_BLOCKS_MAX: usize = 16 * 1024;
