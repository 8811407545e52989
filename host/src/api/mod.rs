//! The client-facing side of a member: how a proposal or a query becomes an [`Outcome`],
//! and the two wire protocols that carry them.
//!
//! - `app`: the member's shared state and the request paths;
//! - `batcher`: group commit of proposals into log entries;
//! - `reads`: the read barrier for linearizable reads without the lease;
//! - `outcome`: what a request's outcome is and where it goes;
//! - `binary`, `text`: the wire protocols.
//!
//! Only this module and `client` know the client wire format.

mod app;
mod batcher;
pub mod binary;
mod outcome;
mod reads;
pub mod text;

pub use app::{App, DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_BUDGET};
pub(crate) use batcher::{MAX_BATCH_BYTES, MAX_BATCH_COMMANDS};
pub use outcome::{Held, Outcome, Reply};

use crate::types::{NodeId, Raft};

/// The client address of member `id`, if it is in the membership.
fn leader_addr(raft: &Raft, id: NodeId) -> Option<String> {
    raft.metrics().borrow().membership_config.membership().get_node(&id).map(|m| m.client_addr.clone())
}
