//! ligera's guest agent: the program that runs inside a sandbox VM as PID 1
//! (`src/main.rs`), and the protocol it speaks with the host
//! ([`protocol`]), which `ligera sandbox` uses from the other end.

pub mod copy;
pub mod net;
pub mod oneshot;
pub mod protocol;
