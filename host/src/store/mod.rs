//! Storage: the durable log (`log`), the guest-backed state machine (`sm`), their snapshot
//! files (`snapfile`), the small state files they share (`files`) and `--log-commands`
//! (`command_log`).

pub mod command_log;
pub mod covered;
pub mod durable;
pub mod files;
pub mod log;
pub mod sm;
pub mod snapfile;

pub use durable::Durable;
pub use log::{LogStore, SharedLog};
pub use sm::{GuestSpec, StateMachine};
