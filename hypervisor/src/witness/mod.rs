//! The witness client: the compare-and-set register that grants each generation to one host
//! (DESIGN.md, "One releaser per generation"), kept in etcd 3.4 and reached through its v3 JSON
//! gateway over HTTP/1.1.
//!
//! Sans-IO and host-tested: [`etcd`] builds the requests and reads the replies, [`http`] frames
//! requests and parses responses (fixed, chunked with trailers, or close-delimited) from a byte
//! stream with a hard size bound. The driver owns the TCP connection and the deadlines; a reply
//! that is late, malformed or missing is never a grant (`colo::failover` decides what to retry).
#![deny(unsafe_code)]

pub mod etcd;
pub mod http;
