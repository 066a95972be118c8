//! The COLO engine: everything that decides what clients may see and what a checkpoint holds.
//!
//! Pure `no_std` logic, host-tested, no hardware access. One module per rule of the protocol
//! (see `docs/architecture.md`):
//! - [`frames`]: building well-formed frames (tests, benches, frames the hypervisor sends);
//! - [`packet`]: frame parsing (smoltcp wire) into the flow keys and payloads the comparator needs;
//! - [`comparator`]: per-connection `OutputComparator` that releases PVM output the SVM matched;
//! - [`rewriter`]: `SequenceRewriter`, SVM-side TCP seq/ack translation;
//! - [`checkpoint`]: the versioned, checksummed checkpoint stream format;
//! - [`block`]: secondary-side block write cache and SVM overlay;
//! - [`failover`]: heartbeat and role state machine;
//! - [`link`]: the replication link messages (typed, versioned, checksummed);
//! - [`node`]: `ColoNode`, one host of a pair as a sans-IO state machine;
//! - [`time`]: the one [`Tick`] type every module takes.
#![deny(unsafe_code)]

pub mod block;
pub mod checkpoint;
pub mod comparator;
pub mod failover;
pub mod frames;
pub mod link;
pub mod node;
pub mod packet;
pub mod rewriter;
pub mod time;

pub use time::Tick;
